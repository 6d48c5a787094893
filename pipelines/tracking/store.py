"""MLflow tracking of a training run: where the store is, whether it answers, what gets logged per epoch.

The driver resolves the tracking URI (:mod:`pipelines.tracking.uri`; artifacts of a local store in
``<cwd>/mlartifacts``) and checks that it answers before any Ray worker starts; runs are made through
:class:`pipelines.tracking.mlflow_run.MlflowRun`; during training,
:class:`pipelines.tracking.report_callback.MlflowReportCallback` logs each epoch.
"""

from __future__ import annotations

import base64
import logging
import os
import platform
import socket
import time
import urllib.error
import urllib.request
from importlib import metadata
from pathlib import Path

import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from pipelines.tracking.uri import CREDENTIAL_VARS
from pipelines.utils.errors import TrackingError, first_line

log = logging.getLogger(__name__)

ARTIFACTS_DIR = "mlartifacts"
REACHABILITY_TIMEOUT_S = 5.0
PACKAGES = ("torch", "timm", "ray", "mlflow", "nvidia-dali-cuda130", "webdataset", "spot-vit")


def quiet_mlflow(verbose: bool = False) -> None:
    """No artifact-upload progress bars; MLflow's INFO lines and, with a tracking server, its "View run"
    links at each run's end (they open the UI's GenAI view: docs/tracking.md) only when ``verbose``."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if not verbose:
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    logging.getLogger("mlflow").setLevel(logging.INFO if verbose else logging.WARNING)


def credential_names() -> tuple[str, ...]:
    """The names of the tracking-server credentials set in this process's environment (never their values:
    Ray processes read their own environment, the one ``ray start`` or the local Ray session gave them)."""
    return tuple(name for name in CREDENTIAL_VARS if os.environ.get(name))


def local_artifact_root(uri: str, base: str | Path) -> str | None:
    """Absolute artifact location ``<base>/mlartifacts`` for new experiments of a local store (None for a
    server, which decides itself)."""
    if uri.startswith(("sqlite:", "file:")):
        return (Path(base).resolve() / ARTIFACTS_DIR).as_uri()
    return None


def _health_request(uri: str) -> urllib.request.Request:
    """``GET <uri>/health``, with ``MLFLOW_TRACKING_USERNAME`` / ``_PASSWORD`` in a Basic header if set."""
    request = urllib.request.Request(f"{uri.rstrip('/')}/health")
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if user:
        token = base64.b64encode(f"{user}:{os.environ.get('MLFLOW_TRACKING_PASSWORD', '')}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    return request


def check_reachable(uri: str, timeout_s: float = REACHABILITY_TIMEOUT_S) -> None:
    """Fail fast with :class:`TrackingError` if the tracking store cannot be used.

    HTTP(S): ``GET <uri>/health`` within ``timeout_s`` (no retries), then one authenticated API call.
    SQLite: the database's directory must exist and be writable.
    """
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(_health_request(uri), timeout=timeout_s) as response:
                response.read()
        except urllib.error.HTTPError as err:
            raise TrackingError(
                f"MLflow tracking server {uri} answered /health with HTTP {err.code}"
            ) from None
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise TrackingError(
                f"MLflow tracking server {uri} is unreachable ({reason}); start it or pass another "
                "--mlflow-uri"
            ) from None
        try:
            MlflowClient(uri).search_experiments(max_results=1)
        except MlflowException as err:
            raise TrackingError(
                f"MLflow tracking server {uri} refused the request: {first_line(err)}"
            ) from None
    elif uri.startswith("sqlite:///"):
        directory = Path(uri.removeprefix("sqlite:///")).parent
        if not directory.is_dir() or not os.access(directory, os.W_OK):
            raise TrackingError(
                f"MLflow SQLite store {uri}: directory {directory} is missing or not writable"
            )


def wait_until_reachable(uri: str, wait_s: float, poll_s: float = 2.0) -> None:
    """:func:`check_reachable`, retried every ``poll_s`` for up to ``wait_s`` seconds (one warning while
    waiting); raises the last :class:`TrackingError`."""
    deadline = time.monotonic() + wait_s
    warned = False
    while True:
        try:
            check_reachable(uri)
            return
        except TrackingError as err:
            if time.monotonic() >= deadline:
                raise
            if not warned:
                log.warning("%s; waiting up to %.0f s (--mlflow-wait)", first_line(err), wait_s)
                warned = True
            time.sleep(poll_s)


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def versions() -> dict[str, str]:
    """Versions of the packages that decide what a run computes (logged as params)."""
    return {f"version_{p.replace('-', '_')}": _version(p) for p in PACKAGES} | {
        "version_python": platform.python_version()
    }


def system_info() -> dict[str, str]:
    """Where the driver runs (logged as tags; they may change on ``--resume``)."""
    info = {
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "cpu_count": str(os.cpu_count()),
        "cuda": ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) or "none",
    }
    return info
