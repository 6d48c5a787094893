"""The export command's library half: a model to ONNX, its parity in ONNX Runtime, and the export logged
beside the model's MLflow run and to its registered version (see ``pipelines/export.py``)."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import mlflow
import onnx
import torch
from mlflow import MlflowClient
from mlflow.entities import LoggedModelOutput
from torch.onnx._constants import ONNX_MAX_OPSET

import spot
from pipelines.tracking.lineage import registered_version
from pipelines.tracking.registry import load_model
from pipelines.tracking.uri import MODEL_URI_PREFIXES
from pipelines.utils.errors import ConfigError, check
from spot.export import check_onnx, export_onnx

ONNX_DIR = "onnx"  # artifact directory of the export in the run and in the model
MIN_OPSET = 18  # torch's dynamo exporter writes opset 18 and later (an older request came back as 18)


class ParityError(RuntimeError):
    """The exported model does not reproduce the eager model."""


def check_export_options(check_batches: tuple[int, ...], opset: int | None) -> None:
    """Bad export options as one ``ConfigError`` naming flag and value (before any model is loaded)."""
    bad = [b for b in check_batches if b < 1]
    check(not bad, f"--check-batches {' '.join(map(str, bad))}: batch sizes must be >= 1")
    check(opset is None or MIN_OPSET <= opset <= ONNX_MAX_OPSET,
          f"--opset {opset}: the exporter writes opsets {MIN_OPSET} to {ONNX_MAX_OPSET}")


def is_mlflow_uri(uri: str) -> bool:
    return uri.startswith(MODEL_URI_PREFIXES) or (Path(uri) / "MLmodel").is_file()


def export_model(
    uri: str,
    out: str | Path,
    *,
    check_batches: tuple[int, ...] = (1, 7),
    with_indices: bool = True,
    log: bool = True,
    opset: int | None = None,
    model: torch.nn.Module | None = None,
) -> dict:
    """Export the model at ``uri`` to ``out``, check it in ONNX Runtime, and log it to MLflow (if any).

    ``model``: the model at ``uri``, if loaded already. Returns the export report (path, outputs, parity
    per batch size, MLflow places). Raises ``ConfigError`` for bad options (before the model is loaded)
    and for an opset other than the one asked for (the file is removed).
    """
    check_export_options(tuple(check_batches), opset)
    model = load_model(uri) if model is None else model
    start = time.perf_counter()
    exported = export_onnx(model, out, with_indices=with_indices, opset=opset)
    if opset is not None and exported.opset != opset:
        exported.path.unlink(missing_ok=True)
        raise ConfigError(f"--opset {opset}: the exporter wrote opset {exported.opset}; nothing kept")
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
    """Log the export as an output of the model's run and attach the file to the model (and its registered
    version)."""

    info = mlflow.models.get_model_info(uri)
    client = MlflowClient()
    # a registered model's MLmodel names no run (it is logged outside the run: registry.register_checkpoint);
    # its logged model names the run that made it
    run_id = info.run_id or (info.model_id and client.get_logged_model(info.model_id).source_run_id)
    if not run_id:  # a model saved outside any run: nothing to log to
        return {}
    out: dict = {"run_id": run_id}
    run = client.get_run(run_id)
    exported = onnx.load(str(path))
    # logged beside the run, not in it: reopening the run would link its metrics (system/* too) to the ONNX
    # model and end the run again; the run's status and end time stay as training left them. The ONNX model
    # is the run's output at the step of the model it was exported from, with the run's params.
    onnx_model = mlflow.initialize_logged_model(name=ONNX_DIR, source_run_id=run_id,
                                                experiment_id=run.info.experiment_id, params=run.data.params)
    onnx_info = mlflow.onnx.log_model(
        exported,
        name=ONNX_DIR,
        model_id=onnx_model.model_id,
        save_as_external_data=False,
        pip_requirements=["onnx", "onnxruntime", "numpy"],
    )
    outputs = run.outputs.model_outputs if run.outputs else []
    step = next((o.step for o in outputs if o.model_id == info.model_id), 0)
    client.log_outputs(run_id, [LoggedModelOutput(onnx_model.model_id, step=step)])
    out["onnx_model_uri"] = onnx_info.model_uri
    with tempfile.TemporaryDirectory() as tmp:
        report_file = Path(tmp) / "onnx_export.json"
        report_file.write_text(json.dumps({**report, "onnx_model_uri": onnx_info.model_uri}, indent=2))
        client.log_artifact(run_id, str(report_file), ONNX_DIR)
    if "logits_max_abs" in report:  # on the run, and linked to the ONNX model it measures
        client.log_metric(run_id, "onnx_logits_max_abs", report["logits_max_abs"],
                          model_id=onnx_model.model_id)
    if info.model_id:  # the model itself (what a registered version points to) gets the file too
        client.log_model_artifact(info.model_id, str(path), ONNX_DIR)
        out["attached_to_model"] = info.model_id
    version = registered_version(client, uri)
    if version is not None:
        name, number = version.name, version.version
        client.set_model_version_tag(name, number, "onnx_model_uri", onnx_info.model_uri)
        client.set_model_version_tag(name, number, "onnx_file", f"{ONNX_DIR}/{path.name}")
        if "logits_max_abs" in report:
            client.set_model_version_tag(
                name, number, "onnx_logits_max_abs", f"{report['logits_max_abs']:.3g}"
            )
        out["registered_version"] = f"models:/{name}/{number}"
    return out
