"""The best checkpoint as an MLflow model: log, register, pick the champion, load back.

A checkpoint directory (:mod:`pipelines.storage.checkpoints`) holds ``spot_config.json``
(architecture) and ``model.pt`` (state_dict). It is logged as an MLflow "models from code" pyfunc
(:mod:`pipelines.tracking.pyfunc_model`) with those two files as artifacts, the ``spot`` package as code (so
``mlflow models serve`` needs no checkout) and the project's mark in its MLmodel metadata. Loading checks
that mark and rebuilds the model from its config and weights (``weights_only=True``): no code of a
registered model is imported, no ``torch.export``, nothing unpickled. The version is registered with tags
``rho``, ``gmacs``, ``val_acc1`` (and more) and a description; the logged model is named after the registered
model, carries the same tags and description, and is the run's output at the checkpoint's epoch (its step),
linked to that epoch's metrics, each with the dataset it was measured on (:func:`link_epoch_metrics`). The
alias ``champion`` goes to the version that wins when the versions, in registration order, each replace the
one before if more accurate at equal or lower GMACs (:func:`elect_champion`): a function of the versions, so
concurrent registrations agree.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
import warnings
from importlib import metadata
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow import MlflowClient
from mlflow.entities import LoggedModelOutput, Metric, Run
from mlflow.exceptions import MlflowException
from mlflow.models import Model
from mlflow.models.signature import ModelSignature
from mlflow.types.schema import Schema, TensorSpec
from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS, MLFLOW_RUN_NOTE
from torch import nn

import spot
from pipelines.data.manifest import MANIFEST_NAME, read_manifest, sha256_file
from pipelines.storage.checkpoints import (
    CONFIG_FILE,
    MODEL_FILE,
    best_checkpoint,
    build_model,
    checkpoint_uri,
    model_from_checkpoint,
    read_checkpoint,
)
from pipelines.tracking.datasets import metric_split, run_split_datasets
from pipelines.tracking.uri import MODEL_URI_PREFIXES
from pipelines.utils.errors import first_line

CHAMPION = "champion"
PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")
SPOT_PACKAGE = Path(spot.__file__).parent  # travels with the model (code_paths): serving needs no checkout
ARTIFACTS = ("spot_config", "weights")
PROJECT_KEY = "spot_vit"  # MLmodel metadata that marks a model this project registered
FORMAT_VERSION = 2  # 2: the spot_config artifact records every SPOT option (spot.config.CONFIG_FORMAT)
READABLE_FORMATS = (1, FORMAT_VERSION)  # format 1 configs load with the defaults of their time
CODE_LOADER = "mlflow.pyfunc.loaders.code_model"  # the pyfunc loader of a "models from code" model
REQUIREMENTS = ("torch", "timm", "numpy", "mlflow")
SYSTEM_METRICS_PREFIX = "system/"  # MLflow's system metrics: sampled every few seconds; no epoch steps


def _spot_model(model_dir: Path, uri: str) -> nn.Module:
    """The SPOT model of a downloaded MLflow model, after checking that this project registered it (the
    pyfunc flavor and the project's MLmodel metadata); only its JSON config and its weights (``weights_only``)
    are read. Raises ``ValueError`` naming what is wrong."""
    mlmodel = model_dir / "MLmodel"
    if not mlmodel.is_file():
        raise ValueError(f"{uri} is no MLflow model (no MLmodel file)")
    model = Model.load(mlmodel)
    conf = model.flavors.get("python_function", {})
    ours = (model.metadata or {}).get(PROJECT_KEY, {})
    if conf.get("loader_module") != CODE_LOADER or ours.get("format") not in READABLE_FORMATS:
        raise ValueError(f"{uri} is not a SPOT model registered by this project (no {PROJECT_KEY!r} format "
                         f"in {READABLE_FORMATS} in its MLmodel metadata); not loaded: its code would run")
    paths = {key: model_dir / conf.get("artifacts", {}).get(key, {}).get("path", key) for key in ARTIFACTS}
    missing = [key for key, path in paths.items() if not path.is_file()]
    if missing:
        raise ValueError(f"{uri}: a SPOT model without its {', '.join(missing)} artifact")
    config = json.loads(paths["spot_config"].read_text())
    return build_model(config, torch.load(paths["weights"], map_location="cpu", weights_only=True))


def load_model(uri: str | Path) -> nn.Module:
    """A SPOT model in eval mode from a checkpoint dir, a local MLflow model dir, or an MLflow model URI
    (``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``runs:/...``).

    An MLflow model is downloaded and checked (:func:`_spot_model`): only its JSON config and its
    weights (``weights_only``) are read; no code of the model is imported, so a foreign model is refused
    before anything of it runs."""
    uri = str(uri)
    path = Path(uri).expanduser()
    if path.is_dir() and (path / CONFIG_FILE).is_file():
        return model_from_checkpoint(path)
    if path.is_dir() and (path / "MLmodel").is_file():
        return _spot_model(path, uri)
    if "://" not in uri and not uri.startswith(MODEL_URI_PREFIXES):
        raise FileNotFoundError(f"no SPOT checkpoint or MLflow model at {path}")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp))
        except MlflowException as err:
            raise ValueError(f"cannot load MLflow model {uri}: {first_line(err)}") from None
        return _spot_model(local, uri)


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
        "gmacs": f"{metrics['gmacs']:.6f}",
        "val_acc1": f"{metrics['val_acc1']:.6f}",
        "val_acc5": f"{metrics['val_acc5']:.6f}",
        "epoch": str(metrics["epoch"]),
    }


DATA_TAGS = ("data_digest", "data_classes", "img_size")  # what "the same task" means for a champion


def data_tags(data: str | Path, img_size: int) -> dict[str, str]:
    """The data set a model was trained on, as version tags: the digest of its ``manifest.json`` (shards,
    classes, counts), its class count and the image side."""
    manifest = read_manifest(data)
    return {"data_digest": sha256_file(Path(manifest.root) / MANIFEST_NAME)[:16],
            "data_classes": str(manifest.num_classes), "img_size": str(img_size)}


def _task(tags: dict) -> tuple:
    return tuple(tags.get(key) for key in DATA_TAGS)


class OtherTask(ValueError):
    """A registered model holds versions trained on another data set than the model to be added."""


def check_same_task(client: MlflowClient, name: str, data: dict[str, str]) -> None:
    """Refuse (:class:`OtherTask`) to add a model trained on ``data`` to registered model ``name`` when its
    versions were trained on another data set: a champion compares like with like."""
    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException:
        return
    other = [v for v in versions if v.tags.get("data_digest") and _task(v.tags) != _task(data)]
    if other:
        seen = other[-1].tags
        raise OtherTask(
            f"registered model {name!r} holds versions trained on other data (manifest "
            f"{seen['data_digest']}, {seen.get('data_classes')} classes, {seen.get('img_size')} px); this "
            f"run's is {data['data_digest']}, {data['data_classes']} classes, {data['img_size']} px: "
            f"register it under its own name, e.g. --register-as {name}-{data['data_classes']}cls-"
            f"{data['img_size']}px")


def describe(config: dict, metrics: dict, data: str | None) -> str:
    """A registered model version's description: what it is, its data, rho, GMACs and accuracy."""
    rho = config["rho"]
    kind = "dense ViT (no token selection)" if rho is None else f"SPOT ViT, keep rate rho {rho} per stage"
    return (
        f"{config['name']} {kind}, {config['num_classes']} classes, {config.get('img_size', 224)} px; "
        f"data {data or 'unknown'}; best checkpoint of epoch {metrics['epoch']} (0-based): val top-1 "
        f"{100 * metrics['val_acc1']:.2f} %, top-5 {100 * metrics['val_acc5']:.2f} %, "
        f"{metrics['gmacs']:.4f} GMACs per image"
    )


def _gmacs(tags: dict) -> float:
    """A version's GMACs tag (``gflops`` on versions registered before the key said its unit)."""
    return float(tags.get("gmacs", tags.get("gflops", "nan")))


def champion_metrics(client: MlflowClient, name: str) -> tuple[str, float, float] | None:
    """(version, val_acc1, gmacs) of the current champion of ``name``, or None if there is none."""
    try:
        version = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None
    tags = version.tags
    return version.version, float(tags.get("val_acc1", "nan")), _gmacs(tags)


def beats(acc: float, gmacs: float, champion: tuple[str, float, float] | None) -> bool:
    """Strictly higher validation accuracy at equal or lower GMACs (anything beats no champion)."""
    if champion is None:
        return True
    _, champion_acc, champion_gmacs = champion
    return acc > champion_acc and gmacs <= champion_gmacs


def elect_champion(versions: list) -> str | None:
    """The champion among a registered model's ``versions``: each version, in registration order, replaces
    the one before it if it :func:`beats` it; versions without comparable tags never become champion.

    A function of the versions alone, so concurrent registrations agree on it whatever their order."""
    champion = None
    versions = sorted(versions, key=lambda v: int(v.version))
    if versions:  # only versions of the newest one's task (data set, classes, image side) compete
        task = _task(versions[-1].tags)
        versions = [v for v in versions if _task(v.tags) == task]
    for version in versions:
        acc, gmacs = float(version.tags.get("val_acc1", "nan")), _gmacs(version.tags)
        if not (math.isnan(acc) or math.isnan(gmacs)) and beats(acc, gmacs, champion):
            champion = (version.version, acc, gmacs)
    return None if champion is None else champion[0]


def settle_champion(client: MlflowClient, name: str, rounds: int = 3, pause_s: float = 0.5) -> str | None:
    """Point ``champion`` at :func:`elect_champion` of all versions of ``name``, then check again ``rounds``
    - 1 times ``pause_s`` apart and correct it: a registration running at the same time (another sweep or
    fine-tune) that wrote from an older view is overwritten. Returns the champion version."""
    elected = None
    for attempt in range(rounds):
        if attempt:
            time.sleep(pause_s)
        elected = elect_champion(client.search_model_versions(f"name = '{name}'"))
        current = champion_metrics(client, name)
        if elected is not None and (current is None or current[0] != elected):
            client.set_registered_model_alias(name, CHAMPION, elected)
    return elected


def _link_version(client: MlflowClient, model_id: str, name: str, version: str) -> None:
    """Record the registered version on the logged model (its ``mlflow.modelVersions`` tag, which the UI's
    "Model versions" reads; a tracking server adds it itself, a direct SQL store does not)."""
    entry = {"name": name, "version": str(version)}
    linked = json.loads(client.get_logged_model(model_id).tags.get(MLFLOW_MODEL_VERSIONS, "[]"))
    if entry not in [{"name": e["name"], "version": str(e["version"])} for e in linked]:
        client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps([*linked, entry])})


def link_epoch_metrics(client: MlflowClient, run: Run, model_id: str, epoch: int) -> None:
    """Make logged model ``model_id`` the output of ``run`` at step ``epoch`` and link it to the run's
    metrics of that epoch (their values and times, as logged), each ``<split>_*`` one with the run's
    dataset input of that split (the logged model's "Datasets used"); not the ``system/*`` metrics."""
    run_id = run.info.run_id
    client.log_outputs(run_id, [LoggedModelOutput(model_id, step=epoch)])
    datasets = run_split_datasets(run)
    linked = []
    for key in sorted(k for k in run.data.metrics if not k.startswith(SYSTEM_METRICS_PREFIX)):
        dataset = datasets.get(metric_split(key))
        named = {} if dataset is None else {"dataset_name": dataset.name, "dataset_digest": dataset.digest}
        at_epoch = [m for m in client.get_metric_history(run_id, key) if m.step == epoch]
        if at_epoch:  # the last value logged at that step (a retried epoch logs it again)
            m = max(at_epoch, key=lambda m: m.timestamp)
            linked.append(Metric(key, m.value, m.timestamp, m.step, model_id=model_id, **named))
    client.log_batch(run_id, metrics=linked)  # the run's own values of these: MLflow skips identical ones


def register_checkpoint(
    checkpoint_dir: str | Path, *, run_id: str, name: str, metrics: dict, data: dict | None = None
) -> dict:
    """Log ``checkpoint_dir`` as an MLflow model of ``run_id``, register it as ``name``, maybe promote it.

    ``metrics`` are the checkpoint's validation metrics (``val_acc1``, ``val_acc5``, ``gmacs``, ``epoch``).
    ``data``: :func:`data_tags` of the training data (refused if ``name`` holds another task's versions).
    Uses the current MLflow tracking URI. Returns ``{"name", "version", "uri", "champion",
    "previous_champion"}``.
    """
    checkpoint_dir = Path(checkpoint_dir)
    config, _ = read_checkpoint(checkpoint_dir)
    client = MlflowClient()
    if data:
        check_same_task(client, name, data)
    run = client.get_run(run_id)
    description = describe(config, metrics, run.data.params.get("data"))
    tags = version_tags(config, metrics) | (data or {})
    # created here, not by log_model in the run: log_model would link the step's metrics itself, without
    # their datasets, and a link cannot be changed (link_epoch_metrics links them)
    model = mlflow.initialize_logged_model(
        name=name, source_run_id=run_id, experiment_id=run.info.experiment_id,
        tags=tags | {MLFLOW_RUN_NOTE: description}, params=run.data.params,
    )
    with warnings.catch_warnings():
        # the signature is given; an input example (a full image batch as JSON) would only bloat the model
        warnings.filterwarnings("ignore", message=".*input example was not provided", category=UserWarning)
        info = mlflow.pyfunc.log_model(
            name=name,
            model_id=model.model_id,
            python_model=str(PYFUNC_CODE),
            artifacts={
                "spot_config": str(checkpoint_dir / CONFIG_FILE),
                "weights": str(checkpoint_dir / MODEL_FILE),
            },
            signature=_signature(config),
            code_paths=[str(SPOT_PACKAGE)],
            metadata={PROJECT_KEY: {"format": FORMAT_VERSION, "version": metadata.version("spot-vit")}},
            pip_requirements=[f"{p}=={metadata.version(p)}" for p in REQUIREMENTS],
        )
    link_epoch_metrics(client, run, info.model_id, int(metrics["epoch"]))
    try:  # the client API, which prints no "Successfully registered model" line
        client.create_registered_model(name, description=f"{config['name']} models of the SPOT project "
                                       "(each version's description says what it is)")
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version = client.create_model_version(name, info.model_uri, run_id=run_id, tags=tags,
                                          description=description, model_id=info.model_id)
    _link_version(client, info.model_id, name, version.version)
    champion = champion_metrics(client, name)
    elected = settle_champion(client, name)
    return {
        "name": name,
        "version": int(version.version),
        "uri": f"models:/{name}/{version.version}",
        "champion": elected == version.version,
        "previous_champion": None if champion is None else int(champion[0]),
    }


def registered_version(client: MlflowClient, name: str, run_id: str) -> dict | None:
    """What :func:`register_checkpoint` returned for ``run_id``'s version of ``name``, if it made one (a
    run finished by a second attempt after MLflow failed half-way registers once)."""
    versions = [v for v in client.search_model_versions(f"run_id = '{run_id}'") if v.name == name]
    if not versions:
        return None
    version = max(versions, key=lambda v: int(v.version)).version
    champion = champion_metrics(client, name)
    return {"name": name, "version": int(version), "uri": f"models:/{name}/{version}",
            "champion": champion is not None and champion[0] == version, "previous_champion": None}


def register_best(result, *, run_id: str, name: str, data: dict | None = None) -> dict:
    """Register the best checkpoint of a Ray Train ``result`` (:func:`register_checkpoint`) unless this run
    registered it already; adds its ``checkpoint`` path and ``metrics``."""
    checkpoint, metrics = best_checkpoint(result)
    registered = registered_version(MlflowClient(), name, run_id)
    if registered is None:
        with checkpoint.as_directory() as directory:
            registered = register_checkpoint(directory, run_id=run_id, name=name, metrics=metrics, data=data)
    return registered | {"checkpoint": checkpoint_uri(checkpoint), "metrics": metrics}
