#!/usr/bin/env python
"""Export a SPOT model (prune mode) or a dense model to ONNX, check it in ONNX Runtime, log it to MLflow.

    python pipelines/export.py --model models:/spot-lvvit_s@champion --out model.onnx
    python pipelines/export.py --model runs:/<run_id>/model --out model.onnx
    python pipelines/export.py --model ray_results/<run>/checkpoint_<time> --out model.onnx

The model goes through ``torch.export`` and torch's dynamo-based ONNX exporter (``spot.export``): input
``images`` (batch, 3, S, S) with a dynamic batch, outputs ``logits`` and, for a SPOT model, the original
patch indices kept at each stage (``kept_0`` ..; ``--logits-only`` leaves them out). The file is then run
in ONNX Runtime next to the eager model on seeded random images (``--check-batches``): the same kept
indices and logits within 1e-4, or the command fails and nothing is logged.

An MLflow model (``models:/``, ``runs:/``) gets the export in its run: an ``onnx`` flavor model (loadable
with ``mlflow.onnx`` / ``mlflow.pyfunc``, no checkout of this project needed) and ``onnx_export.json``
(parity figures); the ONNX file is also attached to the model itself (``onnx/model.onnx`` among its
artifacts), and a registered version gets tags ``onnx_model_uri`` and ``onnx_logits_max_abs``. So
``mlflow.artifacts.download_artifacts("models:/spot-lvvit_s@champion")`` gives both the PyTorch model and
the ONNX file. A checkpoint directory is exported without MLflow.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

import spot
from pipelines.tracking.registry import load_model
from pipelines.tracking.store import resolve_tracking_uri
from spot.export import LOGITS_ATOL, ExportError, check_onnx, export_onnx

ONNX_DIR = "onnx"  # artifact directory of the export in the run and in the model


class ParityError(RuntimeError):
    """The exported model does not reproduce the eager model."""


def is_mlflow_uri(uri: str) -> bool:
    return uri.startswith(("models:/", "runs:/")) or (Path(uri) / "MLmodel").is_file()


def export_model(
    uri: str,
    out: str | Path,
    *,
    check_batches: tuple[int, ...] = (1, 7),
    with_indices: bool = True,
    log: bool = True,
    opset: int | None = None,
) -> dict:
    """Export the model at ``uri`` to ``out``, check it in ONNX Runtime, and log it to MLflow (if any).

    Returns the export report (path, outputs, parity per batch size, MLflow places).
    """
    model = load_model(uri)
    start = time.perf_counter()
    exported = export_onnx(model, out, with_indices=with_indices, opset=opset)
    report = {
        "source": uri,
        "path": str(exported.path),
        "backbone": model.spot_config["name"],
        "rho": model.spot_config["rho"],
        "selector": model.spot_config.get("selector", "learned"),
        **spot.input_normalization(model),  # what the caller normalises the images with
        "inputs": exported.inputs,
        "outputs": exported.outputs,
        "keep_counts": exported.keep_counts,
        "opset": exported.opset,
        "export_s": round(time.perf_counter() - start, 1),
        "torch": torch.__version__,
        "parity": {},
    }
    if check_batches:
        if not with_indices and not model.spot_options.dense:
            raise ValueError("the parity check needs the kept indices: drop --logits-only or --check-batches")
        parity = check_onnx(model, exported.path, tuple(check_batches))
        report["parity"] = {str(b): r for b, r in parity.items()}
        failed = {b: r for b, r in parity.items() if not r["ok"]}
        if failed:
            raise ParityError(f"ONNX Runtime does not reproduce the eager model: {json.dumps(failed)}")
        report["logits_max_abs"] = max(r["logits_max_abs"] for r in parity.values())
    if log and is_mlflow_uri(uri):
        report["mlflow"] = log_export(uri, exported.path, report)
    return report


def log_export(uri: str, path: Path, report: dict) -> dict:
    """Log the export to the model's run and attach the file to the model (and its registered version)."""
    import onnx

    info = mlflow.models.get_model_info(uri)
    if not info.run_id:  # a model saved outside any run: nothing to log to
        return {}
    client = MlflowClient()
    out: dict = {"run_id": info.run_id}
    with mlflow.start_run(run_id=info.run_id) as run, tempfile.TemporaryDirectory() as tmp:
        onnx_info = mlflow.onnx.log_model(
            onnx.load(str(path)),
            name=ONNX_DIR,
            save_as_external_data=False,
            pip_requirements=["onnx", "onnxruntime", "numpy"],
        )
        out["onnx_model_uri"] = onnx_info.model_uri
        report_file = Path(tmp) / "onnx_export.json"
        report_file.write_text(json.dumps({**report, "onnx_model_uri": onnx_info.model_uri}, indent=2))
        mlflow.log_artifact(str(report_file), ONNX_DIR)
        if "logits_max_abs" in report:
            mlflow.log_metric("onnx_logits_max_abs", report["logits_max_abs"])
        out["run_id"] = run.info.run_id
    if info.model_id:  # the model itself (what a registered version points to) gets the file too
        client.log_model_artifact(info.model_id, str(path), ONNX_DIR)
        out["attached_to_model"] = info.model_id
    version = _registered_version(client, uri)
    if version is not None:
        name, number = version
        client.set_model_version_tag(name, number, "onnx_model_uri", onnx_info.model_uri)
        client.set_model_version_tag(name, number, "onnx_file", f"{ONNX_DIR}/{path.name}")
        if "logits_max_abs" in report:
            client.set_model_version_tag(
                name, number, "onnx_logits_max_abs", f"{report['logits_max_abs']:.3g}"
            )
        out["registered_version"] = f"models:/{name}/{number}"
    return out


def _registered_version(client: MlflowClient, uri: str) -> tuple[str, str] | None:
    """(name, version) of a ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` URI, else None."""
    if not uri.startswith("models:/"):
        return None
    ref = uri.removeprefix("models:/")
    try:
        if "@" in ref:
            name, alias = ref.split("@", 1)
            return name, client.get_model_version_by_alias(name, alias).version
        name, _, number = ref.partition("/")
        return (name, number) if number.isdigit() else None
    except MlflowException:
        return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model", required=True, help="models:/NAME@ALIAS, models:/NAME/V, runs:/ID/model or a dir"
    )
    p.add_argument("--out", default="model.onnx")
    p.add_argument("--check-batches", type=int, nargs="*", default=[1, 7], help="ORT parity at these sizes")
    p.add_argument("--logits-only", action="store_true", help="no kept-indices outputs (no parity check)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    p.add_argument("--no-mlflow", action="store_true", help="write the file only")
    p.add_argument(
        "--mlflow-uri", default=None, help="tracking URI (default: MLFLOW_TRACKING_URI / ./mlruns)"
    )
    args = p.parse_args(argv)
    if args.mlflow_uri:  # a password in it goes to MLflow's variables, never into what is logged
        mlflow.set_tracking_uri(resolve_tracking_uri(args.mlflow_uri, Path.cwd()))
    try:
        report = export_model(
            args.model,
            args.out,
            check_batches=tuple(args.check_batches) if not args.logits_only else (),
            with_indices=not args.logits_only,
            log=not args.no_mlflow,
            opset=args.opset,
        )
    except (ExportError, ParityError, FileNotFoundError, ValueError) as err:
        print(f"export failed: {err}", file=sys.stderr)
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
