#!/usr/bin/env python
"""Export a SPOT model (prune mode) or a dense model to ONNX, check it in ONNX Runtime, log it to MLflow.

    python pipelines/export.py --model models:/spot-lvvit_s@champion --out model.onnx
    python pipelines/export.py --model runs:/<run_id>/<registered model name> --out model.onnx
    python pipelines/export.py --model ray_results/<run>/checkpoint_<time> --out model.onnx

The model goes through ``torch.export`` and torch's dynamo-based ONNX exporter (``spot.export``): input
``images`` (batch, 3, S, S) with a dynamic batch, outputs ``logits`` and, for a SPOT model, the original
patch indices kept at each stage (``kept_0`` ..; ``--logits-only`` leaves them out). The file is then run
in ONNX Runtime next to the eager model on seeded random images (``--check-batches``): the same kept
indices and logits within 1e-4, or the command fails and nothing is logged.

An MLflow model (``models:/``, ``runs:/``) gets the export as another output of its run: an ``onnx``
flavor model (loadable with ``mlflow.onnx`` / ``mlflow.pyfunc``, no checkout of this project needed), and
the run gets ``onnx_export.json`` (parity figures); the ONNX file is also attached to the model itself
(``onnx/model.onnx`` among its artifacts), and a registered version gets tags ``onnx_model_uri`` and
``onnx_logits_max_abs``. So ``mlflow.artifacts.download_artifacts("models:/spot-lvvit_s@champion")`` gives
both the PyTorch model and the ONNX file. A checkpoint directory is exported without MLflow.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script from a checkout: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlflow

from pipelines.evaluation import export
from pipelines.tracking.registry import load_model
from pipelines.tracking.uri import move_credentials_to_env, resolve_tracking_uri
from pipelines.utils.cli import Parser, bad_input
from pipelines.utils.errors import ConfigError, TrackingError, first_line
from spot.export import LOGITS_ATOL, ExportError


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model", required=True, help="models:/NAME@ALIAS, models:/NAME/V, runs:/ID/NAME or a dir"
    )
    p.add_argument("--out", default="model.onnx")
    p.add_argument("--check-batches", type=int, nargs="*", default=[1, 7], help="ORT parity at these sizes")
    p.add_argument("--logits-only", action="store_true", help="no kept-indices outputs (no parity check)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    p.add_argument("--no-mlflow", action="store_true", help="write the file only")
    p.add_argument(
        "--mlflow-uri", default=None, help="tracking URI (default: $MLFLOW_TRACKING_URI, else ./mlflow.db)"
    )
    args = p.parse_args(argv)
    try:
        export.check_export_options(tuple(args.check_batches), args.opset)
        if args.mlflow_uri:  # a password in it goes to MLflow's variables, never into what is logged
            uri = move_credentials_to_env(args.mlflow_uri)
            mlflow.set_tracking_uri(resolve_tracking_uri(uri, Path.cwd()))
        model = load_model(args.model)  # a model that is missing or does not load is bad input
    except (ValueError, FileNotFoundError, TrackingError) as err:
        return bad_input("export", err)
    try:
        report = export.export_model(
            args.model,
            args.out,
            model=model,
            check_batches=tuple(args.check_batches) if not args.logits_only else (),
            with_indices=not args.logits_only,
            log=not args.no_mlflow,
            opset=args.opset,
        )
    except (ConfigError, FileNotFoundError, ValueError) as err:  # no such model, a bad URI or option
        return bad_input("export", err)
    except (ExportError, export.ParityError) as err:  # the model does not export faithfully
        print(f"export: failed: {first_line(err)}", file=sys.stderr)
        return 1
    for batch, r in report["parity"].items():
        worst = r["logits_max_abs"]
        print(
            f"batch {batch:>3}: kept indices {r['indices']} ({r['mismatched_images']} images differ), "
            f"logits max-abs {worst:.2e} (<= {LOGITS_ATOL:g})" + ("" if math.isfinite(worst) else " n/a")
        )
    print(json.dumps({k: v for k, v in report.items() if k != "parity"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
