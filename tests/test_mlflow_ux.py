"""What a user finds in MLflow after a fine-tune (issue 24), read back through MlflowClient from the real
SQLite store the ``trained`` runs wrote: the logged models, the dataset inputs, the metric names, and an
evaluation run's lineage."""

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT, MLFLOW_MODEL_VERSIONS, MLFLOW_RUN_NOTE

from pipelines.storage.checkpoints import METRICS_FILE
from pipelines.tracking.datasets import shard_split
from pipelines.tracking.lineage import logged_model_id
from pipelines.tracking.mlflow_run import PARENT_TAG, MlflowRun, log_results


def _registered(client: MlflowClient, result: dict):
    return client.get_model_version(result["registered_model"], str(result["registered_version"]))


@pytest.mark.parametrize("which", ["dense", "spot"])
def test_a_logged_model_carries_its_checkpoints_epoch_metrics_name_description_and_tags(
    trained, mlflow_uri, which
):
    result = trained[which]
    checkpoint = json.loads((Path(result["checkpoint"]) / METRICS_FILE).read_text())
    if which == "dense":  # from scratch, the last of 2 epochs is the best: epoch 0's values would differ
        assert checkpoint["epoch"] == 1
    client = MlflowClient(mlflow_uri)
    version = _registered(client, result)
    model = client.get_logged_model(logged_model_id(version))

    assert model.name == result["registered_model"] != "model"
    versions_tag = json.loads(model.tags[MLFLOW_MODEL_VERSIONS])  # the UI: "Model versions"
    assert {"name": version.name, "version": str(version.version)} in [
        {"name": e["name"], "version": str(e["version"])} for e in versions_tag]
    assert model.source_run_id == result["mlflow_run_id"]
    linked = {m.key: m for m in model.metrics}
    for key in ("val_acc1", "val_acc5", "val_total", "train_total"):
        assert linked[key].step == checkpoint["epoch"], key
        assert linked[key].value == pytest.approx(checkpoint[key]), key
    assert linked["val_acc1"].value == pytest.approx(result["best_val_acc1"])
    assert {m.step for m in model.metrics} == {checkpoint["epoch"]}  # no other epoch's values
    assert "gmacs" not in linked  # a run param, and the tags and description's figure below

    for tags in (model.tags, version.tags):
        assert tags["epoch"] == str(checkpoint["epoch"])
        assert float(tags["val_acc1"]) == pytest.approx(checkpoint["val_acc1"])
        assert float(tags["gmacs"]) == pytest.approx(checkpoint["gmacs"], abs=1e-6)
        assert tags["rho"] == ("1.0 (dense)" if which == "dense" else "0.7")
    description = model.tags[MLFLOW_RUN_NOTE]
    assert version.description == description
    assert f"val top-1 {100 * checkpoint['val_acc1']:.2f} %" in description
    assert f"{checkpoint['gmacs']:.4f} GMACs" in description
    assert ("dense ViT" if which == "dense" else "SPOT ViT, keep rate rho 0.7") in description
    assert str(Path(client.get_run(result["mlflow_run_id"]).data.params["data"])) in description
    assert client.get_registered_model(result["registered_model"]).description
    run_note = client.get_run(result["mlflow_run_id"]).data.tags[MLFLOW_RUN_NOTE]
    assert run_note.startswith("dense deit_t" if which == "dense" else "SPOT (rho 0.7) deit_t")


@pytest.mark.parametrize("which", ["dense", "spot"])
def test_a_logged_models_metrics_name_the_dataset_they_were_measured_on(
    trained, mlflow_uri, digits_shards, which
):
    """The logged model's "Datasets used" and its metrics' Dataset column: each ``val_*`` metric carries the
    val split's dataset (name and digest) as the run logged it as an input, each ``train_*`` the train
    split's; the links are the run's own values of the best epoch and no ``system/*`` sample."""
    result = trained[which]
    client = MlflowClient(mlflow_uri)
    run = client.get_run(result["mlflow_run_id"])
    inputs = {{t.key: t.value for t in i.tags}[MLFLOW_DATASET_CONTEXT]: i.dataset
              for i in run.inputs.dataset_inputs}
    val, train = inputs["validation"], inputs["training"]
    expected_val = shard_split(digits_shards, "val")
    assert (val.name, val.digest) == (expected_val.name, expected_val.digest)
    model_id = logged_model_id(_registered(client, result))
    model = client.get_logged_model(model_id)
    epoch = json.loads((Path(result["checkpoint"]) / METRICS_FILE).read_text())["epoch"]

    linked = {m.key: m for m in model.metrics}
    assert linked.keys() == {k for k in run.data.metrics if not k.startswith("system/")}
    for key, metric in linked.items():
        expected = val if key.startswith("val_") else train if key.startswith("train_") else None
        named = (None, None) if expected is None else (expected.name, expected.digest)
        assert (metric.dataset_name, metric.dataset_digest) == named, key
        history = {(m.step, m.timestamp, m.value) for m in client.get_metric_history(run.info.run_id, key)}
        assert metric.step == epoch and (metric.step, metric.timestamp, metric.value) in history, key
    assert {"val_acc1", "val_acc5", "val_ce", "train_ce", "train_total"} <= linked.keys()
    assert "lr_backbone" in linked and linked["lr_backbone"].dataset_name is None  # no data measured
    assert {(m.dataset_name, m.dataset_digest) for m in model.metrics if m.dataset_name} == {
        (val.name, val.digest), (train.name, train.digest)}  # the UI's "Datasets used"
    # linking added no second value to the run's history, and the model is the run's output at that epoch
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_acc1")] == [0, 1]
    assert [o.step for o in run.outputs.model_outputs if o.model_id == model_id] == [epoch]


def test_training_runs_on_the_same_shards_share_one_dataset_per_split(trained, mlflow_uri, digits_shards):
    client = MlflowClient(mlflow_uri)
    logged = {}
    for which in ("dense", "spot"):
        inputs = client.get_run(trained[which]["mlflow_run_id"]).inputs.dataset_inputs
        logged[which] = {
            {t.key: t.value for t in i.tags}[MLFLOW_DATASET_CONTEXT]: i.dataset for i in inputs
        }
    assert logged["dense"].keys() == {"training", "validation"}
    for context, split in (("training", "train"), ("validation", "val")):
        dense, sparse = logged["dense"][context], logged["spot"][context]
        assert (dense.name, dense.digest) == (sparse.name, sparse.digest)
        expected = shard_split(digits_shards, split)
        assert (dense.name, dense.digest) == (expected.name, expected.digest)
        assert json.loads(dense.profile)["num_samples"] == {"train": 1437, "val": 360}[split]
        assert json.loads(dense.source)["uri"] == Path(digits_shards).resolve().as_uri()
    assert logged["dense"]["training"].digest != logged["dense"]["validation"].digest


def test_runs_log_only_meaningful_metrics_under_one_name_per_quantity(trained, trained_heuristic, mlflow_uri):
    client = MlflowClient(mlflow_uri)
    dense = client.get_run(trained["dense"]["mlflow_run_id"]).data.metrics
    sparse = client.get_run(trained["spot"]["mlflow_run_id"]).data.metrics
    heuristic = client.get_run(trained_heuristic["mlflow_run_id"]).data.metrics
    # the epoch is the step, GMACs a run param: no per-epoch metric
    for metrics in (dense, sparse, heuristic):
        assert not {"epoch", "gmacs"} & metrics.keys()
    # class attention keeps a fixed count per stage: its rate loss and kept shares would be flat lines
    assert "train_kl" in heuristic and "val_acc1" in heuristic
    assert not [k for k in heuristic if "rate" in k or "kept" in k or "keep_gap" in k], sorted(heuristic)
    # SPOT's Gumbel keep rates move in training: logged per stage; validation prunes to fixed counts
    assert {f"train_kept_s{k}" for k in (1, 2, 3)} <= sparse.keys() and "train_rate" in sparse
    assert not [k for k in sparse if k.startswith("val_") and ("rate" in k or "kept" in k)], sorted(sparse)
    # dense from scratch: no token selection, no teacher -> no rate / KL / token loss parts at all
    for part in ("rate", "kl", "token"):
        assert f"train_{part}" not in dense and f"val_{part}" not in dense
    assert {"train_ce", "val_ce", "train_total", "val_total"} <= dense.keys()
    # SPOT from the dense teacher: rate and KL are real numbers, not zeros
    assert sparse["train_rate"] > 0 and sparse["train_kl"] > 0
    # the same quantity under the same name in both runs (the dense run's groups are all fresh)
    assert "lr_backbone" in dense and "lr_backbone" in sparse and "lr_predictor" in sparse
    assert not [k for k in dense if k.startswith("lr_") and k != "lr_backbone"]
    assert not any(k.endswith("_no_decay") for k in dense.keys() | sparse.keys())


def test_an_evaluation_run_logs_what_it_evaluated_its_dataset_and_a_table(
    trained, mlflow_uri, digits_shards, pipeline_dir, monkeypatch, tmp_path
):
    monkeypatch.chdir(pipeline_dir)
    client = MlflowClient(mlflow_uri)
    models = {role: f"models:/{r['registered_model']}/{r['registered_version']}" for role, r in
              (("dense", trained["dense"]), ("spot", trained["spot"]))}
    parent = MlflowRun.create(mlflow_uri, "tests-lineage", "demo-parent")
    rows = [{"selector": "none (dense)", "rho": None, "top1": 0.5},
            {"selector": "random", "rho": 0.7, "top1": 0.25}]
    run_id = log_results(mlflow_uri, "tests-lineage", "compare", params={"data": str(digits_shards)},
                         metrics={}, text=("t.md", "x"), data=str(digits_shards), models=models,
                         table=(rows, "comparison_table.json"), parent=parent)
    run = client.get_run(run_id)
    assert run.data.tags[PARENT_TAG] == parent.run_id
    for role, result in (("dense", trained["dense"]), ("spot", trained["spot"])):
        assert run.data.params[f"{role}_uri"] == models[role]
        version = f"{result['registered_model']}/{result['registered_version']}"
        assert run.data.params[f"{role}_version"] == version
        assert run.data.tags[f"{role}_source_run"] == result["mlflow_run_id"]
    model_ids = {logged_model_id(_registered(client, trained[w])) for w in ("dense", "spot")}
    assert {m.model_id for m in run.inputs.model_inputs} == model_ids
    [dataset] = run.inputs.dataset_inputs
    assert dataset.dataset.digest == shard_split(digits_shards, "val").digest
    path = client.download_artifacts(run_id, "comparison_table.json", str(tmp_path))
    table = json.loads(Path(path).read_text())
    assert table["columns"] == ["selector", "rho", "top1"]
    assert [r[2] for r in table["data"]] == [0.5, 0.25]


def test_training_runs_log_the_hosts_system_metrics(trained, mlflow_uri):
    client = MlflowClient(mlflow_uri)
    for which in ("dense", "spot"):
        run_id = trained[which]["mlflow_run_id"]
        metrics = client.get_run(run_id).data.metrics
        assert 0 <= metrics["system/cpu_utilization_percentage"] <= 100
        assert metrics["system/system_memory_usage_megabytes"] > 0
        history = client.get_metric_history(run_id, "system/cpu_utilization_percentage")
        assert [m.step for m in history] == list(range(len(history)))  # sampled during training, in order


def test_a_spot_run_logs_its_token_mask_figure_as_an_image_per_epoch(trained, mlflow_uri):
    client = MlflowClient(mlflow_uri)
    run_id = trained["spot"]["mlflow_run_id"]
    images = [a.path for a in client.list_artifacts(run_id, "images")]
    figures = [p for p in images if p.startswith("images/token_masks+step+") and "compressed" not in p]
    steps = sorted(int(p.split("+step+")[1].split("+")[0]) for p in figures if p.endswith(".png"))
    assert steps == trained["spot"]["epochs_logged"]
    dense = client.list_artifacts(trained["dense"]["mlflow_run_id"], "images")
    assert dense == []  # a dense model selects no tokens: no figure



def test_a_training_run_opens_as_a_child_of_the_demos_parent(tiny_options, tmp_path, mlflow_uri):
    """The demo's path (job.open_mlflow_run with a parent): the training run is a child of the parent run,
    with its description and its shard splits as datasets; no Ray involved."""
    from pipelines.training.config import resolve_config
    from pipelines.training.job import open_mlflow_run
    from pipelines.training.weights import ModelSummary

    parent = MlflowRun.create(mlflow_uri, "tests-ux-parent", "demo-parent")
    config = resolve_config(tiny_options | {"experiment": "tests-ux-parent", "run_name": "demo-dense-child",
                                            "storage": str(tmp_path / "runs"), "dense": True})
    run = open_mlflow_run(config, ModelSummary(gmacs=0.01, dense_gmacs=0.01, params=1000), parent=parent)
    client = MlflowClient(mlflow_uri)
    child = client.get_run(run.run_id)
    assert child.data.tags[PARENT_TAG] == parent.run_id and child.info.run_name == "demo-dense-child"
    assert child.data.tags[MLFLOW_RUN_NOTE].startswith("dense deit_t")
    assert {d.tags[0].value for d in child.inputs.dataset_inputs} == {"training", "validation"}
    run.end("FINISHED")
    parent.end("FINISHED")
