"""The one way a driver gets Ray: join a cluster or start a local Ray, checked before any work, quiet.

A local Ray is started with its State API address in its processes' environment: Ray Train's
placement-group cleaner asks the State API whether a stopped run's controller is gone, and with several
local Ray instances on one host it cannot tell which one to ask, so the stopped run's workers would keep
their CPUs and the next run would wait forever. Without ``verbose``, Ray's INFO lines stay off the
console (the workers' per-report lines are silenced in :mod:`pipelines.training.worker`).

A local Ray runs on one host, which no cluster drains: its Ray Train runs go without Ray Train's preemption
watcher (``RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=0``, unless set), whose actor otherwise makes the core
worker log an ERROR line about its restart arguments in every run. Ray's token-auth WARNING of a local
Ray goes away when ``RAY_AUTH_MODE`` is set before Ray is imported (``make demo`` sets ``token``;
docs/tracking.md).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator

import ray

from pipelines.utils.errors import ConfigError, first_line

API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"
PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"
PROBE_TIMEOUT_S = 5.0


def probe_address(address: str, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """Fail fast if a ``host:port`` or ``ray://host:port`` address does not accept connections (``ray.init``
    itself retries for minutes)."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return  # "auto" and friends: Ray resolves them itself
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as err:
        raise ConfigError(f"--address {address}: no Ray cluster answers there ({err})") from None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_local_ray(num_cpus: int | None = None, *, verbose: bool = False) -> None:
    """``ray.init`` of a local Ray with the State API workaround (see the module docstring)."""
    port = _free_port()
    os.environ[API_SERVER_ENV] = f"http://127.0.0.1:{port}"
    os.environ.setdefault(PREEMPTION_WATCHER_ENV, "0")  # one host: nothing to drain (module docstring)
    ray.init(num_cpus=num_cpus, include_dashboard=True, dashboard_port=port, **quiet_kwargs(verbose))


def quiet_kwargs(verbose: bool) -> dict:
    """``ray.init`` arguments that keep the driver's Ray INFO lines off the console unless ``verbose``."""
    return {} if verbose else {"logging_level": logging.WARNING}


@contextlib.contextmanager
def ray_session(
    address: str | None = None,
    *,
    need_cpus: float | None = None,
    num_cpus: int | None = None,
    verbose: bool = False,
) -> Iterator[bool]:
    """Ray initialised for the block: ``address`` joined (probed first), else a local Ray started (with
    ``num_cpus``) and shut down at the end; an already initialised Ray is used as it is. ``need_cpus``
    is checked against a local Ray. Yields whether Ray was started here. Raises ``ConfigError``."""
    if ray.is_initialized():
        yield False
        return
    if address is not None:
        probe_address(address)
        try:
            ray.init(address=address, **quiet_kwargs(verbose))
        except (ConnectionError, RuntimeError, ValueError) as err:
            raise ConfigError(f"--address {address}: {first_line(err)}") from None
        try:
            yield False
        finally:
            ray.shutdown()
        return
    start_local_ray(num_cpus, verbose=verbose)
    try:
        have = ray.cluster_resources().get("CPU", 0)
        if need_cpus is not None and need_cpus > have:
            raise ConfigError(f"the run needs {need_cpus:g} CPUs; the local Ray has {have:g} (lower "
                              "--num-workers / --cpus-per-worker)")
        yield True
    finally:
        ray.shutdown()
        os.environ.pop(API_SERVER_ENV, None)
