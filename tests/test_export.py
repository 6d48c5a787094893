"""ONNX export (spot/export.py, pipelines/export.py): tiny models of each backbone family export with a
dynamic batch, ONNX Runtime keeps the same tokens and gives the eager logits, the export is logged to MLflow
and attached to the registered version, and a model with an operator ONNX lacks fails naming its module."""

import json

import mlflow
import numpy as np
import onnx
import pytest
import torch
from mlflow import MlflowClient
from mlflow.entities import LoggedModelStatus
from tiny import tiny
from torch import nn

from pipelines import export as export_cli
from pipelines.tracking.registry import CHAMPION, register_checkpoint
from spot.export import (
    LOGITS_ATOL,
    ExportError,
    check_onnx,
    eager_outputs,
    export_onnx,
    ort_session,
    run_onnx,
)

CASES = [
    ("deit_s", "learned", {}),
    ("lvvit_s", "learned", {}),
    ("deit_s", "cls_attn_avg", {"fuse_dropped": True}),
    ("lvvit_s", "random", {}),
]


@pytest.mark.parametrize(
    ("name", "selector", "options"), CASES, ids=["deit", "lvvit", "deit-cls-fused", "lvvit-random"]
)
def test_tiny_model_exports_and_ort_keeps_the_same_tokens_and_logits(name, selector, options, tmp_path):
    model = tiny(name, rho=0.7, selector=selector, **options).eval()
    exported = export_onnx(model, tmp_path / "m.onnx")
    graph = onnx.load(str(exported.path)).graph
    assert [i.name for i in graph.input] == ["images"]
    assert [o.name for o in graph.output] == ["logits", "kept_0", "kept_1", "kept_2"]
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert [o.type.tensor_type.shape.dim[1].dim_value for o in graph.output[1:]] == exported.keep_counts
    assert model.spot_mode == "prune" and not model.training
    reports = check_onnx(model, exported.path, batch_sizes=(1, 6))
    for report in reports.values():
        assert report["selection_errors"] == []
        assert report["mismatched_images"] == 0
        assert report["logits_max_abs"] <= LOGITS_ATOL
        assert report["ok"]
    assert all(r["indices"] == ("replayed" if selector == "random" else "compared") for r in reports.values())


def test_dense_model_exports_the_same_way_and_the_model_keeps_its_mode(tmp_path):
    model = tiny("deit_s", rho=None).train()
    exported = export_onnx(model, tmp_path / "dense.onnx")
    assert exported.outputs == ["logits"] and exported.keep_counts == []
    assert model.training and model.spot_mode == "mask"
    model.eval()
    images = np.random.default_rng(0).standard_normal((5, 3, 32, 32), dtype=np.float32)
    got = run_onnx(ort_session(exported.path), images)
    np.testing.assert_allclose(
        got["logits"], eager_outputs(model, images)["logits"], atol=LOGITS_ATOL, rtol=0
    )


def test_a_wrong_selection_from_a_runtime_is_reported():
    model = tiny("deit_s", rho=0.7).eval()
    images = np.random.default_rng(1).standard_normal((3, 3, 32, 32), dtype=np.float32)
    from spot.export import check_outputs

    good = eager_outputs(model, images)
    assert check_outputs(model, images, good)["ok"]
    swapped = {**good, "kept_2": good["kept_2"].copy()}
    swapped["kept_2"][0, 0] = np.setdiff1d(good["kept_1"][0], good["kept_2"][0])[0]  # another kept-1 token
    report = check_outputs(model, images, swapped)
    assert not report["ok"] and report["stages"]["kept_2"] == 1 and report["mismatched_images"] == 1
    dropped = {**good, "kept_1": good["kept_1"][:, :-1]}
    assert (
        "kept_1: 6 tokens per image, expected 7" in check_outputs(model, images, dropped)["selection_errors"]
    )


@torch.library.custom_op("spot_test::mystery", mutates_args=())
def _mystery(x: torch.Tensor) -> torch.Tensor:
    return x * 2.0


@_mystery.register_fake
def _(x):
    return torch.empty_like(x)


class Mystery(nn.Module):
    """An activation ONNX has no translation for (a custom operator)."""

    def forward(self, x):
        return _mystery(x)


class DataDependent(nn.Module):
    """An activation with Python control flow on tensor values (blocks ``torch.export``)."""

    def forward(self, x):
        return x if x.sum() > 0 else -x


@pytest.mark.parametrize(
    ("module", "stage"), [(Mystery, "has no ONNX translation"), (DataDependent, "torch.export")]
)
def test_a_model_that_cannot_be_exported_fails_naming_the_module(module, stage, tmp_path):
    model = tiny("deit_s", rho=None).eval()  # dense: the same capture and translation, fewer ops
    model.blocks[1].mlp.act = module()
    with pytest.raises(
        ExportError, match=rf"module 'blocks\.1\.mlp\.act' \({module.__name__}\).*{stage}"
    ) as err:
        export_onnx(model, tmp_path / "m.onnx")
    assert err.value.module == "blocks.1.mlp.act"
    assert not (tmp_path / "m.onnx").exists()


def _checkpoint(directory, model):
    directory.mkdir()
    (directory / "spot_config.json").write_text(json.dumps(model.spot_config))
    torch.save(model.state_dict(), directory / "model.pt")
    return directory


def test_cli_exports_the_champion_and_attaches_it_to_the_registered_version(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    client = MlflowClient()
    experiment = client.create_experiment("export", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id
    model = tiny("lvvit_s", rho=0.7).eval()
    checkpoint = _checkpoint(tmp_path / "ckpt", model)
    metrics = {"val_acc1": 0.5, "val_acc5": 0.9, "gmacs": 0.01, "epoch": 1}
    client.log_metric(run_id, "system/cpu_utilization_percentage", 50.0, step=0)
    client.log_param(run_id, "backbone", "lvvit_s")
    client.log_metric(run_id, "val_acc1", 0.5, step=1)
    register_checkpoint(checkpoint, run_id=run_id, name="spot-lvvit_s", metrics=metrics)
    client.set_terminated(run_id, "FINISHED", end_time=1_700_000_000_000)

    out = tmp_path / "model.onnx"
    argv = ["--model", f"models:/spot-lvvit_s@{CHAMPION}", "--out", str(out), "--mlflow-uri", uri]
    assert export_cli.main([*argv, "--check-batches", "1", "5"]) == 0
    printed = capsys.readouterr().out
    assert "batch   1: kept indices compared (0 images differ)" in printed

    version = client.get_model_version_by_alias("spot-lvvit_s", CHAMPION)
    assert float(version.tags["onnx_logits_max_abs"]) <= LOGITS_ATOL
    # the registered version's own artifacts hold the ONNX file next to the PyTorch model
    local = mlflow.artifacts.download_artifacts(
        f"models:/spot-lvvit_s@{CHAMPION}", dst_path=str(tmp_path / "dl")
    )
    session = ort_session(f"{local}/{version.tags['onnx_file']}")
    images = np.random.default_rng(2).standard_normal((2, 3, 32, 32), dtype=np.float32)
    expected = eager_outputs(model, images)
    np.testing.assert_allclose(
        run_onnx(session, images)["logits"], expected["logits"], atol=LOGITS_ATOL, rtol=0
    )
    # the run has the export: an onnx flavor model (served by ORT through pyfunc) and the report
    assert (tmp_path / "artifacts").exists()
    pyfunc = mlflow.pyfunc.load_model(version.tags["onnx_model_uri"])
    predicted = pyfunc.predict(images)
    np.testing.assert_allclose(predicted["logits"], expected["logits"], atol=LOGITS_ATOL, rtol=0)
    report = json.loads(mlflow.artifacts.load_text(f"runs:/{run_id}/onnx/onnx_export.json"))
    assert report["keep_counts"] == [11, 7, 5] and report["parity"]["5"]["ok"]
    run = client.get_run(run_id)
    assert run.data.metrics["onnx_logits_max_abs"] <= LOGITS_ATOL
    # the training run is not reopened: its status and end time stay, and the ONNX model's one linked
    # metric is its own parity (no step-0 or system/* metrics of the run)
    assert (run.info.status, run.info.end_time) == ("FINISHED", 1_700_000_000_000)
    onnx_model = client.get_logged_model(version.tags["onnx_model_uri"].removeprefix("models:/"))
    assert onnx_model.source_run_id == run_id and onnx_model.status == LoggedModelStatus.READY
    assert [m.key for m in onnx_model.metrics] == ["onnx_logits_max_abs"]
    assert onnx_model.params == run.data.params == {"backbone": "lvvit_s"}
    # an output of the run at the step of the model it was exported from, and no other run was made
    steps = {o.model_id: o.step for o in run.outputs.model_outputs}
    source = mlflow.models.get_model_info(f"models:/spot-lvvit_s@{CHAMPION}").model_id
    assert steps[onnx_model.model_id] == steps[source] == 1
    assert mlflow.active_run() is None and len(client.search_runs([experiment])) == 1


def test_cli_exports_a_checkpoint_directory_without_mlflow(tmp_path, capsys):
    checkpoint = _checkpoint(tmp_path / "ckpt", tiny("deit_s", rho=None).eval())
    assert (
        export_cli.main(
            ["--model", str(checkpoint), "--out", str(tmp_path / "d.onnx"), "--check-batches", "3"]
        )
        == 0
    )
    assert (tmp_path / "d.onnx").is_file()
    assert export_cli.main(["--model", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.onnx")]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()  # bad input: one line, exit 2 as every command
    assert line.startswith("export: error: ") and "nowhere" in line, line
    from pipelines import parity

    assert parity.main(["--model", str(tmp_path / "nowhere"), "--onnx", "x.onnx"]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("parity: error: ") and "nowhere" in line, line
    with pytest.raises(SystemExit) as raised:
        parity.main(["--model", str(checkpoint)])  # none of --write-images / --onnx / --images
    assert raised.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "parity: error: give --write-images, --onnx, or --images with --outputs"
    ]


def test_parity_script_checks_any_runtimes_saved_outputs(tmp_path, capsys):
    from pipelines import parity

    model = tiny("deit_s", rho=0.7).eval()
    checkpoint = _checkpoint(tmp_path / "ckpt", model)
    images = tmp_path / "images.npy"
    assert parity.main(["--model", str(checkpoint), "--write-images", str(images), "--batch", "4"]) == 0
    outputs = eager_outputs(model, np.load(images))  # what a faithful runtime would give
    np.savez(tmp_path / "good.npz", **outputs)
    argv = ["--model", str(checkpoint), "--images", str(images)]
    assert parity.main([*argv, "--outputs", str(tmp_path / "good.npz")]) == 0
    outputs["logits"][1, 3] += 1e-3
    np.savez(tmp_path / "bad.npz", **outputs)
    assert parity.main([*argv, "--outputs", str(tmp_path / "bad.npz")]) == 1
    assert "batch 4: FAILED" in capsys.readouterr().out
