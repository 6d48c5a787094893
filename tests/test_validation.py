"""Bad values refused before any work (issue 27): one line, exit 2, no MLflow run, nothing in storage.

The commands' own ``main`` runs in this process with real files; no Ray is started (the one check that
needs a cluster joins the session's local Ray)."""

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from mlflow import MlflowClient

import spot
from pipelines import compare as compare_cli
from pipelines import evaluate as evaluate_cli
from pipelines import export as export_cli
from pipelines import finetune, make_shards
from pipelines.data.shards import ensure_builtin_shards
from pipelines.evaluation.options import check_model_source
from pipelines.storage.checkpoints import CONFIG_FILE, MODEL_FILE
from pipelines.training.config import (
    DIGITS_DIR,
    DIGITS_SOURCE,
    GivenOptions,
    digits_preset,
    make_builtin_data,
    resolve_config,
)
from pipelines.utils.errors import ConfigError
from tests.tiny import TINY_ARGS, TINY_PIPELINE_MODEL


def _finetune(argv: list[str], cwd: Path, capsys) -> tuple[int, list[str]]:
    """``finetune.main(argv)`` in ``cwd``: exit code and the lines on stderr."""
    with contextlib.chdir(cwd):
        code = finetune.main(argv)
    return code, capsys.readouterr().err.strip().splitlines()


def _base(tmp_path: Path, data: Path) -> list[str]:
    return ["--data", str(data), "--storage", str(tmp_path / "runs"),
            "--mlflow-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--experiment", "validation"]


def _nothing_started(tmp_path: Path) -> None:
    assert not (tmp_path / "mlflow.db").exists(), "an MLflow store was opened"
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir()), "storage was written"
    assert not (tmp_path / "mlartifacts").exists()


BAD_FINETUNE = [
    (["--run-name", "../escape"], "--run-name '../escape': use letters, digits and . _ -"),
    (["--register-as", "bad/name:x"], "--register-as 'bad/name:x': use letters, digits and . _ -"),
    (["--keep-checkpoints", "0"], "--keep-checkpoints 0: must be >= 1"),
    (["--weight-decay", "-1"], "--weight-decay -1: must be >= 0"),
    (["--label-smoothing", "1.5"], "--label-smoothing 1.5: must be >= 0, < 1"),
    (["--warmup-epochs", "5", "--epochs", "2"], "--warmup-epochs 5: more than --epochs 2"),
    (["--min-lr", "0.1", "--lr", "0.01"], "--min-lr 0.1: above --lr 0.01"),
    (["--cpus-per-worker", "0"], "--cpus-per-worker 0: must be > 0"),
    (["--num-workers", "0"], "--num-workers 0: must be >= 1"),
    (["--mean", "255", "255", "255"], "--mean 255 255 255: must be >= 0, <= 1 (each value)"),
    (["--model-arg", "depth=abc"], "--model-arg depth=abc: expected an integer"),
    (["--model-arg", "patch_size=0"], "--model-arg patch_size=0: must be >= 1"),
    (["--model-arg", "patch_size=5", "--img-size", "32"],
     "--model-arg patch_size=5: does not divide --img-size 32"),
    (["--mlflow-uri", "file:///tmp/mlruns"],
     "--mlflow-uri file:///tmp/mlruns: a file store, which has no model registry"),
    (["--mlflow-uri", "mlruns"], "--mlflow-uri mlruns: a bare path"),
    (["--mlflow-uri", "foo://host/x"], "--mlflow-uri foo://host/x: unknown scheme 'foo'"),
]


@pytest.mark.parametrize(("extra", "message"), BAD_FINETUNE, ids=[" ".join(a) for a, _ in BAD_FINETUNE])
def test_bad_finetune_values_are_refused_in_one_line_before_anything_starts(
    extra, message, digits_shards, tmp_path, capsys
):
    code, err = _finetune([*_base(tmp_path, digits_shards), *extra], tmp_path, capsys)
    assert code == 2, err
    assert err == [f"finetune: error: {message}"] or (len(err) == 1 and err[0].startswith(
        f"finetune: error: {message}")), err
    _nothing_started(tmp_path)


def test_a_file_store_in_the_environment_is_refused_naming_the_variable(
    digits_shards, tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", str(tmp_path / "mlruns"))
    argv = [a for a in _base(tmp_path, digits_shards) if not a.startswith("sqlite")]
    argv.remove("--mlflow-uri")
    code, err = _finetune(argv, tmp_path, capsys)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"finetune: error: $MLFLOW_TRACKING_URI {tmp_path / 'mlruns'}: a bare path")
    assert not (tmp_path / "mlruns").exists()


@pytest.mark.skipif(torch.cuda.device_count() > 0, reason="this machine has a GPU")
def test_gpus_that_this_machine_cannot_give_are_refused_without_address(digits_shards, tmp_path):
    """The command line itself (this test process may hold a Ray, inside which the Ray's owner decides)."""
    command = [sys.executable, str(Path(finetune.__file__)), *_base(tmp_path, digits_shards),
               "--gpus-per-worker", "1"]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    code, err = done.returncode, done.stderr.strip().splitlines()
    assert code == 2
    assert err == ["finetune: error: --gpus-per-worker 1: the run needs 2 GPUs (2 workers) and this machine "
                   "has 0; without --address no other GPU can come (--gpus-per-worker 0 trains on CPUs)"]
    _nothing_started(tmp_path)


@contextlib.contextmanager
def read_only(path: Path):
    """``path`` unwritable for real, also for root (an immutable directory), restored afterwards."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i", str(path)], check=True)
    else:
        path.chmod(0o555)
    try:
        yield path
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(path)], check=True)
        path.chmod(0o755)


def test_read_only_storage_is_refused_before_the_mlflow_run(digits_shards, tmp_path, capsys):
    with read_only(tmp_path / "runs") as storage:
        code, err = _finetune([*_base(tmp_path, digits_shards), "--run-name", "ro"], tmp_path, capsys)
    assert code == 2
    assert len(err) == 1 and err[0].startswith(f"finetune: error: --storage {storage}: cannot write in "), err
    assert not (tmp_path / "mlflow.db").exists() and not (storage / "ro").exists()


def test_gpus_per_worker_on_a_cluster_showing_no_gpu_must_be_given(
    ray_cluster, digits_shards, tmp_path, capsys
):
    """Issue 23 item 3: with --address, the GPUs up at that moment do not decide (a cluster scaling from
    zero shows none); the session's Ray is such a cluster (no GPU, no autoscaler)."""
    argv = [*_base(tmp_path, digits_shards), "--address", ray_cluster, *TINY_ARGS]
    code, err = _finetune(argv, tmp_path, capsys)
    assert code == 2
    assert err == [f"finetune: error: --address {ray_cluster}: the cluster shows no GPU now and reports none "
                   "it can start; pass --gpus-per-worker (0: train on CPUs; 1: wait for GPU nodes)"]
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


# --- options merge key by key --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluttered_shards(tmp_path_factory):
    """The built-in cluttered digits at 32 px, made where a user's --data would point."""
    return ensure_builtin_shards(tmp_path_factory.mktemp("builtin") / DIGITS_DIR, DIGITS_SOURCE, img_size=32)


def test_model_arg_overrides_one_key_of_the_preset_and_of_the_config_file(cluttered_shards, tmp_path):
    preset = digits_preset()
    config = resolve_config({"model_args": {"depth": 4}, "data": str(cluttered_shards)}, cwd=tmp_path)
    assert config.model_args == {**preset["model_args"], "depth": 4}
    file = tmp_path / "run.yaml"
    file.write_text(yaml.safe_dump({"model_args": {"embed_dim": 32, "num_heads": 2}}))
    args = finetune.build_parser().parse_args(["--config", str(file), "--model-arg", "depth=4"])
    from pipelines.training.config import given_values

    given = given_values(args)
    assert given.model_args == {"embed_dim": 32, "num_heads": 2, "depth": 4}
    config = resolve_config(given.with_options(data=str(cluttered_shards)), cwd=tmp_path)
    assert config.model_args == {**preset["model_args"], "embed_dim": 32, "num_heads": 2, "depth": 4}


def test_the_builtin_data_given_by_path_keeps_the_builtin_preset(cluttered_shards, tmp_path):
    preset = digits_preset()
    by_path = resolve_config({"data": str(cluttered_shards)}, cwd=tmp_path)
    for key, value in preset.items():
        assert getattr(by_path, key) == value, key
    assert by_path.img_size == 48 and by_path.batch_size == 64 and not by_path.randaugment
    weights = tmp_path / "dense.pt"  # resolve_config only checks that it is a file
    weights.touch()
    spot_run = resolve_config({"data": str(cluttered_shards), "pretrained": str(weights), "rho": 0.7},
                              cwd=tmp_path)  # SPOT from the task's dense model: the demo's fine-tuning recipe
    recipe = (spot_run.epochs, spot_run.lr, spot_run.freeze_epochs, spot_run.warmup_epochs)
    assert recipe == (2, 1e-4, 0, 0.25)
    assert (spot_run.img_size, spot_run.batch_size) == (48, 64)


def test_given_options_survive_copy_and_pickling_as_ray_sends_them():
    """Copied, pickled or sent through Ray's serializer, the given options read the same (an attribute
    lookup while the object is rebuilt is no option)."""
    import copy
    import pickle

    from ray import cloudpickle

    given = GivenOptions.from_mapping({"rho": 0.5, "model_args": {"depth": 4}, "dense": True})
    for round_trip in (copy.copy, copy.deepcopy, lambda g: pickle.loads(pickle.dumps(g)),
                       lambda g: cloudpickle.loads(cloudpickle.dumps(g))):
        back = round_trip(given)
        assert back == given
        assert (back.rho, back.model_args, back.dense, back.data) == (0.5, {"depth": 4}, True, None)


def test_a_mistyped_option_key_is_refused_by_name_before_anything_starts(tmp_path):
    """A caller's mapping (the demo's, a sweep trial's) with a key that is no option is refused naming the
    key before the built-in shards are made or anything is resolved; reading an option by a name that is
    no option fails as well."""
    with pytest.raises(ConfigError, match=r"^unknown option\(s\): sourse$"):
        make_builtin_data({"sourse": "cluttered-digits-hard"}, cwd=tmp_path)
    with pytest.raises(ConfigError, match=r"^unknown option\(s\): epohcs, sourse$"):
        resolve_config({"dense": True, "sourse": "cluttered-digits-hard", "epohcs": 2}, cwd=tmp_path)
    assert not any(tmp_path.iterdir()), "something was written"
    given = GivenOptions.from_mapping({"source": "cluttered-digits-hard", "rho": None, "dense": True})
    assert (given.source, given.dense, given.is_given("source"), given.is_given("rho")) == (
        "cluttered-digits-hard", True, True, False)  # None: not given
    with pytest.raises(ConfigError, match=r"^unknown option\(s\): sourse$"):
        given.with_options(sourse="cluttered-digits")
    with pytest.raises(AttributeError, match="no option 'sourse'"):
        _ = given.sourse
    with pytest.raises(AttributeError, match="no option 'sourse'"):
        given.is_given("sourse")


# --- evaluate, compare, export: their own options; a checkpoint that does not fit ------------------------


def _checkpoint(
    directory: Path, *, rho: float | None, weights_depth: int | None = None, selector: str = "learned"
) -> Path:
    """A checkpoint directory of a tiny model; ``weights_depth``: weights of another depth (a wrong one)."""
    directory.mkdir(parents=True)
    arch = {**TINY_PIPELINE_MODEL, "img_size": 32, "num_classes": 10}
    model = spot.create_model("deit_t", rho=rho, selector=selector, **arch)
    (directory / CONFIG_FILE).write_text(json.dumps(model.spot_config))
    weights = model if weights_depth is None else spot.create_model(
        "deit_t", rho=rho, **{**arch, "depth": weights_depth})
    torch.save(weights.state_dict(), directory / MODEL_FILE)
    return directory


def test_a_wrong_architecture_checkpoint_is_named_in_one_line_by_evaluate_and_export(
    digits_shards, tmp_path, capsys
):
    bad = _checkpoint(tmp_path / "bad", rho=None, weights_depth=5)
    code = evaluate_cli.main(["--model", str(bad), "--data", str(digits_shards)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("evaluate: error: weights do not fit the architecture deit_t "
                                               "of spot_config.json: unexpected blocks.4."), err
    out = tmp_path / "bad.onnx"
    code = export_cli.main(["--model", str(bad), "--out", str(out), "--no-mlflow"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("export: error: weights do not fit") and "unexpected blocks.4." in err[0]
    assert not out.exists()


@pytest.mark.parametrize(("extra", "message"), [
    (["--check-batches", "0"], "--check-batches 0: batch sizes must be >= 1"),
    (["--opset", "1"], "--opset 1: the exporter writes opsets 18 to "),
])
def test_bad_export_options_exit_2_and_leave_no_file(extra, message, tmp_path, capsys):
    good = _checkpoint(tmp_path / "good", rho=0.5)
    out = tmp_path / "m.onnx"
    code = export_cli.main(["--model", str(good), "--out", str(out), "--no-mlflow", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith(f"export: error: {message}"), err
    assert not out.exists()


def test_throughput_batch_0_is_refused(digits_shards, tmp_path, capsys):
    good = _checkpoint(tmp_path / "good", rho=0.5)
    code = evaluate_cli.main(["--model", str(good), "--data", str(digits_shards), "--throughput-batch", "0"])
    assert code == 2
    assert capsys.readouterr().err.strip() == "evaluate: error: --throughput-batch 0: must be >= 1"


@pytest.mark.parametrize("option", ["--spot", "--heuristic"])
def test_compare_refuses_a_dense_model_as_a_fine_tuned_one(option, digits_shards, tmp_path, capsys):
    dense = _checkpoint(tmp_path / "dense", rho=None)
    heuristic = _checkpoint(tmp_path / "dense-cls", rho=None, selector="cls_attn_avg")
    given = str(dense if option == "--spot" else heuristic)
    code = compare_cli.main(["--dense", str(dense), option, given, "--data", str(digits_shards)])
    out, err = capsys.readouterr()
    assert code == 2 and "fine-tuned" not in out and "learned (SPOT)" not in out
    assert err.strip() == (f"compare: error: {option} {given}: a dense model, with no trained token "
                           "selection; pass one fine-tuned from --dense")


def test_evaluate_and_compare_check_their_models_before_making_the_builtin_data(tmp_path, capsys,
                                                                                monkeypatch):
    """No --data: the built-in shards would be made first (tens of seconds); a model that cannot be there is
    refused before, in one line, and no ``data/`` appears."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    good = _checkpoint(tmp_path / "good", rho=None)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cases = [
        (evaluate_cli, ["--model", "nowhere"], "--model nowhere: no SPOT checkpoint or MLflow model"),
        (evaluate_cli, ["--model", str(good), "--baseline", "models:/nope@champion", "--mlflow-uri", uri],
         "--baseline models:/nope@champion: the registry sqlite:"),
        (compare_cli, ["--dense", str(tmp_path)], f"--dense {tmp_path}: no SPOT checkpoint or MLflow model"),
        (compare_cli, ["--dense", str(good), "--spot", "models:/nope/1"],
         "--spot models:/nope/1: the registry sqlite:"),
        (evaluate_cli, ["--model", "runs:/0123abc/spot", "--mlflow-uri", uri],
         "--model runs:/0123abc/spot: the tracking store sqlite:"),
    ]
    for command, argv, message in cases:
        prog = command.__name__.rsplit(".", 1)[1]
        assert command.main(argv) == 2, argv
        err = capsys.readouterr().err
        [line] = [ln for ln in err.splitlines() if not ln.startswith("20")]  # MLflow's dated INFO lines
        assert line.startswith(f"{prog}: error: {message}"), err
    assert not (tmp_path / "data").exists()
    run_id = MlflowClient(uri).create_run(MlflowClient(uri).create_experiment("models")).info.run_id
    mlflow.set_tracking_uri(uri)
    check_model_source("--model", f"runs:/{run_id}/spot")  # a run the store holds: loaded later


# --- make_shards ------------------------------------------------------------------------------------------


def _png(path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), (120, 30, 200)).save(path)


def _make_shards(argv: list[str], capsys) -> tuple[int, list[str]]:
    code = make_shards.main(argv)
    return code, capsys.readouterr().err.strip().splitlines()


def test_make_shards_refuses_img_size_0(tmp_path, capsys):
    argv = ["--source", "digits", "--out", str(tmp_path / "out"), "--img-size", "0"]
    code, err = _make_shards(argv, capsys)
    assert code == 2 and err == ["make_shards: error: --img-size 0: must be >= 8"]
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_make_shards_refuses_an_empty_class_folder(tmp_path, capsys):
    _png(tmp_path / "src" / "cat" / "a.png")
    (tmp_path / "src" / "dog").mkdir()
    code, err = _make_shards(["--source", f"imagefolder:{tmp_path / 'src'}", "--out", str(tmp_path / "out")],
                             capsys)
    assert code == 2
    assert err == [f"make_shards: error: imagefolder {tmp_path / 'src'}: class folder(s) dog hold no image; "
                   "remove them or add images (a class without samples cannot be learned)"]
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_make_shards_refuses_a_root_of_split_folders(tmp_path, capsys):
    for split in ("train", "val"):
        _png(tmp_path / "src" / split / "cat" / "a.png")
    code, err = _make_shards(["--source", f"imagefolder:{tmp_path / 'src'}", "--out", str(tmp_path / "out")],
                             capsys)
    assert code == 2 and len(err) == 1
    assert err[0].startswith(f"make_shards: error: imagefolder {tmp_path / 'src'}: holds split folders "
                             "train, val, not class folders"), err
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_make_shards_refuses_a_read_only_out(tmp_path, capsys):
    _png(tmp_path / "src" / "cat" / "a.png")
    with read_only(tmp_path / "out") as out:
        code, err = _make_shards(["--source", f"imagefolder:{tmp_path / 'src'}", "--out", str(out)], capsys)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"make_shards: error: --out {out}: cannot write")
    assert list(out.iterdir()) == []


def test_make_shards_skip_reasons_are_the_same_on_every_run(tmp_path, capsys):
    _png(tmp_path / "src" / "cat" / "a.png")
    _png(tmp_path / "src" / "dog" / "b.png")
    (tmp_path / "src" / "dog" / "broken.png").write_bytes(b"not an image")
    reasons = []
    for out in ("one", "two"):
        code, _ = _make_shards(["--source", f"imagefolder:{tmp_path / 'src'}", "--out", str(tmp_path / out),
                                "--workers", "1"], capsys)
        assert code == 0
        manifest = json.loads((tmp_path / out / "manifest.json").read_text())
        reasons.append(manifest["splits"]["train"]["skipped"])
    assert reasons[0] == reasons[1] and len(reasons[0]) == 1
    assert "0x" not in reasons[0][0]["reason"] and "broken.png" in reasons[0][0]["source"]


# --- a champion is the best on the same task --------------------------------------------------------------


def test_a_model_trained_on_other_data_is_refused_under_the_same_name_and_the_champion_stays(
    digits_shards, tmp_path, capsys, monkeypatch
):
    """The issue's false champion: a 2-class toy model under the name of the 10-class digits model."""
    import mlflow
    from mlflow import MlflowClient

    from pipelines.tracking.registry import CHAMPION, data_tags, register_checkpoint

    for split in ("train", "val"):
        for label in ("a", "b"):
            _png(tmp_path / "toy" / split / label / f"{split}{label}.png")
        argv = ["--source", f"imagefolder:{tmp_path / 'toy' / split}", "--out", str(tmp_path / "toyshards"),
                "--split", split, "--workers", "1"]
        assert make_shards.main(argv) == 0
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    experiment = client.create_experiment("task", artifact_location=(tmp_path / "mlartifacts").as_uri())
    metrics = {"val_acc1": 0.5, "val_acc5": 0.9, "gmacs": 0.01, "epoch": 1}
    digits = _checkpoint(tmp_path / "digits_model", rho=None)
    first = register_checkpoint(digits, run_id=client.create_run(experiment).info.run_id, name="task",
                                metrics=metrics, data=data_tags(digits_shards, 32))
    assert first["champion"]
    toy_tags = data_tags(tmp_path / "toyshards", 16)
    toy = _checkpoint(tmp_path / "toy_model", rho=None)
    with pytest.raises(ValueError, match=r"under its own name, e\.g\. --register-as task-2cls-16px"):
        register_checkpoint(toy, run_id=client.create_run(experiment).info.run_id, name="task",
                            metrics={**metrics, "val_acc1": 0.99}, data=toy_tags)
    assert [str(v.version) for v in client.search_model_versions("name = 'task'")] == ["1"]
    assert str(client.get_model_version_by_alias("task", CHAMPION).version) == "1"
    assert client.get_model_version("task", "1").tags["data_classes"] == "10"

    # the fine-tuning job refuses it before anything starts
    runs_before = len(client.search_runs([experiment]))
    capsys.readouterr()
    code, err = _finetune(["--data", str(tmp_path / "toyshards"), "--img-size", "16", "--register-as", "task",
                           "--batch-size", "2", "--num-workers", "1", "--mixup", "0", "--cutmix", "0",
                           "--mlflow-uri", uri, "--experiment", "task", "--storage", str(tmp_path / "runs"),
                           *TINY_ARGS[2:], "--model-arg", "patch_size=4"], tmp_path, capsys)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("finetune: error: registered model 'task' holds versions trained on other data")
    assert len(client.search_runs([experiment])) == runs_before
    assert str(client.get_model_version_by_alias("task", CHAMPION).version) == "1"


def test_local_storage_on_a_one_machine_cluster_passes_and_a_declared_shared_mount_always_does(
    ray_cluster, tmp_path
):
    """The real check on the session's Ray (one node, this machine, no autoscaler): a local path is fine;
    the node's own address, loopback or the host's IP, is never "elsewhere"."""
    from pipelines.training.ray_session import check_shared_storage

    check_shared_storage(str(tmp_path), ray_cluster)
    check_shared_storage(str(tmp_path), ray_cluster, declared_shared=True)
    check_shared_storage("s3://bucket/runs", ray_cluster)


def test_resume_of_a_run_recorded_before_an_option_existed_names_the_defaulted_options(
    digits_shards, tmp_path, caplog
):
    """A run record written before ``--source`` and ``--hflip`` existed (as older versions wrote it): the
    resumed configuration takes today's defaults for them and says so, by flag and value."""
    from pipelines.storage.location import RunLocation
    from pipelines.storage.run_record import write_record
    from pipelines.training.config import field_default

    storage = str(tmp_path / "runs")
    started = resolve_config({"data": str(digits_shards), "run_name": "old", "storage": storage,
                              "mlflow_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}, cwd=tmp_path)
    recorded = {k: v for k, v in started.to_dict().items() if k not in ("source", "hflip")}
    write_record(RunLocation(started.storage, "old"),
                 {"config": recorded, "mlflow_run_id": "0" * 32, "tracking_uri": started.mlflow_uri})
    with caplog.at_level("WARNING"):
        resumed = resolve_config({"resume": True, "run_name": "old", "storage": storage}, cwd=tmp_path)
    assert resumed.hflip == field_default("hflip") and resumed.source == field_default("source")
    assert resumed.model_args == started.model_args
    [message] = [r.getMessage() for r in caplog.records if "--resume" in r.getMessage()]
    named = message.split(" (older than these options)")[0]
    assert named.startswith("--resume: run 'old' recorded no value of ") and set(
        named.rsplit(" of ", 1)[1].split(", ")) == {"--source", "--hflip"}, message
    assert f"--hflip {field_default('hflip')!r}" in message
