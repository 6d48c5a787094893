"""What a run or a sweep leaves in its storage directory for ``--resume``: one JSON record per kind.

``<storage>/<name>/spot_run.json`` of a fine-tuning run: ``{"config", "mlflow_run_id", "tracking_uri"}``;
``<storage>/<name>/spot_sweep.json`` of a sweep: its setup. Storage is a local path or a ``pyarrow``
file-system URI (``s3://``, ``gs://``).
"""

from __future__ import annotations

import contextlib
import json
import uuid

import pyarrow.fs

from pipelines.storage.location import RunLocation

RUN_RECORD = "spot_run.json"
FAULT_RECORD = "spot_fault.json"  # written by rank 0 when the workers stop on a NaN / inf loss
SWEEP_RECORD = "spot_sweep.json"
STOPPED = "stop_reason"  # report key (and MLflow tag) of a run its workers stopped for good: why and where


def read_record(location: RunLocation, file: str = RUN_RECORD) -> dict | None:
    """The record ``file`` of the run at ``location`` (None if there is none)."""
    fs, directory = location.filesystem()
    path = f"{directory}/{file}"
    if fs.get_file_info(path).type != pyarrow.fs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return json.loads(f.read())


def delete_record(location: RunLocation, file: str) -> None:
    """Remove the record ``file`` of the run at ``location`` if there is one."""
    fs, directory = location.filesystem()
    path = f"{directory}/{file}"
    if fs.get_file_info(path).type == pyarrow.fs.FileType.File:
        fs.delete_file(path)


def write_record(location: RunLocation, record: dict, file: str = RUN_RECORD) -> None:
    """Write the record atomically: a temporary file moved over the old one, so a full disk or a killed
    process leaves the previous record intact, never a truncated one."""
    fs, directory = location.filesystem()
    fs.create_dir(directory, recursive=True)
    path = f"{directory}/{file}"
    tmp = f"{directory}/.{file}.{uuid.uuid4().hex}.tmp"
    try:
        with fs.open_output_stream(tmp) as f:
            f.write(json.dumps(record, indent=1).encode())
        fs.move(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            fs.delete_file(tmp)
        raise
