"""pipelines/finetune.py end to end: real local Ray Train (2 workers, DDP over gloo), DALI on the CPU,
MLflow on SQLite with the model registry; plus the recipe and the option handling on their own."""

import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from pipelines import finetune
from pipelines.data.cluttered_digits import PIXEL_MEAN, PIXEL_STD
from pipelines.data.manifest import DataError, read_manifest
from pipelines.storage.checkpoints import CONFIG_FILE, MASKS_FILE, METRICS_FILE, MODEL_FILE, STATE_FILE
from pipelines.storage.run_record import RUN_RECORD
from pipelines.tracking.pending_reports import PENDING_RECORD
from pipelines.tracking.uri import move_credentials_to_env, resolve_tracking_uri
from pipelines.training.config import RUNS_DIR, RunConfig, given_values, make_builtin_data, resolve_config
from pipelines.training.job import run as run_job
from pipelines.training.recipe import build_optimizer
from pipelines.training.worker import step_bar
from pipelines.utils.errors import ConfigError
from tests.finetune_runs import FINETUNE, history_steps, result_json, runs_named
from tests.mlflow_server import MlflowServer
from tests.tiny import tiny

# --- the recipe -------------------------------------------------------------------------------------------


def _lrs(scheduler, optimizer, steps: int) -> list[list[float]]:
    """The lr of every group at each of ``steps`` updates (as the train loop drives the scheduler)."""
    out = []
    for n in range(steps):
        out.append([g["lr"] for g in optimizer.param_groups])
        scheduler.step_update(n + 1)
    return out


def test_schedule_freezes_warms_up_then_decays_to_min():
    model = tiny("deit_s", rho=0.7)
    fresh = {n for n, _ in model.named_parameters() if n.startswith("spot_predictors.")}
    config = RunConfig(lr=1e-3, predictor_lr=1e-2, weight_decay=0.05, min_lr=1e-5, epochs=10, warmup_epochs=2,
                       freeze_epochs=3)
    optimizer, scheduler = build_optimizer(model, config, fresh, steps_per_epoch=10)
    names = [g["name"] for g in optimizer.param_groups]
    lrs = _lrs(scheduler, optimizer, 100)
    backbone, predictor = names.index("backbone"), names.index("predictor_fresh")
    assert all(step[backbone] == 0.0 for step in lrs[:30])  # frozen for 3 epochs
    assert lrs[30][backbone] > 0
    warmup = [step[predictor] for step in lrs[:20]]
    assert warmup[0] == pytest.approx(1e-2 / 20) and warmup == sorted(warmup)  # linear, from the first update
    assert lrs[19][predictor] == pytest.approx(1e-2)
    decay = [step[predictor] for step in lrs[20:]]
    assert decay == sorted(decay, reverse=True)
    scheduler.step_update(100)
    assert optimizer.param_groups[predictor]["lr"] == pytest.approx(1e-5)


def test_no_weight_decay_on_position_embedding_and_class_token():
    """Without pretrained weights nothing is frozen: pos_embed / cls_token must still not be decayed."""
    for name in ("deit_s", "lvvit_s"):
        model = tiny(name, rho=0.7)
        fresh = {n for n, _ in model.named_parameters()}
        config = RunConfig(lr=1e-3, predictor_lr=1e-2, weight_decay=0.05, min_lr=1e-6, epochs=2,
                           warmup_epochs=1, freeze_epochs=1)
        optimizer, _ = build_optimizer(model, config, fresh, steps_per_epoch=5)
        decay_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
        for key in ("pos_embed", "cls_token"):
            assert decay_of[id(model.get_parameter(key))] == 0.0, (name, key)
        assert decay_of[id(model.get_parameter("blocks.0.attn.qkv.weight"))] == 0.05, name


def test_optimizer_groups_predictor_lr_no_decay_and_freeze_of_pretrained_weights():
    model = tiny("deit_s", rho=0.7)
    fresh = {n for n, _ in model.named_parameters() if n.startswith(("spot_predictors.", "head."))}
    config = RunConfig(lr=1e-3, predictor_lr=1e-2, weight_decay=0.05, min_lr=1e-6, epochs=4, warmup_epochs=1,
                       freeze_epochs=2)
    optimizer, scheduler = build_optimizer(model, config, fresh, steps_per_epoch=5)
    groups = {g["name"]: g for g in optimizer.param_groups}
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in groups["predictor_fresh"]["params"]} <= fresh
    assert all(names[id(p)].startswith("head.") for p in groups["backbone_fresh"]["params"])
    assert all(p.ndim <= 1 or names[id(p)] in ("pos_embed", "cls_token")
               for p in groups["backbone_no_decay"]["params"])
    assert groups["backbone_no_decay"]["weight_decay"] == 0 and groups["backbone"]["weight_decay"] == 0.05
    for n in range(1, 6):  # first epoch: warm-up of the fresh groups, pretrained backbone at lr 0
        optimizer.step()
        scheduler.step_update(n)
    assert groups["backbone"]["lr"] == 0.0 and groups["backbone_no_decay"]["lr"] == 0.0
    assert groups["backbone_fresh"]["lr"] > 0
    assert groups["predictor_fresh"]["lr"] == pytest.approx(10 * groups["backbone_fresh"]["lr"], rel=1e-3)
    for n in range(6, 11):  # second epoch still frozen, third epoch the backbone trains
        scheduler.step_update(n)
    assert groups["backbone"]["lr"] > 0


# --- option handling (no Ray) ----------------------------------------------------------------------------


def test_paper_defaults_with_data_and_digits_defaults_without(digits_shards, tmp_path):
    config = resolve_config({"data": str(digits_shards), "batch_size": 64}, cwd=tmp_path)
    assert (config.epochs, config.img_size, config.lr, config.predictor_lr) == (
        80,
        224,
        1e-3,
        1e-2,
    )
    assert (config.mixup, config.cutmix, config.label_smoothing) == (0.8, 1.0, 0.1)
    assert (config.crop_scale, config.hflip) == (0.08, 0.5)
    assert config.lambda_rate == 2.0 and config.lambda_kl == 0.0  # no --pretrained: no teacher
    assert config.register_as == "spot-deit_s" and config.num_classes == 10
    assert config.mlflow_uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert config.storage == str(tmp_path / RUNS_DIR)
    # no --data: the built-in cluttered digits, which the command makes in ./data/cluttered-digits (resolving
    # the options writes nothing), small defaults
    with pytest.raises(DataError, match="no --data and no built-in shards in .*make_builtin_data"):
        resolve_config({"dense": True}, cwd=tmp_path)
    assert not (tmp_path / "data").exists()
    assert make_builtin_data({"dense": True}, tmp_path) == tmp_path / "data" / "cluttered-digits"
    digits = resolve_config({"dense": True}, cwd=tmp_path)
    assert digits.data == str(tmp_path / "data" / "cluttered-digits")
    manifest = read_manifest(tmp_path / "data" / "cluttered-digits")
    assert manifest.info["val"]["params"]["source"] == "cluttered-digits"
    assert (digits.backbone, digits.img_size, digits.rho) == ("deit_t", 48, None)
    assert digits.model_args["patch_size"] == 8  # 36 tokens, 4 of them the digit
    assert (digits.crop_scale, digits.hflip) == (1.0, 0.0)  # no crop cuts the digit out, no mirroring
    assert digits.register_as == "spot-deit_t-dense" and digits.lambda_rate == 0.0
    assert (digits.mean, digits.std) == ([PIXEL_MEAN] * 3, [PIXEL_STD] * 3)  # the canvases', not ImageNet's
    assert (config.mean, config.std) == (None, None)  # with --data: the backbone's (or --pretrained model's)


def test_yaml_config_and_command_line_precedence(digits_shards, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"data": str(digits_shards), "epochs": 3, "batch-size": 32,
                                    "model_args": {"depth": 4}, "rho": 0.5}))
    args = finetune.build_parser().parse_args(
        ["--config", str(path), "--epochs", "5", "--model-arg", "depth=6", "--mean", "0.1", "0.2", "0.3"]
    )
    config = resolve_config(given_values(args), cwd=tmp_path)
    assert (config.epochs, config.batch_size, config.rho) == (5, 32, 0.5)
    assert config.mean == [0.1, 0.2, 0.3] and config.std is None
    assert config.model_args == {"depth": 6}
    path.write_text("epochz: 3\n")
    with pytest.raises(ConfigError, match="unknown option 'epochz'"):
        given_values(finetune.build_parser().parse_args(["--config", str(path)]))


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"lambda_kl": 0.5}, "needs a teacher"),
        ({"batch_size": 63, "num_workers": 2}, "multiple of --num-workers"),
        ({"dense": True, "rho": 0.5}, "--dense contradicts"),
        ({"selector": "best"}, "--selector 'best'"),
        ({"resume": True}, "--resume needs the --run-name"),
        ({"model_args": {"img_size": 64}}, "use --img-size"),
        ({"crop_scale": 0}, r"--crop-scale 0: must be > 0, <= 1"),
        ({"hflip": 1.5}, r"--hflip 1.5: must be >= 0, <= 1"),
        ({"std": [0.2, 0.0, 0.2]}, r"--std 0.2 0 0.2: must be > 0 \(each value\)"),
        ({"mean": [0.5, 0.5]}, r"--mean \[0.5, 0.5\]: expected 3 numbers"),
    ],
)
def test_inconsistent_options_are_refused(digits_shards, tmp_path, given, message):
    with pytest.raises(ConfigError, match=message):
        resolve_config({"data": str(digits_shards), "batch_size": 64, **given}, cwd=tmp_path)



def test_resume_of_a_run_recorded_before_an_option_existed(digits_shards, tmp_path):
    """A record written before --mean / --std existed resumes with their old meaning (the backbone's)."""
    from pipelines.storage.run_record import write_record

    config = resolve_config({"data": str(digits_shards), "batch_size": 64, "run_name": "old"}, cwd=tmp_path)
    saved = {k: v for k, v in config.to_dict().items() if k not in ("mean", "std")}
    record = {"config": saved, "mlflow_run_id": "x", "tracking_uri": config.mlflow_uri}
    write_record(config.location, record)
    resumed = resolve_config({"run_name": "old", "resume": True}, cwd=tmp_path)
    assert (resumed.mean, resumed.std, resumed.data) == (None, None, config.data)
    with pytest.raises(ConfigError, match="cannot change training options: mean"):
        resolve_config({"run_name": "old", "resume": True, "mean": [0.5, 0.5, 0.5]}, cwd=tmp_path)

# --- end to end -----------------------------------------------------------------------------------------


def test_credentials_leave_the_tracking_uri_only_by_the_command(monkeypatch):
    """resolve_tracking_uri moves nothing: a URI with user:password@ is refused without being printed; the
    command's move_credentials_to_env puts them where MLflow's client reads them (also from the env URI)."""
    secret = "http://alice:s%40cret@127.0.0.1:5999"
    with pytest.raises(ConfigError, match="move_credentials_to_env") as raised:
        resolve_tracking_uri(secret, ".")
    assert "s%40cret" not in str(raised.value) and "MLFLOW_TRACKING_USERNAME" not in os.environ
    assert move_credentials_to_env(secret) == "http://127.0.0.1:5999"
    user, password = os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]
    assert (user, password) == ("alice", "s@cret")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://bob:pw@127.0.0.1:5998")
    assert move_credentials_to_env(None) is None
    assert resolve_tracking_uri(None, ".") == "http://127.0.0.1:5998"
    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "bob"


def test_step_bar_only_on_rank_0_of_long_epochs():
    config = RunConfig(step_bar=200, epochs=3)
    assert step_bar(config, 0, 199, 0) is None and step_bar(config, 1, 500, 0) is None
    assert step_bar(replace(config, step_bar=0), 0, 10_000, 0) is None


@pytest.mark.integration
def test_long_epochs_show_a_progress_bar_drawn_by_the_driver(
    ray_cluster, pipeline_dir, tiny_options, tmp_path, capfd
):
    options = {**tiny_options, "dense": True, "num_workers": 1, "epochs": 1, "run_name": "step-bar",
               "register_as": "step-bar", "step_bar": 5, "vis_images": 0}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(options))
    with contextlib.chdir(pipeline_dir):
        assert finetune.main(["--config", str(path)]) == 0
    out, err = capfd.readouterr()
    assert re.search(r"epoch 1/1: 100%\|[^|]*\| ([\d.]+)/\1 ", out + err), (out + err)[-3000:]  # 22.0/22.0


def test_two_worker_runs_report_checkpoint_track_and_register(trained, tiny_options, mlflow_uri):
    dense, sparse = trained["dense"], trained["spot"]
    for result in (dense, sparse):
        assert result["epochs_logged"] == [0, 1]
        assert len(result["worker_node_ids"]) == 2
        [run] = runs_named(mlflow_uri, "tests", result["run_name"])
        assert run.info.run_id == result["mlflow_run_id"] and run.info.status == "FINISHED"
        assert history_steps(mlflow_uri, run.info.run_id, "val_acc1") == [0, 1]
        assert run.data.params["world_size"] == "2"
        accuracies = [
            m.value for m in MlflowClient(mlflow_uri).get_metric_history(run.info.run_id, "val_acc1")
        ]
        assert result["best_val_acc1"] == max(accuracies)
    assert sparse["gmacs"] < sparse["dense_gmacs"] == dense["gmacs"]

    checkpoint = Path(sparse["checkpoint"])
    for name in (MODEL_FILE, CONFIG_FILE, STATE_FILE, METRICS_FILE, MASKS_FILE):
        assert (checkpoint / name).is_file(), name
    assert json.loads((checkpoint / METRICS_FILE).read_text())["epoch"] == sparse["best_epoch"]
    kept = [p for p in Path(sparse["storage"]).glob("checkpoint_*") if p.is_dir()]
    assert 1 <= len(kept) <= 2

    client = MlflowClient(mlflow_uri)
    run = client.get_run(sparse["mlflow_run_id"])
    assert run.data.params["pretrained"].startswith("models:/spot-deit_t-dense/")
    assert float(run.data.params["lambda_kl"]) == 0.5 and run.data.metrics["train_kl"] > 0  # teacher in use
    assert {f"train_kept_s{k}" for k in (1, 2, 3)} <= set(run.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config", "evaluation.md", "images"} <= artifacts and "token_masks" not in artifacts  # one copy
    for result in (dense, sparse):
        version = client.get_model_version_by_alias(result["registered_model"], "champion")
        assert (
            int(version.version) == result["registered_version"] and version.run_id == result["mlflow_run_id"]
        )
        assert float(version.tags["val_acc1"]) == pytest.approx(result["best_val_acc1"], abs=1e-6)
        assert float(version.tags["gmacs"]) == pytest.approx(result["gmacs"], abs=1e-6)
    assert version.tags["rho"] == "0.7"


def test_killed_worker_resumes_from_last_checkpoint(
    ray_cluster, pipeline_dir, tiny_options, trained, mlflow_uri
):
    from ray.util.state import list_actors

    name = "fault"
    pretrained = Path(trained["dense"]["checkpoint"]) / MODEL_FILE
    config = resolve_config({**tiny_options, "pretrained": str(pretrained), "epochs": 3,
                                      "run_name": name})
    snapshot = Path(tiny_options["storage"]) / name / "checkpoint_manager_snapshot.json"
    killed, errors, run_over = [], [], threading.Event()

    def kill_a_worker_after_first_checkpoint():
        deadline = time.monotonic() + 300
        alive = [("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")]
        # the State API may time out on a busy machine: try again, but never after this run (the next test's
        # workers would be the ones found)
        while not killed and not run_over.is_set() and time.monotonic() < deadline:
            time.sleep(0.2)
            try:
                workers = list_actors(address=ray_cluster, filters=alive) if snapshot.exists() else []
                if workers:
                    victim = max(workers, key=lambda a: a.pid)
                    os.kill(victim.pid, signal.SIGKILL)
                    killed.append(victim.pid)
            except Exception as err:  # reported by the assertion below
                errors.append(repr(err))

    killer = threading.Thread(target=kill_a_worker_after_first_checkpoint, daemon=True)
    killer.start()
    handler = signal.getsignal(signal.SIGINT)
    try:
        with contextlib.chdir(pipeline_dir):
            result = run_job(config)
    finally:
        run_over.set()
    assert signal.getsignal(signal.SIGINT) is handler  # Ray Train's (abort its controller) outlives no fit()
    killer.join(timeout=10)
    assert killed, f"no Train worker was killed ({len(errors)} failed tries, the last ones: {errors[-3:]})"
    assert result["epochs_logged"] == [0, 1, 2]
    [run] = runs_named(mlflow_uri, "tests", name)
    assert run.info.status == "FINISHED" and run.data.tags["worker_failures"] == "1"
    # one value per epoch: nothing lost, and epoch 0 was not trained again (resumed from its checkpoint)
    for key in ("val_acc1", "train_total", "epoch_time_s"):
        assert history_steps(mlflow_uri, run.info.run_id, key) == [0, 1, 2], key


def _finetune(*args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(FINETUNE), *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _dense_run_after_first_epoch(
    name: str, ray_cluster, pipeline_dir: Path, tiny_options: dict, mlflow_uri: str, extra: dict | None = None
) -> tuple[subprocess.Popen, str]:
    """A 3-epoch dense finetune CLI process (``extra`` options on top), returned (still running) once its
    first epoch is in MLflow at ``mlflow_uri``, with its MLflow run id."""
    options = pipeline_dir / f"{name}.yaml"
    options.write_text(yaml.safe_dump({**tiny_options, "dense": True, "epochs": 3, "run_name": name,
                                       "gpus_per_worker": 0, **(extra or {})}))
    driver = _finetune("--config", str(options), "--address", ray_cluster, cwd=pipeline_dir)
    record = Path(tiny_options["storage"]) / name / RUN_RECORD
    deadline = time.monotonic() + 300
    run_id = None
    while time.monotonic() < deadline and driver.poll() is None:
        if run_id is None and record.exists():
            run_id = json.loads(record.read_text())["mlflow_run_id"]
        if run_id and history_steps(mlflow_uri, run_id, "val_acc1"):
            break
        time.sleep(0.2)
    assert driver.poll() is None, f"the driver ended too early: {driver.communicate()[1][-2000:]}"
    if not (run_id and history_steps(mlflow_uri, run_id, "val_acc1")):
        driver.kill()
        output = driver.communicate()[1][-2000:]
        raise AssertionError(f"{name}: no first epoch in MLflow within 300 s: {output}")
    return driver, run_id


def test_resume_continues_a_run_whose_driver_died(
    ray_cluster, pipeline_dir, tiny_options, mlflow_uri
):
    name = "driver-died"
    driver, run_id = _dense_run_after_first_epoch(name, ray_cluster, pipeline_dir, tiny_options, mlflow_uri)
    driver.send_signal(signal.SIGKILL)
    driver.communicate()

    resumed = _finetune("--run-name", name, "--resume", "--address", ray_cluster, cwd=pipeline_dir)
    stdout, stderr = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, stderr[-3000:]
    result = result_json(stdout)
    assert result["mlflow_run_id"] == run_id and result["epochs_logged"] == [0, 1, 2]
    [run] = runs_named(mlflow_uri, "tests", name)
    assert run.info.status == "FINISHED"
    assert history_steps(mlflow_uri, run_id, "val_acc1") == [0, 1, 2]


def test_ctrl_c_marks_the_run_killed_and_prints_the_resume_command(
    ray_cluster, pipeline_dir, tiny_options, mlflow_uri
):
    name = "interrupted"
    driver, run_id = _dense_run_after_first_epoch(name, ray_cluster, pipeline_dir, tiny_options, mlflow_uri)
    driver.send_signal(signal.SIGINT)
    stdout, stderr = driver.communicate(timeout=120)
    assert driver.returncode == 130, stderr[-3000:]
    assert "RESULT_JSON" not in stdout
    [run] = runs_named(mlflow_uri, "tests", name)
    assert run.info.run_id == run_id and run.info.status == "KILLED"
    assert list((Path(tiny_options["storage"]) / name).glob("checkpoint_*")), "the checkpoint is kept"
    [command] = [line.strip() for line in stderr.splitlines() if "--resume" in line]
    assert command.startswith("python pipelines/finetune.py --resume --run-name interrupted")

    resumed = _finetune(*shlex.split(command)[2:], "--address", ray_cluster, cwd=pipeline_dir)
    stdout, stderr = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, stderr[-3000:]
    result = result_json(stdout)
    assert result["mlflow_run_id"] == run_id and result["epochs_logged"] == [0, 1, 2]
    [run] = runs_named(mlflow_uri, "tests", name)
    assert run.info.status == "FINISHED"


def test_mlflow_killed_mid_run_loses_no_epoch_and_the_printed_command_finishes_the_run(
    ray_cluster, pipeline_dir, tiny_options, tmp_path
):
    """The tracking server dies after epoch 0 and is still down at the end: exit 75, the later epochs wait
    in the run's storage, nothing is registered; with the server back, the printed command sends them
    (one value per epoch), registers the best checkpoint and ends the run FINISHED, without training."""
    server = MlflowServer(tmp_path / "server").start()
    name = "mlflow-outage"
    extra = {"mlflow_uri": server.url, "mlflow_wait": 0, "register_as": name}
    driver, run_id = _dense_run_after_first_epoch(
        name, ray_cluster, pipeline_dir, tiny_options, server.url, extra
    )
    record = Path(tiny_options["storage"]) / name / RUN_RECORD
    server.kill()
    stdout, stderr = driver.communicate(timeout=600)
    assert driver.returncode == 75, stderr[-3000:]
    assert "RESULT_JSON" not in stdout
    waiting = [e["step"] for e in json.loads((record.parent / PENDING_RECORD).read_text())["entries"]]
    assert waiting in ([1, 2], [0, 1, 2])  # epoch 0 too if the server died before it answered its send
    [command] = [line.strip() for line in stderr.splitlines() if "--resume" in line]
    checkpoints = sorted(record.parent.glob("checkpoint_*"))

    server.start()
    assert MlflowClient(server.url).get_run(run_id).info.status == "RUNNING"
    assert MlflowClient(server.url).search_model_versions(f"name = '{name}'") == []
    resumed = _finetune(*shlex.split(command)[2:], "--address", ray_cluster, cwd=pipeline_dir)
    stdout, stderr = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, stderr[-3000:]
    result = result_json(stdout)
    assert result["mlflow_run_id"] == run_id and result["epochs_logged"] == [0, 1, 2]
    assert sorted(record.parent.glob("checkpoint_*")) == checkpoints, "nothing was trained again"
    client = MlflowClient(server.url)
    assert client.get_run(run_id).info.status == "FINISHED"
    for key in ("val_acc1", "train_total", "epoch_time_s"):
        assert history_steps(server.url, run_id, key) == [0, 1, 2], key
    [version] = client.search_model_versions(f"name = '{name}'")
    assert version.run_id == run_id and client.get_model_version_by_alias(name, "champion").version == "1"
    assert not (record.parent / PENDING_RECORD).exists()
    server.kill()


@pytest.mark.parametrize(
    ("flags", "reason"),
    [
        (["--data", "/nonexistent/shards"], "/nonexistent/shards does not exist"),
        (["--backbone", "vit_huge"], "--backbone 'vit_huge': choose one of"),
        (["--rho", "0"], "--rho 0.0: must be in (0, 1]"),
        (["--mlflow-uri", "http://127.0.0.1:{port}"], "is unreachable"),
        (
            ["--pretrained", "/nonexistent/weights.pth"],
            "--pretrained /nonexistent/weights.pth: file not found",
        ),
    ],
)
def test_bad_input_exits_non_zero_with_one_line(digits_shards, tmp_path, monkeypatch, capsys, closed_port,
                                                flags, reason):
    flags = [f.format(port=closed_port) for f in flags]
    data = [] if "--data" in flags else ["--data", str(digits_shards)]
    monkeypatch.chdir(tmp_path)
    assert finetune.main([*data, "--batch-size", "64", *flags]) == 2
    out, err = capsys.readouterr()
    assert err.strip().splitlines() == [err.strip()], err  # one line, no traceback
    assert err.startswith("finetune: error: ") and reason in err, err
    assert "RESULT_JSON" not in out
    assert not (tmp_path / RUNS_DIR).exists()  # failed before any Ray run was set up


def test_bad_input_from_the_command_line_is_one_line_without_ray(digits_shards, tmp_path):
    started = time.monotonic()
    proc = _finetune("--data", str(digits_shards), "--backbone", "vit_huge", cwd=tmp_path)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 2
    assert stderr.strip() == "finetune: error: --backbone 'vit_huge': choose one of " + ", ".join(
        ("deit_t", "deit_s", "deit_b", "lvvit_t", "lvvit_s")
    ), stderr
    assert "RESULT_JSON" not in stdout and time.monotonic() - started < 120
    assert not (tmp_path / RUNS_DIR).exists()
