"""What the project's command lines share: bad input as one line on stderr (exit code 2), the last line of
a successful run (``RESULT_JSON: {...}``), and the options and inputs of the commands that evaluate models
(``evaluate``, ``compare``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipelines.utils.errors import first_line

RESULT_PREFIX = "RESULT_JSON: "
BAD_INPUT = 2


def bad_input(prog: str, err: BaseException) -> int:
    """Print ``<prog>: error: <first line>`` to stderr; returns the exit code 2."""
    print(f"{prog}: error: {first_line(err)}", file=sys.stderr)
    return BAD_INPUT


def print_result(result: dict) -> None:
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def add_evaluation_options(parser: argparse.ArgumentParser, *, experiment: str) -> None:
    """The data, batch and MLflow options of a command that evaluates models."""
    from pipelines.training.config import DIGITS_DIR, DIGITS_SOURCE

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
    import mlflow
    import torch

    from pipelines.data.shards import ensure_builtin_shards
    from pipelines.tracking.store import resolve_tracking_uri
    from pipelines.training.config import DIGITS_DIR, DIGITS_SOURCE

    cwd = Path.cwd()
    data = Path(args.data).resolve() if args.data else ensure_builtin_shards(cwd / DIGITS_DIR, DIGITS_SOURCE)
    uri = resolve_tracking_uri(args.mlflow_uri, cwd)
    mlflow.set_tracking_uri(uri)
    return str(data), uri, torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
