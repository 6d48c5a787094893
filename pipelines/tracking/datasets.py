"""The shard splits a run read, as MLflow dataset inputs (the run page's Datasets, the runs table's column).

One dataset per split of a shard directory, described by its manifest (:mod:`pipelines.data.manifest`): name
``<directory>-<split>``, source the directory, digest from the split's shard checksums and sample counts, a
profile (samples, classes, shards, bytes) and a schema of the WebDataset components. Nothing of the data is
uploaded. Two runs on the same shards log the same digest, so MLflow keeps one dataset for both. A metric
``<split>_*`` (``val_acc1``, ``train_ce``) was measured on that split (:func:`metric_split`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from mlflow import MlflowClient
from mlflow.data.dataset_source_registry import get_dataset_source_from_json
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import Dataset, DatasetInput, InputTag, Run
from mlflow.types import ColSpec, DataType, Schema
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from pipelines.data.manifest import COMPONENTS, read_manifest

DIGEST_CHARS = 16
# what each split is for in a run (MLflow's dataset context tag)
CONTEXTS = {"train": "training", "val": "validation"}
SCHEMA = Schema([
    ColSpec(DataType.binary, COMPONENTS["image"]),
    ColSpec(DataType.integer, COMPONENTS["label"]),
    ColSpec(DataType.string, COMPONENTS["meta"]),
])


class ShardSplit(MetaDataset):
    """One split of a shard directory as MLflow metadata (its ``profile`` is the manifest's summary)."""

    def __init__(self, source, name: str, digest: str, profile: dict) -> None:
        self._profile = profile
        super().__init__(source, name=name, digest=digest, schema=SCHEMA)

    @property
    def profile(self) -> dict:
        return self._profile

    def to_dict(self) -> dict[str, str]:
        return super().to_dict() | {"profile": json.dumps(self._profile)}


def shard_split(data: str | Path, split: str) -> ShardSplit:
    """The dataset of ``split`` of the shard directory ``data`` (its manifest is read and checked)."""
    manifest = read_manifest(data)
    shards = manifest.shard_infos(split)
    digest = hashlib.sha256(
        json.dumps([manifest.classes, [(s.sha256, s.count) for s in shards]]).encode()
    ).hexdigest()[:DIGEST_CHARS]
    profile = {"split": split, "num_samples": manifest.counts[split], "num_classes": manifest.num_classes,
               "num_shards": len(shards), "bytes": sum(s.nbytes for s in shards)}
    # MLflow's "local" source (resolving a file URI would find two equal candidates and warn)
    source = get_dataset_source_from_json(json.dumps({"uri": manifest.root.as_uri()}), "local")
    return ShardSplit(source, f"{manifest.root.name}-{split}", digest, profile)


def log_shard_inputs(client: MlflowClient, run_id: str, data: str | Path, splits: tuple[str, ...]) -> None:
    """Log ``splits`` of ``data`` as the run's dataset inputs, each tagged with its context."""
    inputs = [
        DatasetInput(shard_split(data, split)._to_mlflow_entity(),
                     tags=[InputTag(MLFLOW_DATASET_CONTEXT, CONTEXTS.get(split, split))])
        for split in splits
    ]
    client.log_inputs(run_id, datasets=inputs)


def run_split_datasets(run: Run) -> dict[str, Dataset]:
    """The datasets :func:`log_shard_inputs` logged as ``run``'s inputs, by split (``train``, ``val``)."""
    splits = {context: split for split, context in CONTEXTS.items()}
    found = {}
    for dataset_input in run.inputs.dataset_inputs:
        context = {t.key: t.value for t in dataset_input.tags}.get(MLFLOW_DATASET_CONTEXT)
        if context is not None:
            found[splits.get(context, context)] = dataset_input.dataset
    return found


def metric_split(key: str) -> str:
    """The split a per-epoch metric was measured on: its name's first part (``val_acc1``: ``val``)."""
    return key.split("_", 1)[0]
