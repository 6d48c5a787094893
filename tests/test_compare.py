"""pipelines/compare.py: selectors on the same weights, one row each, logged to MLflow with the figures."""

import contextlib

import mlflow
import pytest
import torch
from mlflow import MlflowClient

import spot
from pipelines.evaluation import compare
from pipelines.tracking.registry import load_model

pytestmark = pytest.mark.integration


def test_one_row_per_selector_and_rho_on_the_same_samples(trained, digits_shards, mlflow_uri, pipeline_dir):
    dense_uri, spot_uri = (f"models:/{r['registered_model']}/{r['registered_version']}"
                           for r in (trained["dense"], trained["spot"]))
    mlflow.set_tracking_uri(mlflow_uri)  # where models:/ URIs are looked up
    with contextlib.chdir(pipeline_dir):
        dense, sparse = load_model(dense_uri), load_model(spot_uri)
    rows = compare.comparison_models(dense, sparse, [0.7, 0.5], dense_weights="d", spot_weights="s")
    selectors = [(labels["selector"], labels["rho"]) for labels, _ in rows]
    assert selectors == [("none (dense)", None)] + [
        (s, rho) for rho in (0.7, 0.5) for s in ("random", "cls_attn_avg", "learned (SPOT)")
    ]
    # the training-free rows carry the dense weights, the SPOT rows the fine-tuned ones
    for (labels, model), source in zip(rows, [dense] + [dense, dense, sparse] * 2, strict=True):
        assert model.spot_config["rho"] == labels["rho"]
        for name, value in source.state_dict().items():
            torch.testing.assert_close(model.state_dict()[name], value, rtol=0, atol=0)

    results = compare.compare(
        rows, digits_shards, batch_size=64, throughput_batch=8, device=torch.device("cpu")
    )
    assert {r["samples"] for r in results} == {360}  # the whole val split for every row
    for r, (_, model) in zip(results, rows, strict=True):
        assert r["gmacs"] == spot.gmacs(model, 32)
        assert 0.0 <= r["top1"] <= 1.0 and r["images_per_s"] > 0
    # the same kept counts; SPOT adds its relevance modules' cost
    assert results[1]["gmacs"] == results[2]["gmacs"] < results[3]["gmacs"] < results[0]["gmacs"]

    table = compare.format_comparison(results)
    assert len(table.strip().splitlines()) == 2 + len(rows)
    figures = compare.mask_figures(rows, digits_shards, pipeline_dir / "figures", images=4)
    assert len(figures) == 6 and all(f.stat().st_size > 0 for f in figures)
    with contextlib.chdir(pipeline_dir):
        run_id = compare.log_comparison(results, table, figures, tracking_uri=mlflow_uri,
                                        experiment="tests-compare", data=str(digits_shards))
    client = MlflowClient(mlflow_uri)
    run = client.get_run(run_id)
    assert run.data.metrics["cls_attn_avg_rho0.5_top1"] == results[5]["top1"]
    names = {a.path for a in client.list_artifacts(run_id, "token_masks")}
    assert names == {f"token_masks/{f.name}" for f in figures}
