"""The one way a driver gets Ray: join a cluster or start a local Ray, checked before any work, quiet.

A local Ray is started with its State API address in its processes' environment: Ray Train's
placement-group cleaner asks the State API whether a stopped run's controller is gone, and with several
local Ray instances on one host it cannot tell which one to ask, so the stopped run's workers would keep
their CPUs and the next run would wait forever. Without ``verbose``, Ray's INFO lines stay off the
console (the workers' per-report lines are silenced in :mod:`pipelines.training.worker`).

A local Ray runs on one host, which no cluster drains: its Ray Train runs go without Ray Train's preemption
watcher (``RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=0``, unless set), whose actor otherwise makes the core
worker log an ERROR line about its restart arguments in every run. A new local Ray with ``RAY_AUTH_MODE``
unset turns token authentication on (Ray's default) and logs a WARNING that it did; without ``verbose``
that logger is kept at ERROR during ``ray.init`` (on this path it can only say that). Setting
``RAY_AUTH_MODE`` itself is not possible here: Ray reads it once at import (docs/tracking.md).

A local Ray's processes are children of the driver, in its process group. Ray blocks SIGINT in them, so that
a terminal's Ctrl-C reaches the driver only; SIGTERM and SIGHUP, which the commands handle as Ctrl-C
(:mod:`pipelines.utils.signals`), reach a whole process group too (``kill -- -PGID``, a closed terminal), so
they are blocked in the driver while Ray starts and Ray's processes (and the workers they start) inherit them
blocked: the driver ends its runs on a Ray that is still up. The price: ``ray.shutdown``'s SIGTERM to each
of Ray's processes waits out its grace period before the SIGKILL (docs/benchmarks.md), and a stop signal to
the group no longer stops a hung command's Ray; the driver's death does (Ray's processes die with their
parent), so SIGKILL to the driver does.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import ray
from ray._private.state import state

from pipelines.utils import signals
from pipelines.utils.errors import ConfigError, RayStartError, first_line
from pipelines.utils.ports import free_port

API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"
RAY_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"
PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"
PROBE_TIMEOUT_S = 5.0
# Ray gives a new local node a fixed 30 s to register its raylet, which a busy machine can exceed: start twice
START_ATTEMPTS = 2


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


def start_local_ray(num_cpus: int | None = None, *, verbose: bool = False) -> None:
    """``ray.init`` of a local Ray with the State API workaround (see the module docstring), tried
    ``START_ATTEMPTS`` times (the processes of a failed try are stopped). Raises ``RayStartError``."""
    port = free_port()
    os.environ[API_SERVER_ENV] = f"http://127.0.0.1:{port}"
    os.environ.setdefault(PREEMPTION_WATCHER_ENV, "0")  # one host: nothing to drain (module docstring)
    # A new local Ray turns token authentication on when RAY_AUTH_MODE is unset and says so at WARNING
    # level, the only thing its auth logger can say on this path (module docstring); --verbose shows it.
    auth_log = logging.getLogger(RAY_AUTH_LOGGER)
    level = auth_log.level
    if not verbose:
        auth_log.setLevel(logging.ERROR)
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, signals.STOP_SIGNALS)  # inherited by Ray's processes
    options = dict(num_cpus=num_cpus, include_dashboard=True, dashboard_port=port, **quiet_kwargs(verbose))
    try:
        for attempt in range(1, START_ATTEMPTS + 1):
            before = {child.pid for child in psutil.Process().children()}
            try:
                ray.init(**options)
                break
            except Exception as err:  # noqa: BLE001 - Ray raises a bare Exception when its raylet is late
                if type(err) is not Exception:  # any other error is no slow start: as it is
                    raise
                _stop_started_processes(before)
                if attempt == START_ATTEMPTS:
                    raise RayStartError(f"the local Ray did not start ({first_line(err)}); on a busy machine "
                                        "try again, or start Ray once with `ray start --head` and pass "
                                        "--address") from None
                print(f"the local Ray did not start ({first_line(err)}); starting it once more",
                      file=sys.stderr)
    finally:
        auth_log.setLevel(level)
        signals.reinstall()  # ray.init set a SIGTERM handler of its own
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # one held meanwhile reaches the command's handler


def _stop_started_processes(before: set[int]) -> None:
    """Kill the processes a failed ``ray.init`` left running (the driver's children not in ``before``): Ray
    forgets the node it could not finish starting, so ``ray.shutdown`` would not stop them."""
    ray.shutdown()
    started = [child for child in psutil.Process().children() if child.pid not in before]
    for child in started:
        tree = [child]
        with contextlib.suppress(psutil.NoSuchProcess):
            tree = [*child.children(recursive=True), child]
        for process in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
    psutil.wait_procs(started, timeout=10)


def quiet_kwargs(verbose: bool) -> dict:
    """``ray.init`` arguments that keep the driver's Ray INFO lines off the console unless ``verbose``."""
    return {} if verbose else {"logging_level": logging.WARNING}


# file systems other machines can mount too (a local --storage on a cluster must be on one)
SHARED_FILE_SYSTEMS = ("nfs", "nfs4", "efs", "cifs", "smb3", "smbfs", "lustre", "ceph", "glusterfs", "gpfs",
                       "beegfs", "fuse.s3fs", "fuse.gcsfuse", "fuse.mountpoint-s3", "fuse.juicefs", "9p")


def _autoscaler_resources() -> dict | None:
    """The most resources the cluster's autoscaler can bring up, if it reported its node types to Ray."""
    try:
        return state.get_max_resources_from_cluster_config()
    except Exception:  # noqa: BLE001 - a private API; without it the cluster shows only what is up
        return None


def worker_gpus(gpus_per_worker: float | None, num_workers: int, address: str) -> float:
    """GPUs per worker on the joined cluster ``address``: as given, else 1 when the cluster has GPUs or its
    autoscaler can start GPU nodes; a cluster that shows neither is refused (it may be scaling from zero:
    the GPUs up right now decide nothing). Raises ``ConfigError`` naming ``--gpus-per-worker``."""
    if gpus_per_worker is not None:
        return gpus_per_worker
    gpus = max(ray.cluster_resources().get("GPU", 0), (_autoscaler_resources() or {}).get("GPU", 0))
    if gpus:
        return 1
    raise ConfigError(f"--address {address}: the cluster shows no GPU now and reports none it can start; "
                      "pass --gpus-per-worker (0: train on CPUs; 1: wait for GPU nodes)")


def _mount_type(path: str) -> str:
    """The file system type of the mount holding ``path`` (longest matching mount point)."""
    best, kind = "", "unknown"
    try:
        mounts = [line.split()[1:3] for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return kind
    for point, fstype in mounts:
        point = point.replace("\\040", " ")
        if (path == point or path.startswith(point.rstrip("/") + "/")) and len(point) > len(best):
            best, kind = point, fstype
    return kind


def check_shared_storage(storage: str, address: str, declared_shared: bool = False) -> None:
    """A local ``--storage`` on a joined cluster must be readable by every node: on a shared file system
    (recognised, or ``declared_shared`` by ``--shared-storage``), or the cluster is this machine alone (no
    node elsewhere, no autoscaler that can add one). Raises ``ConfigError`` naming ``--storage``."""
    if "://" in storage or declared_shared:
        return
    kind = _mount_type(os.path.realpath(storage))
    if kind in SHARED_FILE_SYSTEMS:
        return
    here = {ray.util.get_node_ip_address(), "127.0.0.1", socket.gethostbyname(socket.gethostname())}
    elsewhere = sorted({n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]} - here)
    scaling = bool(_autoscaler_resources())
    if elsewhere or scaling:
        who = f"nodes {', '.join(elsewhere)}" if elsewhere else "nodes its autoscaler starts"
        raise ConfigError(f"--storage {storage}: a local {kind} path that the other {who} of --address "
                          f"{address} cannot read; use s3://, gs:// or a shared file system (NFS, EFS; "
                          "--shared-storage if it is one)")


@contextlib.contextmanager
def ray_session(
    address: str | None = None,
    *,
    need_cpus: float | None = None,
    num_cpus: int | None = None,
    verbose: bool = False,
) -> Iterator[bool]:
    """Ray initialised for the block: ``address`` joined (probed first), else a local Ray started (with
    ``num_cpus``) and shut down at the end; an already initialised Ray is used as it is. SIGTERM / SIGHUP
    stay the command's (:func:`pipelines.utils.signals.reinstall`). ``need_cpus`` is checked against a local
    Ray. Yields whether Ray was started here. Raises ``ConfigError``."""
    if ray.is_initialized():
        yield False
        return
    if address is not None:
        probe_address(address)
        try:
            ray.init(address=address, **quiet_kwargs(verbose))
        except (ConnectionError, RuntimeError, ValueError) as err:
            raise ConfigError(f"--address {address}: {first_line(err)}") from None
        finally:
            signals.reinstall()  # ray.init set a SIGTERM handler of its own
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
