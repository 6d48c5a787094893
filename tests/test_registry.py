"""pipelines/registry.py: registered SPOT models load back (no pickled code) and keep their accuracy; the
champion alias only moves to a strictly more accurate model that costs no more GFLOPs."""

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient

import spot
from pipelines.evaluate import evaluate_model
from pipelines.registry import CHAMPION, load_model, register_checkpoint
from tests.tiny import TINY_NORMALIZATION


def test_champion_loads_and_reproduces_the_logged_validation_accuracy(trained, digits_shards, mlflow_uri):
    mlflow.set_tracking_uri(mlflow_uri)
    sparse = trained["spot"]
    model = load_model(f"models:/{sparse['registered_model']}@{CHAMPION}")
    assert not model.training and model.spot_config["rho"] == 0.7
    assert spot.input_normalization(model) == {k: tuple(v) for k, v in TINY_NORMALIZATION.items()}
    accuracy = evaluate_model(model, digits_shards, batch_size=32, device=torch.device("cpu"))
    assert accuracy["samples"] == 360
    assert accuracy["top1"] == pytest.approx(sparse["best_val_acc1"], abs=1e-9)
    assert accuracy["top5"] == pytest.approx(sparse["best_val_acc5"], abs=1e-9)


def test_pyfunc_predicts_the_module_logits(trained, mlflow_uri):
    mlflow.set_tracking_uri(mlflow_uri)
    uri = f"models:/{trained['spot']['registered_model']}@{CHAMPION}"
    pyfunc = mlflow.pyfunc.load_model(uri)
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = load_model(uri)(images).numpy()
    np.testing.assert_allclose(pyfunc.predict(images.numpy()), expected, rtol=1e-5, atol=1e-6)


def test_champion_moves_only_for_better_accuracy_at_no_more_gflops(trained, tmp_path):
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'registry.db'}")
    client = MlflowClient()
    experiment = client.create_experiment("registry", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id
    steps = [  # (val top-1, GFLOPs, becomes champion)
        (0.50, 1.0, True),  # first version
        (0.60, 1.2, False),  # more accurate but more expensive
        (0.55, 0.9, True),  # more accurate and cheaper than v1
        (0.55, 0.8, False),  # cheaper but not more accurate
        (0.56, 0.9, True),  # more accurate at equal GFLOPs
    ]
    for version, (acc, gflops, promoted) in enumerate(steps, start=1):
        metrics = {"val_acc1": acc, "val_acc5": 1.0, "gflops": gflops, "epoch": 0}
        out = register_checkpoint(
            trained["spot"]["checkpoint"], run_id=run_id, name="spot-test", metrics=metrics
        )
        assert (out["version"], out["champion"]) == (version, promoted)
    champion = client.get_model_version_by_alias("spot-test", CHAMPION)
    assert int(champion.version) == 5 and champion.tags["val_acc1"] == "0.560000"


def test_load_model_names_what_is_missing(tmp_path, mlflow_uri):
    with pytest.raises(FileNotFoundError, match="no SPOT checkpoint or MLflow model"):
        load_model(tmp_path)
    (tmp_path / "spot_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="model.pt is missing"):
        load_model(tmp_path)
    mlflow.set_tracking_uri(mlflow_uri)
    with pytest.raises(ValueError, match="cannot load MLflow model models:/no-such-model@champion"):
        load_model("models:/no-such-model@champion")
