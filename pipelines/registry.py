"""The best checkpoint as an MLflow model: log, register, pick the champion, load back.

A checkpoint directory (:mod:`pipelines.checkpoints`) holds ``spot_config.json``
(architecture) and ``model.pt`` (state_dict). It is logged as an MLflow "models from code" pyfunc
(:mod:`pipelines.pyfunc_model`) with those two files as artifacts, so loading rebuilds the model from its
config and loads the weights with ``weights_only=True``: no ``torch.export``, no unpickled code. The version
is registered with tags ``rho``, ``gflops``, ``val_acc1`` (and more) and gets the alias ``champion`` when its
validation accuracy beats the current champion's at equal or lower GFLOPs.
"""

from __future__ import annotations

import warnings
from importlib import metadata
from pathlib import Path

import mlflow
import numpy as np
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.models.signature import ModelSignature
from mlflow.types.schema import Schema, TensorSpec
from torch import nn

from pipelines.checkpoints import (
    CONFIG_FILE,
    MODEL_FILE,
    best_checkpoint,
    model_from_checkpoint,
    read_checkpoint,
)
from pipelines.errors import first_line

CHAMPION = "champion"
PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")
MODEL_ARTIFACT = "model"
REQUIREMENTS = ("torch", "timm", "numpy", "mlflow")


def load_model(uri: str | Path) -> nn.Module:
    """A SPOT model in eval mode from a checkpoint dir, a local MLflow model dir, or an MLflow model URI
    (``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``runs:/...``)."""
    uri = str(uri)
    path = Path(uri).expanduser()
    if path.is_dir() and (path / CONFIG_FILE).is_file():
        return model_from_checkpoint(path)
    if "://" not in uri and not uri.startswith("models:/") and not (path / "MLmodel").is_file():
        raise FileNotFoundError(f"no SPOT checkpoint or MLflow model at {path}")
    try:
        loaded = mlflow.pyfunc.load_model(uri)
    except MlflowException as err:
        raise ValueError(f"cannot load MLflow model {uri}: {first_line(err)}") from None
    return loaded.unwrap_python_model().model


def _signature(config: dict) -> ModelSignature:
    side = config.get("img_size", 224)
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 3, side, side))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, config["num_classes"]))]),
    )


def version_tags(config: dict, metrics: dict) -> dict[str, str]:
    """Tags of a registered version: what it is and how good / cheap it is."""
    rho = config["rho"]
    return {
        "backbone": config["name"],
        "rho": "1.0 (dense)" if rho is None else str(rho),
        "gflops": f"{metrics['gflops']:.6f}",
        "val_acc1": f"{metrics['val_acc1']:.6f}",
        "val_acc5": f"{metrics['val_acc5']:.6f}",
        "epoch": str(metrics["epoch"]),
    }


def champion_metrics(client: MlflowClient, name: str) -> tuple[str, float, float] | None:
    """(version, val_acc1, gflops) of the current champion of ``name``, or None if there is none."""
    try:
        version = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None
    tags = version.tags
    return version.version, float(tags.get("val_acc1", "nan")), float(tags.get("gflops", "nan"))


def beats(acc: float, gflops: float, champion: tuple[str, float, float] | None) -> bool:
    """Strictly higher validation accuracy at equal or lower GFLOPs (anything beats no champion).

    A champion without comparable tags (NaN) is never replaced automatically.
    """
    if champion is None:
        return True
    _, champion_acc, champion_gflops = champion
    return acc > champion_acc and gflops <= champion_gflops


def register_checkpoint(checkpoint_dir: str | Path, *, run_id: str, name: str, metrics: dict) -> dict:
    """Log ``checkpoint_dir`` as an MLflow model of ``run_id``, register it as ``name``, maybe promote it.

    ``metrics`` are the checkpoint's validation metrics (``val_acc1``, ``val_acc5``, ``gflops``, ``epoch``).
    Uses the current MLflow tracking URI. Returns ``{"name", "version", "uri", "champion",
    "previous_champion"}``.
    """
    checkpoint_dir = Path(checkpoint_dir)
    config, _ = read_checkpoint(checkpoint_dir)
    tags = version_tags(config, metrics)
    client = MlflowClient()
    status = client.get_run(run_id).info.status
    with mlflow.start_run(run_id=run_id), warnings.catch_warnings():
        # the signature is given; an input example (a full image batch as JSON) would only bloat the model
        warnings.filterwarnings("ignore", message=".*input example was not provided", category=UserWarning)
        info = mlflow.pyfunc.log_model(
            name=MODEL_ARTIFACT,
            python_model=str(PYFUNC_CODE),
            artifacts={
                "spot_config": str(checkpoint_dir / CONFIG_FILE),
                "weights": str(checkpoint_dir / MODEL_FILE),
            },
            signature=_signature(config),
            pip_requirements=[f"{p}=={metadata.version(p)}" for p in REQUIREMENTS],
            tags=tags,
        )
    client.update_run(run_id, status=status)  # logging the model ended the run; it is the caller's
    version = mlflow.register_model(info.model_uri, name, tags=tags)
    champion = champion_metrics(client, name)
    promoted = beats(metrics["val_acc1"], metrics["gflops"], champion)
    if promoted:
        client.set_registered_model_alias(name, CHAMPION, version.version)
    return {
        "name": name,
        "version": int(version.version),
        "uri": f"models:/{name}/{version.version}",
        "champion": promoted,
        "previous_champion": None if champion is None else int(champion[0]),
    }


def register_best(result, *, run_id: str, name: str) -> dict:
    """Register the best checkpoint of a Ray Train ``result`` (:func:`register_checkpoint`); adds its
    ``checkpoint`` path and ``metrics``."""
    checkpoint, metrics = best_checkpoint(result)
    with checkpoint.as_directory() as directory:
        registered = register_checkpoint(directory, run_id=run_id, name=name, metrics=metrics)
    return registered | {"checkpoint": checkpoint.path, "metrics": metrics}
