"""Epoch reports that could not reach MLflow yet: none is lost while the tracking server is down.

The Train controller sends each epoch's report to MLflow
(:class:`pipelines.tracking.report_callback.MlflowReportCallback`). When that fails, the report and every
later one
wait, in order, in the run's ``mlflow_pending.json`` (written atomically) and are sent at the next
epoch, by the driver at the end of the run, or by the ``--resume`` that finishes it. Each entry keeps the
time it was reported, so sending it twice (a send that failed half-way) stores no second value: MLflow's
stores skip an identical metric.
"""

from __future__ import annotations

import io
from collections.abc import Collection
from pathlib import PurePosixPath

import pyarrow.fs
from mlflow import MlflowClient
from mlflow.entities import Metric, RunTag
from PIL import Image

from pipelines.storage.checkpoints import MASKS_FILE
from pipelines.storage.location import RunLocation
from pipelines.storage.run_record import STOPPED, delete_record, read_record, write_record
from pipelines.utils.errors import first_line

PENDING_RECORD = "mlflow_pending.json"
MASKS_IMAGE_KEY = "token_masks"
STEP = "epoch"  # the report entry that is MLflow's step


def numeric_metrics(report: dict, run_values: Collection[str]) -> dict[str, float]:
    """A report's per-epoch series: its numeric (not bool) entries but the step and ``run_values``."""
    skip = {STEP, *run_values}
    return {k: float(v) for k, v in report.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and k not in skip}


def report_entry(
    report: dict, checkpoint_path: str | None, time_ms: int, run_values: Collection[str]
) -> dict:
    """What MLflow gets of one ``ray.train.report``: its per-epoch series at step = epoch (not the
    ``run_values``, the report's entries of the whole run: the worker says which), tags, and the checkpoint
    (by directory name in the run's storage) whose token-mask figure goes along."""
    entry = {"step": int(report[STEP]), "time_ms": time_ms, "metrics": {}, "tags": {}, "checkpoint": None}
    if STOPPED in report:  # the workers stopped: no metrics of this epoch, only why
        entry["tags"] = {STOPPED: str(report[STOPPED])[:5000]}
        return entry
    entry["metrics"] = numeric_metrics(report, run_values)
    if checkpoint_path is not None:
        entry["tags"] = {"latest_checkpoint": checkpoint_path}
        entry["checkpoint"] = PurePosixPath(checkpoint_path).name
    return entry


def _log_masks(client: MlflowClient, run_id: str, location: RunLocation, entry: dict) -> None:
    """The epoch's token-mask figure as an MLflow image at step = epoch (the chart view's step slider)."""
    fs, directory = location.filesystem()
    source = f"{directory}/{entry['checkpoint']}/{MASKS_FILE}"
    if fs.get_file_info(source).type != pyarrow.fs.FileType.File:
        return  # a dense model (no masks), or a checkpoint deleted since (keep_checkpoints)
    with fs.open_input_stream(source) as src, Image.open(io.BytesIO(src.read())) as image:
        client.log_image(run_id, image.convert("RGB"), key=MASKS_IMAGE_KEY, step=entry["step"],
                         timestamp=entry["time_ms"], synchronous=True)


class NotSent(RuntimeError):
    """MLflow refused or could not be reached; ``entries`` are the reports still waiting (recorded)."""

    def __init__(self, entries: list[dict], cause: BaseException) -> None:
        super().__init__(first_line(cause))
        self.entries = entries


def send(client: MlflowClient, run_id: str, location: RunLocation, entries: list[dict]) -> None:
    """Send ``entries`` in order, then remove the run's pending record. On the first failure the unsent
    entries (that one included) are written to the record and :class:`NotSent` is raised with them."""
    for done, entry in enumerate(entries):
        try:
            at, step = entry["time_ms"], entry["step"]
            metrics = [Metric(k, v, at, step) for k, v in sorted(entry["metrics"].items())]
            tags = [RunTag(k, v) for k, v in sorted(entry["tags"].items())]
            client.log_batch(run_id, metrics=metrics, tags=tags)
            if entry["checkpoint"] is not None:
                _log_masks(client, run_id, location, entry)
        except Exception as err:
            waiting = entries[done:]
            write_record(location, {"mlflow_run_id": run_id, "entries": waiting}, PENDING_RECORD)
            raise NotSent(waiting, err) from err
    delete_record(location, PENDING_RECORD)


def pending(location: RunLocation) -> list[dict]:
    """The entries of the run's pending record (none if there is no record)."""
    record = read_record(location, PENDING_RECORD)
    return [] if record is None else record["entries"]


def send_pending(client: MlflowClient, run_id: str, location: RunLocation) -> int:
    """Send what the run's pending record holds (:func:`send`); the number of epochs sent."""
    entries = pending(location)
    if entries:
        send(client, run_id, location, entries)
    return len(entries)
