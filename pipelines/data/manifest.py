"""Read a shard directory's ``manifest.json`` (class names, split sizes, shard lists) and the data errors.

The manifest is written by :mod:`pipelines.data.shards`. Paths inside it are relative to the shard directory,
so a dataset directory can be copied or mounted anywhere. Layout::

    {"format": "spot-webdataset-v1",
     "components": {"image": "jpg", "label": "lbl", "meta": "json"},   # label: raw little-endian int32
     "classes": ["cat", "dog", ...],
     "splits": {"train": {"count": 1437,
                          "shards": [{"tar": "train-000000.tar", "index": "train-000000.idx",
                                      "count": 1000, "bytes": 2170880, "sha256": "..."}, ...],
                          "class_counts": [...], "image_size": {...}, "skipped": [...], "params": {...}}}}
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MANIFEST_NAME = "manifest.json"
FORMAT = "spot-webdataset-v1"
COMPONENTS = {"image": "jpg", "label": "lbl", "meta": "json"}


class DataError(ValueError):
    """Base class of every data problem; the message names the file, key or value at fault."""


class DataDirError(DataError):
    """The shard directory is missing or holds no dataset."""


class ManifestError(DataError):
    """``manifest.json`` is missing, unreadable, or lacks a key or split."""


class ShardMismatchError(ManifestError):
    """A shard or index file disagrees with the manifest (missing, size, checksum, sample count)."""


class MissingLabelError(DataError):
    """A sample has no label (writer: no class; loader: no ``.lbl`` component in the shard)."""


class LabelRangeError(DataError):
    """A label outside ``[0, len(classes))`` (manifest class counts, or a sample read from a shard)."""


class CorruptSampleError(DataError):
    """An image cannot be decoded (writer: source file; loader: sample in a shard)."""


class SourceError(DataError):
    """The writer's ``--source`` is malformed, missing, empty, or rejected in strict mode."""


class NotEnoughSamplesError(DataError):
    """A split has fewer samples than ranks x batch size."""


@dataclass(frozen=True)
class ShardInfo:
    """One tar shard with its DALI index file and what the manifest says about it."""

    path: Path
    index_path: Path
    count: int
    nbytes: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """A dataset directory as described by its manifest."""

    root: Path
    classes: list[str]
    splits: dict[str, list[ShardInfo]]
    counts: dict[str, int]
    info: dict[str, dict[str, Any]] = field(repr=False)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def shard_infos(self, split: str) -> list[ShardInfo]:
        """Shards of ``split``; raises :class:`ManifestError` naming the known splits if absent."""
        if split not in self.splits:
            raise ManifestError(
                f"{self.root / MANIFEST_NAME}: no split {split!r} (splits: {sorted(self.splits)})"
            )
        return self.splits[split]

    def shards(self, split: str) -> list[Path]:
        """Tar files of ``split`` in reading order."""
        return [s.path for s in self.shard_infos(split)]

    def index_files(self, split: str) -> list[Path]:
        """DALI index files of ``split``, parallel to :meth:`shards`."""
        return [s.index_path for s in self.shard_infos(split)]


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


_verified: set[tuple[str, int, int, str]] = set()  # (path, size, mtime_ns, sha256) checked in this process


def verify_shard(shard: ShardInfo) -> None:
    """Check ``shard``'s bytes against the manifest's sha256, once per process (again if the file's size or
    modification time changes). Raises :class:`ShardMismatchError` naming the file, expected and actual."""
    stat = shard.path.stat()
    key = (str(shard.path), stat.st_size, stat.st_mtime_ns, shard.sha256)
    if key in _verified:
        return
    if (digest := sha256_file(shard.path)) != shard.sha256:
        raise ShardMismatchError(f"{shard.path}: sha256 {digest} does not match manifest {shard.sha256} "
                                 "(corrupt shard: copy it again or re-run pipelines/make_shards.py)")
    _verified.add(key)


def _require(mapping: dict, key: str, kind: type, where: str) -> Any:
    if not isinstance(mapping, dict) or key not in mapping:
        raise ManifestError(f"{where}: missing key {key!r}")
    value = mapping[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ManifestError(f"{where}: key {key!r} has invalid value {value!r}")
    return value


def _read_shard(root: Path, entry: dict, where: str, verify: bool) -> ShardInfo:
    shard = ShardInfo(
        path=root / _require(entry, "tar", str, where),
        index_path=root / _require(entry, "index", str, where),
        count=_require(entry, "count", int, where),
        nbytes=_require(entry, "bytes", int, where),
        sha256=_require(entry, "sha256", str, where),
    )
    for path in (shard.path, shard.index_path):
        if not path.is_file():
            raise ShardMismatchError(f"{where}: listed file {path} does not exist")
    size = shard.path.stat().st_size
    if size != shard.nbytes:
        raise ShardMismatchError(f"{shard.path}: {size} bytes on disk, manifest says {shard.nbytes}")
    with open(shard.index_path) as f:
        header = f.readline().split()
    if len(header) != 2 or header[1] != str(shard.count):
        raise ShardMismatchError(
            f"{shard.index_path}: header {' '.join(header)!r} does not list the {shard.count} samples "
            "the manifest records"
        )
    if verify:
        verify_shard(shard)
    return shard


def read_manifest(data_dir: str | Path, *, verify: bool = False) -> Manifest:
    """Read and check ``data_dir/manifest.json``.

    Always checks that every listed shard and index file exists and has the recorded size; with
    ``verify=True`` also recomputes the sha256 of every shard. Raises a :class:`DataError` subclass.
    """
    root = Path(data_dir).expanduser().resolve()
    if not root.is_dir():
        raise DataDirError(f"shard directory {root} does not exist")
    path = root / MANIFEST_NAME
    if not path.is_file():
        if any(root.glob("*.tar")):
            raise ManifestError(f"{path} is missing (tar files present): re-run pipelines/make_shards.py")
        raise DataDirError(f"shard directory {root} is empty (no {MANIFEST_NAME}, no shards)")
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ManifestError(f"{path}: not valid JSON ({err})") from err
    where = str(path)
    if _require(raw, "format", str, where) != FORMAT:
        raise ManifestError(f"{where}: key 'format' is {raw['format']!r}, expected {FORMAT!r}")
    if _require(raw, "components", dict, where) != COMPONENTS:
        raise ManifestError(f"{where}: key 'components' is {raw['components']!r}, expected {COMPONENTS!r}")
    classes = _require(raw, "classes", list, where)
    if not classes or not all(isinstance(c, str) for c in classes):
        raise ManifestError(f"{where}: key 'classes' must be a non-empty list of strings")
    splits: dict[str, list[ShardInfo]] = {}
    counts: dict[str, int] = {}
    for name, split in _require(raw, "splits", dict, where).items():
        here = f"{where} [splits.{name}]"
        entries = _require(split, "shards", list, here)
        shards = [_read_shard(root, e, f"{here} shard {i}", verify) for i, e in enumerate(entries)]
        count = _require(split, "count", int, here)
        if count <= 0 or count != sum(s.count for s in shards):
            raise ShardMismatchError(f"{here}: count {count} is not the (positive) sum of the shard counts")
        class_counts = split.get("class_counts")
        if class_counts is not None and len(class_counts) != len(classes):
            raise LabelRangeError(f"{here}: class_counts has {len(class_counts)} entries for {len(classes)} "
                                  "classes: the split's labels do not match key 'classes'")
        splits[name], counts[name] = shards, count
    if not splits:
        raise ManifestError(f"{where}: key 'splits' is empty")
    return Manifest(root=root, classes=list(classes), splits=splits, counts=counts, info=raw["splits"])
