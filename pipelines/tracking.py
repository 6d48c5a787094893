"""MLflow tracking for a training run: where the store is, one run per training run, what gets logged.

The driver resolves the tracking URI (``--mlflow-uri``, else ``MLFLOW_TRACKING_URI``, else an absolute
``sqlite:///<cwd>/mlflow.db`` with artifacts in ``<cwd>/mlartifacts``),
checks that it answers before any Ray worker starts, creates the experiment and the run (or reopens it on
``--resume``) and logs params and tags. During training, :class:`MlflowReportCallback` runs on the Ray
Train controller and logs each committed report (metrics with step = epoch, the token-mask figure from the
checkpoint), so a worker restart neither duplicates nor loses an epoch. The driver ends the run after
registering the model.
"""

from __future__ import annotations

import logging
import os
import platform
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from importlib import metadata
from pathlib import Path

import pyarrow.fs
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from ray.train import Checkpoint, UserCallback

from pipelines.checkpoints import MASKS_FILE
from pipelines.errors import TrackingError, first_line

log = logging.getLogger(__name__)

DB_FILE = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
REACHABILITY_TIMEOUT_S = 5.0
RUN_NAME_TAG = "ray_train_run"
PACKAGES = ("torch", "timm", "ray", "mlflow", "nvidia-dali-cuda130", "webdataset", "spot-vit")


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


def check_reachable(uri: str, timeout_s: float = REACHABILITY_TIMEOUT_S) -> None:
    """Fail fast with :class:`TrackingError` if the tracking store cannot be used.

    HTTP(S): ``GET <uri>/health`` within ``timeout_s`` (no retries), then one authenticated API call.
    SQLite: the database's directory must exist and be writable.
    """
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s) as response:
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


def ensure_experiment(client: MlflowClient, name: str, artifact_location: str | None) -> str:
    """Id of experiment ``name``, created (with ``artifact_location``) if it does not exist."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except MlflowException:  # created concurrently by another driver
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def start_run(
    uri: str,
    experiment: str,
    run_name: str,
    *,
    artifact_location: str | None,
    run_id: str | None = None,
    tags: dict[str, str] | None = None,
) -> str:
    """Create the run named ``run_name`` with ``tags`` (returns its id), or reopen ``run_id`` (``--resume``).

    Creating the store, experiment and run here on the driver, before workers start, avoids SQLite races.
    """
    client = MlflowClient(uri)
    try:
        if run_id is not None:
            client.get_run(run_id)
            client.update_run(run_id, status="RUNNING")
            return run_id
        experiment_id = ensure_experiment(client, experiment, artifact_location)
        tags = {**(tags or {}), RUN_NAME_TAG: run_name}
        return client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id
    except MlflowException as err:
        raise TrackingError(f"MLflow store {uri}: {first_line(err)}") from None


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
    except OSError:
        return None
    return out.stdout.strip() if out.returncode == 0 else None


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
    if commit := _git_commit():
        info["mlflow.source.git.commit"] = commit
    return info


def log_params(uri: str, run_id: str, params: dict) -> None:
    """Log ``params`` (values as strings, None as "None")."""
    MlflowClient(uri).log_batch(run_id, params=[Param(k, str(v)) for k, v in sorted(params.items())])


def set_tags(uri: str, run_id: str, tags: dict) -> None:
    MlflowClient(uri).log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in sorted(tags.items())])


def numeric_metrics(metrics: dict) -> dict[str, float]:
    """The loggable (numeric, non-bool) entries of a report."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def metric_table(uri: str, run_id: str, keys: list[str]) -> list[dict]:
    """Per-epoch rows ``{"epoch": e, key: last value logged at step e}`` from the run's metric history."""
    client = MlflowClient(uri)
    rows: dict[int, dict] = {}
    for key in keys:
        for metric in sorted(client.get_metric_history(run_id, key), key=lambda m: m.timestamp):
            rows.setdefault(metric.step, {"epoch": metric.step})[key] = metric.value
    return [rows[e] for e in sorted(rows)]


class MlflowReportCallback(UserCallback):
    """Logs every committed ``ray.train.report`` to MLflow; runs on the Ray Train controller.

    The controller is a separate process started by Ray, so the driver's ``MLFLOW_*`` environment
    (credentials of a tracking server) travels with the callback and is applied there.
    """

    def __init__(self, tracking_uri: str, run_id: str) -> None:
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self._env = {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_")}
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


def end_run(uri: str, run_id: str, status: str) -> None:
    """Mark the run ``FINISHED``, ``FAILED`` or ``KILLED``."""
    MlflowClient(uri).set_terminated(run_id, status)
