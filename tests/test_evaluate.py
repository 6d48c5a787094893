"""pipelines/evaluate.py: the table of a registered SPOT model beside its dense baseline, logged to MLflow."""

import contextlib
import subprocess
import sys

import pytest
from mlflow import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE

from pipelines import evaluate


def test_table_of_model_and_baseline_matches_training_and_is_logged(
    trained, digits_shards, mlflow_uri, pipeline_dir, capsys
):
    sparse, dense = trained["spot"], trained["dense"]
    argv = [
        "--model",
        f"models:/{sparse['registered_model']}@champion",
        "--baseline",
        dense["checkpoint"],
        "--data",
        str(digits_shards),
        "--mlflow",
        "--mlflow-uri",
        mlflow_uri,
        "--experiment",
        "tests-eval",
    ]
    with contextlib.chdir(pipeline_dir):
        assert evaluate.main(argv) == 0
    out = capsys.readouterr().out
    rows = {
        line.split("|")[1].strip(): line.split("|")[2:-1]
        for line in out.splitlines()
        if line.startswith("| ")
    }
    assert float(rows["model"][0]) == pytest.approx(100 * sparse["best_val_acc1"], abs=0.005)
    assert float(rows["baseline"][0]) == pytest.approx(100 * dense["best_val_acc1"], abs=0.005)
    assert float(rows["model"][2]) < float(rows["baseline"][2])  # GMACs
    assert "model vs baseline: top-1" in out

    client = MlflowClient(mlflow_uri)
    experiment = client.get_experiment_by_name("tests-eval")
    [run] = client.search_runs([experiment.experiment_id])
    metrics = run.data.metrics
    assert metrics["model_top1"] == pytest.approx(sparse["best_val_acc1"])
    assert metrics["model_gmacs"] < metrics["baseline_gmacs"]
    for label in ("model", "baseline"):  # images/s is a metric exactly when the table shows a figure for it
        shown = rows[label][4].split()  # "median ±x %" or "noisy (±x %)"
        if shown[0] == "noisy":
            assert f"{label}_images_per_s" not in metrics
        else:
            assert metrics[f"{label}_images_per_s"] == pytest.approx(float(shown[0]), abs=0.5)
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["evaluation.md"]
    note = run.data.tags[MLFLOW_RUN_NOTE]  # the run page's description names what was evaluated on what
    assert argv[1] in note and dense["checkpoint"] in note and str(digits_shards) in note


def test_format_table_compares_two_rows():
    rows = [
        {
            "model": "spot",
            "top1": 0.795,
            "top5": 0.95,
            "gmacs": 2.8,
            "params_m": 22.5,
            "images_per_s": 300.0,
            "images_per_s_spread": 0.1,
            "noisy": False,
        },
        {
            "model": "dense",
            "top1": 0.798,
            "top5": 0.951,
            "gmacs": 4.6,
            "params_m": 22.0,
            "images_per_s": 200.0,
            "images_per_s_spread": 0.04,
            "noisy": False,
        },
    ]
    table = evaluate.format_table(rows)
    assert "| spot | 79.50 | 95.00 | 2.8 | 22.500 | 300 ±5 % |" in table
    assert table.endswith("spot vs dense: top-1 -0.30 points, 1.64x fewer GMACs, 1.50x throughput")

    rows[1] |= {"images_per_s_spread": 0.5, "noisy": True}  # shown as such, and gives no ratio
    table = evaluate.format_table(rows)
    assert "| dense | 79.80 | 95.10 | 4.6 | 22.000 | noisy (±25 %) |" in table
    assert table.endswith("1.64x fewer GMACs, throughput not compared (noisy timing)")


def test_missing_model_exits_with_one_line(digits_shards, tmp_path):
    proc = subprocess.run(
        [sys.executable, evaluate.__file__, "--model", str(tmp_path / "nope"), "--data", str(digits_shards)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2
    assert (
        proc.stderr.strip() == f"evaluate: error: no SPOT checkpoint or MLflow model at {tmp_path / 'nope'}"
    )
