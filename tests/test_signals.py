"""pipelines/utils/signals.py with real signals to this process: SIGTERM / SIGHUP as Ctrl-C, held for a step
that must not be cut in two, ignored while a stopped run is being marked; the SIGINT handler put back."""

import os
import signal
import time

import pytest

from pipelines.utils import signals


def _signal(signum: int) -> None:
    """``signum`` to this process, delivered (Python runs handlers between bytecodes of the main thread)."""
    os.kill(os.getpid(), signum)
    time.sleep(0.05)


def test_sigterm_inside_stop_signals_is_a_keyboard_interrupt_and_named():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt), signals.stop_signals():
        _signal(signal.SIGTERM)
    assert signals.name() == "SIGTERM" and signals.exit_code() == 143
    assert signal.getsignal(signal.SIGTERM) is before  # the handlers of before are back


def test_a_signal_held_by_deferred_is_acted_on_when_the_step_ends():
    steps = []
    with pytest.raises(KeyboardInterrupt), signals.stop_signals():
        with signals.deferred():
            _signal(signal.SIGHUP)
            steps.append("recorded")  # the step goes on to its end
        steps.append("after")  # never reached: the signal is acted on as the step ends
    assert steps == ["recorded"] and signals.name() == "SIGHUP"


def test_signals_while_shielded_are_recorded_and_ignored():
    steps = []
    with signals.stop_signals():
        with signals.shielded():
            _signal(signal.SIGTERM)
            _signal(signal.SIGINT)  # a second Ctrl-C while the run is being marked
            steps.append("marked")
        steps.append("after")
    assert steps == ["marked", "after"] and signals.name() == "SIGTERM"


def test_nested_held_blocks_leave_the_decision_to_the_outer_one():
    steps = []
    with pytest.raises(KeyboardInterrupt), signals.stop_signals():
        with signals.deferred():
            with signals.shielded():
                _signal(signal.SIGTERM)
            steps.append("inner ended")  # the inner block's end neither acts on nor drops the signal
        steps.append("after")  # never reached: the outer block acts on it as it ends
    assert steps == ["inner ended"] and signals.name() == "SIGTERM"
    with signals.stop_signals():
        with signals.shielded():
            with signals.deferred():
                _signal(signal.SIGHUP)
            steps.append("still marking")
        steps.append("after the shield")  # the outer shield dropped it
    assert steps[1:] == ["still marking", "after the shield"]


def test_sigint_restored_puts_back_the_handler_of_before():
    def replacement(signum, frame):
        raise AssertionError("not this one")

    before = signal.getsignal(signal.SIGINT)
    with signals.sigint_restored():
        signal.signal(signal.SIGINT, replacement)  # as Ray Train's fit() does
    assert signal.getsignal(signal.SIGINT) is before
