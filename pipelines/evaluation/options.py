"""The options and inputs shared by the commands that evaluate models (``evaluate``, ``compare``)."""

from __future__ import annotations

import argparse
from pathlib import Path

import mlflow
import torch

from pipelines.data.shards import ensure_builtin_shards
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


def evaluation_inputs(args: argparse.Namespace) -> tuple[str, str, object]:
    """``(data, tracking URI, device)`` of :func:`add_evaluation_options`' arguments: the shard directory
    (the built-in digits, made if missing), the URI (also where ``models:/`` URIs are looked up from now
    on) and the GPU if there is one."""

    for name in ("batch_size", "throughput_batch"):
        value = getattr(args, name, None)
        check(value is None or value >= 1, f"--{name.replace('_', '-')} {value}: must be >= 1")
    cwd = Path.cwd()
    data = Path(args.data).resolve() if args.data else ensure_builtin_shards(cwd / DIGITS_DIR, DIGITS_SOURCE)
    uri = resolve_tracking_uri(move_credentials_to_env(args.mlflow_uri), cwd)
    mlflow.set_tracking_uri(uri)
    return str(data), uri, torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
