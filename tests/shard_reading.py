"""Reading written shards back, sample by sample, as the tests check them."""

import tarfile
from pathlib import Path

from pipelines.data.manifest import read_manifest


def read_samples(tar: Path) -> list[dict[str, bytes]]:
    """Samples of a shard in file order, as ``{ext: bytes}`` plus ``__key__``."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(tar) as archive:
        for member in archive:
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {"__key__": key})[ext] = archive.extractfile(member).read()
    return list(samples.values())


def split_samples(data_dir: Path, split: str) -> list[dict[str, bytes]]:
    """Every sample of ``split`` in the manifest's shard order."""
    return [s for tar in read_manifest(data_dir).shards(split) for s in read_samples(tar)]
