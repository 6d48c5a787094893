"""A run's life ends in a true state (issue 27): SIGTERM / SIGHUP stop it as Ctrl-C does (MLflow KILLED,
one resume command that reproduces the run as started), with real signals to a real finetune process on
the session's Ray and a real MLflow SQLite store."""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from mlflow import MlflowClient

import spot
from pipelines.storage.run_record import RUN_RECORD
from tests.finetune_runs import FINETUNE, history_steps, result_json, runs_named

pytestmark = pytest.mark.integration
EPOCHS = 8  # a tiny epoch takes seconds: enough of them that the signal comes mid-run


def _start(name: str, address: str | None, pipeline_dir: Path, tiny_options: dict,
           epochs: int) -> subprocess.Popen:
    """A dense finetune CLI process in its own process group (as a shell job or a scheduler's task), on the
    cluster at ``address`` or (None) on a local Ray of its own, whose processes are in that group."""
    options = pipeline_dir / f"{name}.yaml"
    options.write_text(yaml.safe_dump({**tiny_options, "dense": True, "epochs": epochs, "run_name": name,
                                       "gpus_per_worker": 0, "vis_images": 0}))
    cluster = ["--address", address] if address else []
    return subprocess.Popen(
        [sys.executable, str(FINETUNE), "--config", str(options), *cluster],
        cwd=pipeline_dir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )


def _wait_for(driver: subprocess.Popen, condition, what: str, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and driver.poll() is None and not condition():
        time.sleep(0.2)
    assert driver.poll() is None, f"the driver ended before {what}: {driver.communicate()[1][-2000:]}"
    assert condition(), f"no {what} in {timeout_s} s"


def _run_id(record: Path) -> str | None:
    return json.loads(record.read_text())["mlflow_run_id"] if record.exists() else None


def test_sigterm_to_the_process_group_ends_the_run_killed_and_its_command_resumes_it_as_started(
    ray_cluster, pipeline_dir, tiny_options, mlflow_uri
):
    name = "sigterm"
    driver = _start(name, ray_cluster, pipeline_dir, tiny_options, epochs=EPOCHS)
    record = Path(tiny_options["storage"]) / name / RUN_RECORD
    _wait_for(driver, lambda: _run_id(record) and history_steps(mlflow_uri, _run_id(record), "val_acc1"),
              "first epoch in MLflow")
    os.killpg(driver.pid, signal.SIGTERM)  # what `timeout`, schedulers and `kill -- -PGID` send
    stdout, stderr = driver.communicate(timeout=300)
    assert driver.returncode == 143, stderr[-3000:]
    assert "RESULT_JSON" not in stdout
    [run] = runs_named(mlflow_uri, "tests", name)
    assert run.info.run_id == _run_id(record) and run.info.status == "KILLED"
    kept = len(list(record.parent.glob("checkpoint_*")))
    assert kept >= 1
    [line] = [ln for ln in stderr.splitlines() if ln.startswith("finetune: interrupted")]
    assert line == ("finetune: interrupted (SIGTERM); MLflow run marked KILLED, its checkpoints kept. "
                    "Continue with:")
    [command] = [ln.strip() for ln in stderr.splitlines() if "--resume" in ln]
    args = shlex.split(command)
    assert args[:2] == ["python", "pipelines/finetune.py"]
    flags = dict(zip(args[2::2], args[3::2], strict=False))
    assert args[2] == "--resume" and " --run-name sigterm " in command
    # the run as started: its workers, its cluster, its resources
    assert re.search(rf"--num-workers 2 --gpus-per-worker 0 --cpus-per-worker 1 .*--address {ray_cluster}",
                     command), command

    resumed = subprocess.run([sys.executable, str(FINETUNE), *args[2:]], cwd=pipeline_dir,
                             capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    result = result_json(resumed.stdout)
    assert result["mlflow_run_id"] == run.info.run_id and result["epochs_logged"] == list(range(EPOCHS))
    [run] = runs_named(mlflow_uri, "tests", name)
    assert run.info.status == "FINISHED" and run.data.params["world_size"] == "2"
    assert len(result["worker_node_ids"]) == 2, "the resumed run trained with the workers it was started with"
    assert flags  # parsed as flag / value pairs


def test_sighup_to_a_local_run_s_group_before_the_first_checkpoint_ends_it_killed_saying_there_is_none(
    pipeline_dir, tiny_options, mlflow_uri
):
    name = "sighup"
    driver = _start(name, None, pipeline_dir, tiny_options, epochs=2)
    record = Path(tiny_options["storage"]) / name / RUN_RECORD
    _wait_for(driver, lambda: _run_id(record) is not None, "MLflow run")
    os.killpg(driver.pid, signal.SIGHUP)  # the terminal closed: the driver and its local Ray's processes
    stdout, stderr = driver.communicate(timeout=300)
    assert driver.returncode == 129, stderr[-3000:]
    run = MlflowClient(mlflow_uri).get_run(_run_id(record))
    assert run.info.status == "KILLED", stderr[-3000:]
    kept = len(list(record.parent.glob("checkpoint_*")))
    [line] = [ln for ln in stderr.splitlines() if ln.startswith("finetune: interrupted")]
    expected = "no checkpoint yet (it starts again at epoch 1)" if kept == 0 else "its checkpoints kept"
    assert line == f"finetune: interrupted (SIGHUP); MLflow run marked KILLED, {expected}. Continue with:"
    assert len([ln for ln in stderr.splitlines() if "--resume" in ln]) == 1


def test_a_name_taken_by_other_data_while_training_is_refused_and_resume_register_as_registers_it(
    ray_cluster, pipeline_dir, tiny_options, mlflow_uri, tmp_path
):
    """While the run trains, a model of another data set is registered under its --register-as: at the end
    the registry refuses (exit 2, one line with the command), the run is FAILED, nothing of it registered;
    ``--resume --register-as`` is validated before anything starts, then registers the trained run under
    the new name (same MLflow run, no epoch trained again)."""
    import mlflow

    from pipelines.data.shards import write_shards
    from pipelines.storage.checkpoints import CONFIG_FILE, MODEL_FILE
    from pipelines.tracking.registry import data_tags, register_checkpoint
    from tests.tiny import TINY_PIPELINE_MODEL

    other = tmp_path / "other"  # the digits stored at 24 px: another data set (its own manifest)
    for split in ("train", "val"):
        write_shards("digits", other, split=split, img_size=24, workers=1)
    checkpoint = tmp_path / "other_model"
    checkpoint.mkdir()
    model = spot.create_model("deit_t", rho=None, img_size=32, num_classes=10, **TINY_PIPELINE_MODEL)
    (checkpoint / CONFIG_FILE).write_text(json.dumps(model.spot_config))
    torch.save(model.state_dict(), checkpoint / MODEL_FILE)

    name, taken = "name-taken", "rs-name-taken"
    driver = _start(name, ray_cluster, pipeline_dir, {**tiny_options, "register_as": taken}, epochs=3)
    record = Path(tiny_options["storage"]) / name / RUN_RECORD
    _wait_for(driver, lambda: _run_id(record) is not None, "MLflow run")  # the start's name check passed
    mlflow.set_tracking_uri(mlflow_uri)
    client = MlflowClient(mlflow_uri)
    experiment = client.create_experiment("rs-other", artifact_location=(tmp_path / "mlartifacts").as_uri())
    register_checkpoint(checkpoint, run_id=client.create_run(experiment).info.run_id, name=taken,
                        metrics={"val_acc1": 0.1, "val_acc5": 0.5, "gmacs": 0.01, "epoch": 0},
                        data=data_tags(other, 32))
    stdout, stderr = driver.communicate(timeout=600)
    assert driver.returncode == 2, stderr[-3000:]
    [line] = [ln for ln in stderr.splitlines() if ln.startswith("finetune: error:")]
    assert line.startswith("finetune: error: training finished (checkpoints in ") and (
        f"nothing registered: registered model '{taken}' holds versions trained on other data") in line, line
    command = shlex.split(line.split("register it so with: ", 1)[1])
    assert command[:3] == ["python", "pipelines/finetune.py", "--resume"] and command[-2:] == [
        "--register-as", "NAME"], command
    run_id = _run_id(record)
    assert client.get_run(run_id).info.status == "FAILED"
    assert all(v.run_id != run_id for v in client.search_model_versions(f"name = '{taken}'"))

    def resume(register_as: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(FINETUNE), *command[2:-1], register_as], cwd=pipeline_dir,
                              capture_output=True, text=True, timeout=600)

    bad = resume("bad/name:x")
    [bad_line] = bad.stderr.strip().splitlines()
    assert bad.returncode == 2 and bad_line.startswith(
        "finetune: error: --register-as 'bad/name:x': use letters, digits and . _ -"), bad.stderr[-2000:]
    assert client.get_run(run_id).info.status == "FAILED"  # nothing started
    good = resume("rs-name-own")
    assert good.returncode == 0, good.stderr[-3000:]
    result = result_json(good.stdout)
    assert result["mlflow_run_id"] == run_id and result["registered_model"] == "rs-name-own"
    assert result["epochs_logged"] == [0, 1, 2] and "epoch 1:" not in good.stdout  # nothing trained again
    assert client.get_run(run_id).info.status == "FINISHED"
    [version] = client.search_model_versions("name = 'rs-name-own'")
    assert version.run_id == run_id
    assert json.loads(record.read_text())["config"]["register_as"] == "rs-name-own"
