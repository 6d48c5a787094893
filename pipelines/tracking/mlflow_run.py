"""The one handle on an MLflow run: create (with MLflow's own context tags), reopen, find a child, log,
end. Every run of the project (fine-tuning, sweep and trial, evaluation) is made here, on the driver,
before any worker starts: concurrent first use of a SQLite store races.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
from mlflow.tracking.context.registry import resolve_tags
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE

from pipelines.tracking import store
from pipelines.tracking.datasets import log_shard_inputs
from pipelines.tracking.lineage import log_model_inputs
from pipelines.utils.errors import TrackingError, first_line

PARENT_TAG = "mlflow.parentRunId"
SYSTEM_METRICS_STOP_S = 15.0  # MLflow's monitor samples every 10 s, then flushes


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


@dataclass(frozen=True)
class MlflowRun:
    """An MLflow run of the tracking store ``uri``."""

    uri: str
    run_id: str

    @classmethod
    def create(
        cls,
        uri: str,
        experiment: str,
        name: str,
        *,
        artifact_location: str | None = None,
        tags: dict | None = None,
        parent: MlflowRun | None = None,
    ) -> MlflowRun:
        """A new run ``name`` in ``experiment`` (created if needed) with MLflow's context tags (user,
        source, git commit), ``tags`` and, for a child, its ``parent``. Raises ``TrackingError``."""
        client = MlflowClient(uri)
        tags = (tags or {}) | ({PARENT_TAG: parent.run_id} if parent else {})
        try:
            experiment_id = ensure_experiment(client, experiment, artifact_location)
            info = client.create_run(experiment_id, run_name=name, tags=resolve_tags(tags)).info
        except MlflowException as err:
            raise TrackingError(f"MLflow store {uri}: {first_line(err)}") from None
        return cls(uri, info.run_id)

    @classmethod
    def reopen(cls, uri: str, run_id: str) -> MlflowRun:
        """Mark an existing run RUNNING again (``--resume``, a retried trial). Raises ``TrackingError``."""
        client = MlflowClient(uri)
        try:
            client.get_run(run_id)
            client.update_run(run_id, status="RUNNING")
        except MlflowException as err:
            raise TrackingError(f"MLflow store {uri}: {first_line(err)}") from None
        return cls(uri, run_id)

    @property
    def client(self) -> MlflowClient:
        return MlflowClient(self.uri)

    @property
    def info(self):
        return self.client.get_run(self.run_id).info

    def find_child(self, tag: str, value: str) -> MlflowRun | None:
        """The child run of this one whose ``tag`` is ``value``, if there is one."""
        runs = self.client.search_runs(
            [self.info.experiment_id],
            filter_string=f"tags.{tag} = '{value}' and tags.`{PARENT_TAG}` = '{self.run_id}'",
        )
        return MlflowRun(self.uri, runs[0].info.run_id) if runs else None

    def running_children(self) -> list[MlflowRun]:
        """The child runs of this one that are still RUNNING."""
        runs = self.client.search_runs(
            [self.info.experiment_id],
            filter_string=f"attributes.status = 'RUNNING' and tags.`{PARENT_TAG}` = '{self.run_id}'",
        )
        return [MlflowRun(self.uri, r.info.run_id) for r in runs]

    def log_params(self, params: dict) -> None:
        """Log ``params`` (values as strings, None as "None")."""
        self.client.log_batch(self.run_id, params=[Param(k, str(v)) for k, v in sorted(params.items())])

    def set_tags(self, tags: dict) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in sorted(tags.items())])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        for key, value in metrics.items():
            self.client.log_metric(self.run_id, key, value, step=step)

    def log_text(self, text: str, path: str) -> None:
        self.client.log_text(self.run_id, text, path)

    def log_dict(self, data: dict, path: str) -> None:
        self.client.log_dict(self.run_id, data, path)

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, local_path, artifact_path)

    def metric_history(self, keys: list[str]) -> list[dict]:
        """Per-epoch rows ``{"epoch": e, key: last value logged at step e}``."""
        rows: dict[int, dict] = {}
        for key in keys:
            for metric in sorted(self.client.get_metric_history(self.run_id, key), key=lambda m: m.timestamp):
                rows.setdefault(metric.step, {"epoch": metric.step})[key] = metric.value
        return [rows[e] for e in sorted(rows)]

    @contextlib.contextmanager
    def system_metrics(self) -> Iterator[None]:
        """MLflow's system metrics (``system/*``: CPU, memory, disk, network, GPU where present) of this
        host, sampled into the run while the block runs; continued, not restarted, on a reopened run. Best
        effort: stopping it waits at most ``SYSTEM_METRICS_STOP_S`` (an unreachable server must not hold the
        run's end)."""
        monitor = SystemMetricsMonitor(self.run_id, resume_logging=True, tracking_uri=self.uri)
        monitor.start()
        try:
            yield
        finally:
            stopper = threading.Thread(target=monitor.finish, daemon=True, name="stop-system-metrics")
            stopper.start()
            stopper.join(SYSTEM_METRICS_STOP_S)

    def end(self, status: str) -> None:
        """Mark the run ``FINISHED``, ``FAILED`` or ``KILLED``."""
        self.client.set_terminated(self.run_id, status)

    def activate(self):
        """The run as MLflow's active run, for APIs that log into it (``mlflow.pyfunc.log_model``)."""
        mlflow.set_tracking_uri(self.uri)
        return mlflow.start_run(run_id=self.run_id)


def log_results(
    uri: str,
    experiment: str,
    name: str,
    *,
    params: dict,
    metrics: dict[str, float],
    text: tuple[str, str],
    artifacts: dict[str, list] | None = None,
    data: str | None = None,
    models: dict[str, str] | None = None,
    table: tuple[list[dict], str] | None = None,
    parent: MlflowRun | None = None,
    description: str | None = None,
) -> str:
    """One finished run ``name`` holding an evaluation's results: ``params``, ``metrics``, ``text`` as
    ``(artifact path, content)``, local files by artifact directory, the val split of the shard directory
    ``data`` as its dataset input, the evaluated ``models`` (role -> URI) with their registered versions and
    source runs (:func:`pipelines.tracking.lineage.log_model_inputs`), ``table`` as ``(rows, artifact file)``
    through ``log_table``, the run page's ``description`` and, if given, its ``parent`` run. Checks the store
    first (raises ``TrackingError``); returns the run id."""
    store.check_reachable(uri)
    artifact_root = store.local_artifact_root(uri, Path.cwd())
    tags = {MLFLOW_RUN_NOTE: description} if description else None
    run = MlflowRun.create(uri, experiment, name, artifact_location=artifact_root, tags=tags, parent=parent)
    try:  # every way out ends it: KILLED on a stop signal, FAILED on an error (as far as MLflow can take it)
        run.log_params(params)
        if models:
            log_model_inputs(run, models)
        if data is not None:
            log_shard_inputs(run.client, run.run_id, data, ("val",))
        run.log_metrics(metrics)
        path, content = text
        run.log_text(content, path)
        if table is not None:
            rows, artifact_file = table
            columns = {key: [row.get(key) for row in rows] for key in rows[0]}
            run.client.log_table(run.run_id, columns, artifact_file)
        for directory, files in (artifacts or {}).items():
            for file in files:
                run.log_artifact(str(file), directory)
    except BaseException as err:
        with contextlib.suppress(MlflowException):
            run.end("KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        raise
    run.end("FINISHED")
    return run.run_id
