"""The options and inputs shared by the commands that evaluate models (``evaluate``, ``compare``)."""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from pathlib import Path

import mlflow
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from pipelines.data.shards import ensure_builtin_shards
from pipelines.storage.checkpoints import CONFIG_FILE
from pipelines.tracking.lineage import registered_version
from pipelines.tracking.uri import move_credentials_to_env, resolve_tracking_uri
from pipelines.training.config import DIGITS_DIR, DIGITS_SOURCE
from pipelines.utils.errors import check


def add_evaluation_options(parser: argparse.ArgumentParser, *, experiment: str) -> None:
    """The data, batch and MLflow options of a command that evaluates models."""
    builtin = f"./{DIGITS_DIR}"
    parser.add_argument("--data", help=f"shard directory (default: the built-in {DIGITS_SOURCE}, {builtin})")
    parser.add_argument("--batch-size", type=int, default=64, help="batch size [default: 64]")
    parser.add_argument("--mlflow", action="store_true", help="also log the results as an MLflow run")
    parser.add_argument("--mlflow-uri", help="tracking URI (default: $MLFLOW_TRACKING_URI, else ./mlflow.db)")
    parser.add_argument("--experiment", default=experiment, help=f"MLflow experiment [default: {experiment}]")


def check_model_source(option: str, value: str) -> None:
    """The cheap checks of a model option before any data is made or model loaded: a ``models:/NAME@ALIAS``
    or ``models:/NAME/VERSION`` the registry (the current tracking URI) holds, a ``runs:/RUN_ID/NAME`` of a
    run it holds, a checkpoint or MLflow model directory that exists, or another ``scheme://`` URI (checked
    when loaded). Raises ``ValueError``."""
    if value.startswith("models:/"):
        check(registered_version(MlflowClient(), value) is not None,
              f"{option} {value}: the registry {mlflow.get_tracking_uri()} holds no such model version "
              "(models:/NAME@ALIAS or models:/NAME/VERSION)")
    elif value.startswith("runs:/"):
        run_id = value.removeprefix("runs:/").split("/", 1)[0]
        try:
            MlflowClient().get_run(run_id)
        except MlflowException:
            check(False, f"{option} {value}: the tracking store {mlflow.get_tracking_uri()} holds no run "
                  f"{run_id!r} (runs:/RUN_ID/NAME)")
    elif "://" not in value:
        path = Path(value).expanduser()
        check(path.is_dir() and any((path / f).is_file() for f in (CONFIG_FILE, "MLmodel")),
              f"{option} {value}: no SPOT checkpoint or MLflow model directory there")


def evaluation_inputs(
    args: argparse.Namespace, models: Iterable[tuple[str, str | None]]
) -> tuple[str, str, object]:
    """``(data, tracking URI, device)`` of :func:`add_evaluation_options`' arguments: the shard directory
    (the built-in digits, made if missing), the URI (also where ``models:/`` URIs are looked up from now
    on) and the GPU if there is one. ``models`` ((option, value) pairs) are checked first
    (:func:`check_model_source`), before any data is made."""

    for name in ("batch_size", "throughput_batch"):
        value = getattr(args, name, None)
        check(value is None or value >= 1, f"--{name.replace('_', '-')} {value}: must be >= 1")
    cwd = Path.cwd()
    uri = resolve_tracking_uri(move_credentials_to_env(args.mlflow_uri), cwd)
    mlflow.set_tracking_uri(uri)
    for option, value in models:
        if value is not None:
            check_model_source(option, value)
    data = Path(args.data).resolve() if args.data else ensure_builtin_shards(cwd / DIGITS_DIR, DIGITS_SOURCE)
    return str(data), uri, torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
