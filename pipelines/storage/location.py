"""Where a run keeps its checkpoints and records: directory ``name`` in ``storage`` (a local path or a
``pyarrow`` file-system URI such as ``s3://bucket/runs``), one value instead of a ``(storage, name)`` pair."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow.fs

from pipelines.utils.errors import ConfigError, first_line


@dataclass(frozen=True)
class RunLocation:
    """Run (or sweep) ``name`` in ``storage``; Ray Train's ``storage_path`` and run ``name`` are the same."""

    storage: str
    name: str

    @property
    def uri(self) -> str:
        """``<storage>/<name>``: what ``Result.from_path`` and the user are given."""
        return f"{self.storage}/{self.name}"

    def file(self, file: str) -> str:
        """The URI of ``file`` in the run's directory."""
        return f"{self.uri}/{file}"

    def child(self, name: str) -> RunLocation:
        """Run ``name`` inside this one's directory (a sweep's trials)."""
        return RunLocation(self.uri, name)

    def filesystem(self) -> tuple[pyarrow.fs.FileSystem, str]:
        """The file system of ``storage`` and the run's directory in it; ConfigError for a bad storage."""
        try:
            fs, root = pyarrow.fs.FileSystem.from_uri(self.storage)
        except (pyarrow.ArrowInvalid, OSError) as err:
            raise ConfigError(f"--storage {self.storage}: {first_line(err)}") from None
        return fs, f"{root}/{self.name}"

    @classmethod
    def from_uri(cls, uri: str) -> RunLocation:
        """The inverse of :attr:`uri` (``s3://b/runs/x`` -> storage ``s3://b/runs``, name ``x``)."""
        storage, _, name = uri.rstrip("/").rpartition("/")
        return cls(storage, name)
