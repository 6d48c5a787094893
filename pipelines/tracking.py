"""MLflow tracking of a training run: where the store is, whether it answers, what gets logged per epoch.

The driver resolves the tracking URI (``--mlflow-uri``, else ``MLFLOW_TRACKING_URI``, else an absolute
``sqlite:///<cwd>/mlflow.db`` with artifacts in ``<cwd>/mlartifacts``) and checks that it answers before
any Ray worker starts; runs are made through :class:`pipelines.mlflow_run.MlflowRun`. During training,
:class:`MlflowReportCallback` runs on the Ray Train controller and logs each committed report (metrics
with step = epoch, the token-mask figure from the checkpoint), so a worker restart neither duplicates nor
loses an epoch.
"""

from __future__ import annotations

import base64
import logging
import os
import platform
import socket
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from importlib import metadata
from pathlib import Path

import pyarrow.fs
from mlflow import MlflowClient
from mlflow.entities import Metric, RunTag
from mlflow.exceptions import MlflowException
from ray.train import Checkpoint, UserCallback

from pipelines.checkpoints import MASKS_FILE
from pipelines.errors import TrackingError, first_line
from pipelines.trainer import NONFINITE

log = logging.getLogger(__name__)

DB_FILE = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
REACHABILITY_TIMEOUT_S = 5.0
PACKAGES = ("torch", "timm", "ray", "mlflow", "nvidia-dali-cuda130", "webdataset", "spot-vit")


def quiet_mlflow(verbose: bool = False) -> None:
    """No artifact-upload progress bars, and MLflow's INFO lines only when ``verbose``."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    logging.getLogger("mlflow").setLevel(logging.INFO if verbose else logging.WARNING)


def mlflow_env() -> dict[str, str]:
    """The driver's ``MLFLOW_*`` environment (a tracking server's credentials), for Ray processes; it travels
    in memory with the callback or trial, never to disk."""
    return {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_")}


def resolve_tracking_uri(uri: str | None, base: str | Path) -> str:
    """The tracking URI to use, with relative SQLite / file paths made absolute against ``base``."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(base).resolve() / DB_FILE}"
    if uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///"))
        return f"sqlite:///{path if path.is_absolute() else Path(base).resolve() / path}"
    if "://" not in uri and not uri.startswith(("databricks", "file:")):
        return (Path(base) / uri).resolve().as_uri()  # a bare directory: MLflow's file store
    return uri


def local_artifact_root(uri: str, base: str | Path) -> str | None:
    """Absolute artifact location ``<base>/mlartifacts`` for new experiments of a local store (None for a
    server, which decides itself)."""
    if uri.startswith(("sqlite:", "file:")):
        return (Path(base).resolve() / ARTIFACTS_DIR).as_uri()
    return None


def redact_uri(uri: str) -> str:
    """``uri`` with the password of its userinfo replaced by ``***`` (``http://user:***@host``)."""
    parts = urllib.parse.urlsplit(uri)
    if parts.password is None:
        return uri
    host = parts.netloc.rsplit("@", 1)[1]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


def _health_request(uri: str) -> urllib.request.Request:
    """``GET <uri>/health`` without the URI's userinfo (urllib would read it as part of the host name);
    credentials from the URI, else ``MLFLOW_TRACKING_USERNAME`` / ``_PASSWORD``, go in a Basic header."""
    parts = urllib.parse.urlsplit(uri)
    user, password = parts.username, parts.password
    if user is None:
        user = os.environ.get("MLFLOW_TRACKING_USERNAME")
        password = os.environ.get("MLFLOW_TRACKING_PASSWORD")
    bare = urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[-1]))
    request = urllib.request.Request(f"{bare.rstrip('/')}/health")
    if user is not None:
        token = base64.b64encode(f"{urllib.parse.unquote(user)}:{urllib.parse.unquote(password or '')}"
                                 .encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    return request


def check_reachable(uri: str, timeout_s: float = REACHABILITY_TIMEOUT_S) -> None:
    """Fail fast with :class:`TrackingError` if the tracking store cannot be used.

    HTTP(S): ``GET <uri>/health`` within ``timeout_s`` (no retries), then one authenticated API call.
    SQLite: the database's directory must exist and be writable.
    """
    if uri.startswith(("http://", "https://")):
        shown = redact_uri(uri)
        try:
            with urllib.request.urlopen(_health_request(uri), timeout=timeout_s) as response:
                response.read()
        except urllib.error.HTTPError as err:
            raise TrackingError(
                f"MLflow tracking server {shown} answered /health with HTTP {err.code}"
            ) from None
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise TrackingError(
                f"MLflow tracking server {shown} is unreachable ({reason}); start it or pass another "
                "--mlflow-uri"
            ) from None
        try:
            MlflowClient(uri).search_experiments(max_results=1)
        except MlflowException as err:
            raise TrackingError(
                f"MLflow tracking server {shown} refused the request: {first_line(err).replace(uri, shown)}"
            ) from None
    elif uri.startswith("sqlite:///"):
        directory = Path(uri.removeprefix("sqlite:///")).parent
        if not directory.is_dir() or not os.access(directory, os.W_OK):
            raise TrackingError(
                f"MLflow SQLite store {uri}: directory {directory} is missing or not writable"
            )


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
    import torch

    info = {
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "cpu_count": str(os.cpu_count()),
        "cuda": ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) or "none",
    }
    return info


def numeric_metrics(metrics: dict) -> dict[str, float]:
    """The loggable (numeric, non-bool) entries of a report."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}


class MlflowReportCallback(UserCallback):
    """Logs every committed ``ray.train.report`` to MLflow; runs on the Ray Train controller.

    The controller is a separate process started by Ray, so the driver's ``MLFLOW_*`` environment
    (credentials of a tracking server) travels with the callback and is applied there.
    """

    def __init__(self, tracking_uri: str, run_id: str) -> None:
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self._env = mlflow_env()
        self._client: MlflowClient | None = None
        self._failures = 0

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_client": None}

    def _mlflow(self) -> MlflowClient:
        if self._client is None:
            os.environ.update(self._env)
            self._client = MlflowClient(self.tracking_uri)
        return self._client

    def after_report(self, run_context, metrics: list[dict], checkpoint: Checkpoint | None) -> None:
        report = metrics[0]
        step = int(report["epoch"])
        now = int(time.time() * 1000)
        try:
            client = self._mlflow()
            if NONFINITE in report:  # the workers stopped: no metrics of this epoch, say why
                client.set_tag(self.run_id, NONFINITE, report[NONFINITE][:5000])
                return
            batch = [Metric(k, v, now, step) for k, v in sorted(numeric_metrics(report).items())]
            client.log_batch(self.run_id, metrics=batch)
            if checkpoint is not None:
                client.set_tag(self.run_id, "latest_checkpoint", checkpoint.path)
                self._log_masks(client, checkpoint, step)
        except Exception as err:  # never let tracking take the training run down
            log.warning("MLflow logging of epoch %d failed: %s", step, first_line(err))

    def _log_masks(self, client: MlflowClient, checkpoint: Checkpoint, step: int) -> None:
        source = f"{checkpoint.path}/{MASKS_FILE}"
        if checkpoint.filesystem.get_file_info(source).type != pyarrow.fs.FileType.File:
            return  # dense model: no token masks
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / f"epoch_{step:03d}.png"
            with checkpoint.filesystem.open_input_stream(source) as src:
                local.write_bytes(src.read())
            client.log_artifact(self.run_id, str(local), "token_masks")

    def after_exception(self, run_context, worker_exceptions: dict) -> None:
        self._failures += 1
        rank, error = next(iter(sorted(worker_exceptions.items())))
        try:
            self._mlflow().log_batch(
                self.run_id,
                tags=[
                    RunTag("worker_failures", str(self._failures)),
                    RunTag("last_worker_error", f"rank {rank}: {first_line(error)}"[:5000]),
                ],
            )
        except Exception as err:
            log.warning("MLflow logging of a worker failure failed: %s", first_line(err))
