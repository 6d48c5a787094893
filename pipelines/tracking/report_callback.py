"""The per-epoch MLflow logging of a training run: a Ray Train callback on the Train controller.

It logs each committed report (metrics with step = epoch, the token-mask figure from the checkpoint), so a
worker restart neither duplicates nor loses an epoch, and a report MLflow cannot take waits in the run's
storage (:mod:`pipelines.tracking.pending_reports`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Collection

from mlflow import MlflowClient
from mlflow.entities import RunTag
from ray.train import Checkpoint, UserCallback

from pipelines.storage.checkpoints import checkpoint_uri
from pipelines.storage.location import RunLocation
from pipelines.tracking.pending_reports import PENDING_RECORD, NotSent, pending, report_entry, send
from pipelines.tracking.store import REACHABILITY_TIMEOUT_S, credential_names
from pipelines.utils.errors import first_line

log = logging.getLogger(__name__)


class MlflowReportCallback(UserCallback):
    """Logs every committed ``ray.train.report`` to MLflow; runs on the Ray Train controller.

    The controller is a process started by Ray: it authenticates with the credentials in its own
    environment (named by :func:`credential_names` on the driver; their values never travel through Ray).
    Requests fail fast there (no MLflow retries): a report that cannot be sent waits in the run's pending
    record (:mod:`pipelines.tracking.pending_reports`) and goes with the next one, or with the driver at the
    end. ``run_values`` are the report's entries of the whole run, not logged as series (the worker's
    ``RUN_VALUES``).
    """

    def __init__(
        self, tracking_uri: str, run_id: str, location: RunLocation, *, run_values: Collection[str]
    ) -> None:
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.location = location
        self.run_values = tuple(run_values)
        self.credentials = credential_names()
        self._client: MlflowClient | None = None
        self._queue: list[dict] | None = None
        self._failures = 0

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_client": None}

    def _mlflow(self) -> MlflowClient:
        if self._client is None:
            os.environ.update({"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
                               "MLFLOW_HTTP_REQUEST_TIMEOUT": str(int(REACHABILITY_TIMEOUT_S * 2))})
            missing = [name for name in self.credentials if not os.environ.get(name)]
            if missing:
                log.warning("%s set for the driver but not in the Ray processes' environment: set it where "
                            "`ray start` runs (docs/cluster.md); epochs wait for the driver to send them",
                            ", ".join(missing))
            self._client = MlflowClient(self.tracking_uri)
        return self._client

    def after_report(self, run_context, metrics: list[dict], checkpoint: Checkpoint | None) -> None:
        path = None if checkpoint is None else checkpoint_uri(checkpoint)
        entry = report_entry(metrics[0], path, int(time.time() * 1000), self.run_values)
        if self._queue is None:  # a restarted controller picks up what its predecessor could not send
            self._queue = pending(self.location)
        self._queue.append(entry)
        try:
            send(self._mlflow(), self.run_id, self.location, self._queue)
            self._queue = []
        except Exception as err:  # never let tracking take the training run down
            self._queue = err.entries if isinstance(err, NotSent) else self._queue
            log.warning("MLflow logging of epoch %d failed (%s); %d epoch(s) kept in %s and sent when the "
                        "server answers", entry["step"], first_line(err), len(self._queue),
                        self.location.file(PENDING_RECORD))

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
