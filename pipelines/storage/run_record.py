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

from pipelines.utils.errors import ConfigError, first_line

RUN_RECORD = "spot_run.json"
FAULT_RECORD = "spot_fault.json"  # written by rank 0 when the workers stop on a NaN / inf loss
SWEEP_RECORD = "spot_sweep.json"
STOPPED = "stop_reason"  # report key (and MLflow tag) of a run its workers stopped for good: why and where


def _root(storage: str) -> tuple[pyarrow.fs.FileSystem, str]:
    try:
        return pyarrow.fs.FileSystem.from_uri(storage)
    except (pyarrow.ArrowInvalid, OSError) as err:
        raise ConfigError(f"--storage {storage}: {first_line(err)}") from None


def run_dir(storage: str, name: str) -> tuple[pyarrow.fs.FileSystem, str]:
    """The file system of ``storage`` and the directory of run ``name`` in it."""
    fs, root = _root(storage)
    return fs, f"{root}/{name}"


def read_record(storage: str, name: str, file: str = RUN_RECORD) -> dict | None:
    """The record ``file`` of ``name`` in ``storage`` (None if there is none)."""
    fs, root = _root(storage)
    path = f"{root}/{name}/{file}"
    if fs.get_file_info(path).type != pyarrow.fs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return json.loads(f.read())


def delete_record(storage: str, name: str, file: str) -> None:
    """Remove the record ``file`` of ``name`` if there is one."""
    fs, root = _root(storage)
    path = f"{root}/{name}/{file}"
    if fs.get_file_info(path).type == pyarrow.fs.FileType.File:
        fs.delete_file(path)


def write_record(storage: str, name: str, record: dict, file: str = RUN_RECORD) -> None:
    """Write the record atomically: a temporary file moved over the old one, so a full disk or a killed
    process leaves the previous record intact, never a truncated one."""
    fs, root = _root(storage)
    fs.create_dir(f"{root}/{name}", recursive=True)
    path = f"{root}/{name}/{file}"
    tmp = f"{root}/{name}/.{file}.{uuid.uuid4().hex}.tmp"
    try:
        with fs.open_output_stream(tmp) as f:
            f.write(json.dumps(record, indent=1).encode())
        fs.move(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            fs.delete_file(tmp)
        raise
