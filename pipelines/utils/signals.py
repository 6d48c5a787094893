"""SIGTERM and SIGHUP (``timeout``, schedulers, ``kill``, a closed terminal) stop a run the way Ctrl-C does.

Inside :func:`stop_signals`, either signal runs the current SIGINT handler (Ray Train's graceful abort
while a run trains, else Python's ``KeyboardInterrupt``) and is remembered: :func:`received` tells which
one came, and :func:`exit_code` gives the shell's convention, 128 + the signal number (130 for Ctrl-C, 143
for SIGTERM, 129 for SIGHUP).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
_received: list[int] = []
_active: list[bool] = []  # inside stop_signals
_holding: list[bool] = []  # inside deferred
_held: list[int] = []  # signals that came while held


def _interrupt(frame) -> None:
    """What Ctrl-C does now: the current SIGINT handler (Ray Train's while a run trains)."""
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler) and handler is not _sigint:
        handler(signal.SIGINT, frame)
    else:
        raise KeyboardInterrupt


def _as_interrupt(signum: int, frame) -> None:
    _received.append(signum)
    if _holding:
        _held.append(signum)
        return
    _interrupt(frame)


def _sigint(signum: int, frame) -> None:
    _as_interrupt(signum, frame)


def received() -> int | None:
    """The first stop signal received inside :func:`stop_signals` (SIGINT too), or None."""
    return _received[0] if _received else None


def name() -> str:
    """The name of the signal that stopped the run (SIGINT if none is known)."""
    return signal.Signals(received() or signal.SIGINT).name


def exit_code() -> int:
    """128 + the signal that stopped the run (130 if it was Ctrl-C or none is known)."""
    return 128 + (received() or signal.SIGINT)


def _install() -> None:
    for s in STOP_SIGNALS:
        signal.signal(s, _as_interrupt)


def reinstall() -> None:
    """Take SIGTERM / SIGHUP back after ``ray.init``, whose core worker installs a SIGTERM handler of its
    own (it logs and aborts the process); a no-op outside :func:`stop_signals`."""
    if _active:
        _install()


@contextlib.contextmanager
def _held_back(act: bool) -> Iterator[None]:
    """Stop signals held for the block; when the outermost held block ends, acted on (``act``) or dropped."""
    _holding.append(True)
    try:
        yield
    finally:
        _holding.pop()
        if not _holding and _held:
            _held.clear()
            if act:
                _interrupt(None)


def deferred() -> contextlib.AbstractContextManager[None]:
    """Stop signals held back for the block and acted on when it ends: a step that must not be cut in
    two, such as creating a run and recording it. (Python-level: a process-directed signal may land on
    any thread, so a thread's signal mask would not hold it.) Nested in another held block, the outer
    block's end decides."""
    return _held_back(act=True)


def shielded() -> contextlib.AbstractContextManager[None]:
    """Stop signals recorded and otherwise ignored for the block: the steps that end a run already stopping
    (marking it KILLED), which a second Ctrl-C must not cut short. Nested in another held block, the outer
    block's end decides."""
    return _held_back(act=False)


@contextlib.contextmanager
def sigint_restored() -> Iterator[None]:
    """The SIGINT handler of before the block put back after it (main thread only): Ray Train's ``fit()``
    installs one that aborts its run's controller and leaves it behind."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    handler = signal.getsignal(signal.SIGINT)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, handler)


@contextlib.contextmanager
def stop_signals() -> Iterator[None]:
    """SIGTERM / SIGHUP handled as Ctrl-C for the block (main thread only); the old handlers restored."""
    _received.clear()
    old = {s: signal.getsignal(s) for s in (*STOP_SIGNALS, signal.SIGINT)}
    signal.signal(signal.SIGINT, _sigint)  # Ray Train replaces it while a run trains
    _install()
    _active.append(True)
    try:
        yield
    finally:
        _active.clear()
        for s, handler in old.items():
            signal.signal(s, handler)
