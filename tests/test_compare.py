"""pipelines/compare.py: selectors on the same weights, one row each, logged to MLflow with the figures."""

import contextlib
import json
import re
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE
from tiny import tiny

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
    rows = compare.comparison_models(dense, [0.7, 0.5], dense_weights="d", spot_models=[(sparse, "s")])
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
    results = [r | {"noisy": i % 2 == 0} for i, r in enumerate(results)]  # both kinds, whatever the load
    with contextlib.chdir(pipeline_dir):
        run_id = compare.log_comparison(results, table, figures, tracking_uri=mlflow_uri,
                                        experiment="tests-compare", data=str(digits_shards))
    client = MlflowClient(mlflow_uri)
    run = client.get_run(run_id)
    assert run.data.metrics == {}  # the rows are a table artifact, not one-point metrics
    note = run.data.tags[MLFLOW_RUN_NOTE]  # the run page's description says what the run holds
    assert str(digits_shards) in note and "comparison_table.json" in note
    path = client.download_artifacts(run_id, "comparison_table.json", str(pipeline_dir))
    table = json.loads(Path(path).read_text())
    row = table["data"][5]
    assert row[table["columns"].index("top1")] == pytest.approx(results[5]["top1"], rel=1e-9)
    assert row[table["columns"].index("selector")] == "cls_attn_avg"
    for result, logged in zip(results, table["data"], strict=True):  # a noisy timing is no figure
        images_per_s = logged[table["columns"].index("images_per_s")]
        if result["noisy"]:
            assert images_per_s is None
        else:
            assert images_per_s == pytest.approx(result["images_per_s"], rel=1e-9)
    assert [d.dataset.name for d in run.inputs.dataset_inputs] == [f"{Path(digits_shards).name}-val"]
    names = {a.path for a in client.list_artifacts(run_id, "token_masks")}
    assert names == {f"token_masks/{f.name}" for f in figures}


def test_fine_tuned_class_attention_row_beside_the_training_free_one(
    trained, trained_heuristic, digits_shards, mlflow_uri, pipeline_dir, capsys
):
    """Table 7 as the paper did it: class attention fine-tuned from the same dense model, registered apart
    from SPOT's models, evaluated with its own weights next to the training-free row; compare.py --heuristic
    prints the row and refuses a model that is not a class-attention one."""
    from pipelines import compare as compare_cli

    runs = {"dense": trained["dense"], "spot": trained["spot"], "heuristic": trained_heuristic}
    uri = {k: f"models:/{r['registered_model']}/{r['registered_version']}" for k, r in runs.items()}
    assert trained_heuristic["registered_model"] == "spot-deit_t-cls-attn"
    mlflow.set_tracking_uri(mlflow_uri)
    with contextlib.chdir(pipeline_dir):
        dense, sparse, heuristic = (load_model(uri[k]) for k in ("dense", "spot", "heuristic"))
    assert heuristic.spot_options.selector == "cls_attn_avg" and heuristic.spot_predictors is None
    trained_away = [k for k, v in heuristic.state_dict().items() if not torch.equal(v, dense.state_dict()[k])]
    assert trained_away  # fine-tuned: its weights are not the dense model's
    rows = compare.comparison_models(dense, [0.5], dense_weights="d", spot_models=[(sparse, "s")],
                                     heuristic_models=[(heuristic, "h")])
    assert [labels["selector"] for labels, _ in rows] == [
        "none (dense)", "random", "cls_attn_avg", "cls_attn_avg (fine-tuned)", "learned (SPOT)"]
    labels, model = rows[3]
    assert labels["weights"] == "h" and model.spot_options.selector == "cls_attn_avg"
    for name, value in heuristic.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], value, rtol=0, atol=0)

    args = ["--dense", uri["dense"], "--spot", uri["spot"], "--heuristic", uri["heuristic"], "--rho", "0.5",
            "--data", str(digits_shards), "--mlflow-uri", mlflow_uri]
    with contextlib.chdir(pipeline_dir):
        assert compare_cli.main([*args, "--mlflow"]) == 0
        table = capsys.readouterr().out
        assert "| cls_attn_avg (fine-tuned) | " + uri["heuristic"] in table
        wrong = args[:4] + ["--heuristic", uri["spot"]] + args[6:]
        assert compare_cli.main(wrong) == 2
        assert "not one fine-tuned with --selector cls_attn_avg" in capsys.readouterr().err
        twice = args[:4] + ["--spot", uri["spot"]] + args[4:]  # --spot A --spot A: two models for one rho
        assert compare_cli.main(twice) == 2
    assert capsys.readouterr().err.strip() == (f"compare: error: --spot {uri['spot']}, {uri['spot']}: "
                                               "fine-tuned at the same rho 0.7; give one model per rho")
    # the command's MLflow run names the three models it compared and links them and their training runs
    [run_id] = re.findall(r"logged to MLflow run (\w+)", table)
    client = MlflowClient(mlflow_uri)
    run = client.get_run(run_id)
    for role, result in runs.items():
        assert run.data.params[f"{role}_uri"] == uri[role]
        assert run.data.params[f"{role}_version"] == uri[role].removeprefix("models:/")
        assert run.data.tags[f"{role}_source_run"] == result["mlflow_run_id"]
    assert len({m.model_id for m in run.inputs.model_inputs}) == 3
    assert "(dense, heuristic, spot models)" in run.data.tags[MLFLOW_RUN_NOTE]


def test_each_rho_is_compared_with_the_models_fine_tuned_at_it():
    """Given one SPOT and one class-attention model per rho (paper Table 7: each budget its own fine-tuned
    model), each rho's rows carry the weights of the model fine-tuned at that rho, whatever the order given;
    one model is compared at every rho; two models fine-tuned at one rho, or none of several at a compared
    rho, are refused naming the option."""
    torch.manual_seed(0)
    dense = tiny(rho=None)
    spot_at = {rho: tiny(rho=rho) for rho in (0.7, 0.5)}
    heuristic_at = {rho: tiny(rho=rho, selector="cls_attn_avg") for rho in (0.7, 0.5)}
    rows = compare.comparison_models(
        dense, [0.7, 0.5], dense_weights="d",
        spot_models=[(spot_at[0.7], "s0.7"), (spot_at[0.5], "s0.5")],
        heuristic_models=[(heuristic_at[0.5], "h0.5"), (heuristic_at[0.7], "h0.7")],
    )
    sources = {f"{kind}{rho}": models[rho] for kind, models in (("s", spot_at), ("h", heuristic_at))
               for rho in (0.7, 0.5)}
    finetuned = [(labels["selector"], labels["rho"], labels["weights"]) for labels, _ in rows
                 if labels["weights"] != "d"]
    assert finetuned == [
        ("cls_attn_avg (fine-tuned)", 0.7, "h0.7"), ("learned (SPOT)", 0.7, "s0.7"),
        ("cls_attn_avg (fine-tuned)", 0.5, "h0.5"), ("learned (SPOT)", 0.5, "s0.5"),
    ]
    for labels, model in rows:
        if labels["weights"] in sources:
            assert model.spot_config["rho"] == labels["rho"]
            for name, value in sources[labels["weights"]].state_dict().items():
                torch.testing.assert_close(model.state_dict()[name], value, rtol=0, atol=0)
    one = compare.comparison_models(dense, [0.7, 0.5, 0.6], dense_weights="d",
                                    spot_models=[(spot_at[0.5], "s")])
    assert [labels["rho"] for labels, _ in one if labels["weights"] == "s"] == [0.7, 0.5, 0.6]
    roles = compare.model_roles({"dense": [(dense, "d")], "spot": [(spot_at[0.7], "s0.7"),
                                                                   (spot_at[0.5], "s0.5")]})
    assert roles == {"dense": "d", "spot_rho0.7": "s0.7", "spot_rho0.5": "s0.5"}
    with pytest.raises(ValueError, match=r"^--spot s0.5, again: fine-tuned at the same rho 0.5; give one"):
        compare.comparison_models(dense, [0.5], dense_weights="d",
                                  spot_models=[(spot_at[0.5], "s0.5"), (spot_at[0.5], "again")])
    with pytest.raises(ValueError, match=r"^--rho 0.5: given twice; each rate is compared once$"):
        compare.comparison_models(dense, [0.5, 0.7, 0.5], dense_weights="d",
                                  spot_models=[(spot_at[0.5], "s")])
    with pytest.raises(ValueError, match=r"^--heuristic: none fine-tuned at rho 0.6 \(they were at 0.5, 0.7"):
        compare.comparison_models(dense, [0.7, 0.6], dense_weights="d",
                                  heuristic_models=[(heuristic_at[0.5], "h0.5"), (heuristic_at[0.7], "h0.7")])


def test_a_rate_given_twice_is_refused_before_anything_is_loaded(tmp_path, capsys):
    """``--rho 0.5 0.7 0.5``: exit 2 naming the rate, before the (here missing) models or data are read."""
    from pipelines import compare as compare_cli

    argv = ["--dense", str(tmp_path / "nowhere"), "--data", str(tmp_path / "no-data"),
            "--rho", "0.5", "0.7", "0.5"]
    assert compare_cli.main(argv) == 2
    assert capsys.readouterr().err.strip() == ("compare: error: --rho 0.5: given twice; "
                                               "each rate is compared once")
