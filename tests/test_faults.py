"""Faults and bad input, injected for real (issue 14): no silent loss, no false champion, no secret left
behind. Real Ray, DALI, MLflow and files; tiny models, one worker, short runs."""

import contextlib
import json
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow import MlflowClient

from pipelines import finetune
from pipelines.data.manifest import read_manifest, sha256_file
from pipelines.data.shards import write_shards
from pipelines.storage.location import RunLocation
from pipelines.storage.run_record import RUN_RECORD, read_record, write_record
from tests.mlflow_server import MlflowServer


def _finetune_in_process(options: dict, tmp_path: Path, cwd: Path) -> int:
    """``finetune.py --config run.yaml`` of ``options`` in this process (the session's Ray), its exit code."""
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(options))
    with contextlib.chdir(cwd):
        return finetune.main(["--config", str(path)])


@pytest.mark.integration
def test_nonfinite_loss_stops_the_run_keeps_the_last_good_checkpoint_and_registers_nothing(
    ray_cluster, pipeline_dir, tiny_options, mlflow_uri, tmp_path, capsys
):
    """lr 1e8 from the first step (the issue's reproduction): the loss is NaN / inf within epoch 1."""
    name = "nonfinite"
    options = {**tiny_options, "dense": True, "num_workers": 1, "epochs": 2, "run_name": name, "lr": 1e8,
               "warmup_epochs": 0, "register_as": "nonfinite-test", "vis_images": 0}
    code = _finetune_in_process(options, tmp_path, pipeline_dir)
    out, err = capsys.readouterr()
    assert code == 1, err[-3000:]
    [line] = [ln for ln in err.splitlines() if ln.startswith("finetune: training failed: ")]
    assert "non-finite training loss at epoch 1, step " in line and "nothing registered" in line, line
    assert "RESULT_JSON" not in out
    run_dir = Path(tiny_options["storage"]) / name
    run_id = json.loads((run_dir / RUN_RECORD).read_text())["mlflow_run_id"]
    client = MlflowClient(mlflow_uri)
    run = client.get_run(run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["stop_reason"].startswith("non-finite training loss at epoch 1, step ")
    assert client.get_metric_history(run_id, "val_acc1") == []  # no epoch finished, nothing NaN logged
    assert client.search_model_versions("name = 'nonfinite-test'") == []
    assert not list(run_dir.glob("checkpoint_*"))  # no checkpoint of NaN weights
    assert "last good checkpoint: none" in line


# --- interrupted writes: the previous file stays whole ------------------------------------------------------


def test_run_record_write_over_the_file_size_limit_keeps_the_old_record(tmp_path):
    """A record write that hits RLIMIT_FSIZE (a full disk's stand-in) in a real process: the old record is
    still there and valid JSON, and no temporary file is left."""
    write_record(RunLocation(str(tmp_path), "run"), {"mlflow_run_id": "abc"})
    script = (
        "import resource, signal, sys\n"
        "from pipelines.storage.location import RunLocation\n"
        "from pipelines.storage.run_record import write_record\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (256, 256))\n"
        f"write_record(RunLocation({str(tmp_path)!r}, 'run'), {{'mlflow_run_id': 'x' * 4096}})\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=Path(__file__).parents[1], timeout=120)
    assert proc.returncode != 0 and "File too large" in proc.stderr, proc.stderr[-2000:]
    assert read_record(RunLocation(str(tmp_path), "run")) == {"mlflow_run_id": "abc"}
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [RUN_RECORD]


def test_failed_manifest_write_leaves_the_old_split_intact(tmp_path):
    """Re-writing a split whose new manifest cannot be written (its temporary path is taken by a directory):
    the old shards and manifest are untouched and still verify."""
    out = tmp_path / "shards"
    write_shards("digits", out, split="val", img_size=16, workers=1)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    (out / ".manifest.json.tmp").mkdir()
    with pytest.raises(IsADirectoryError):
        write_shards("digits", out, split="val", img_size=16, seed=1, shard_size=100, workers=1)
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert after == before
    assert read_manifest(out, verify=True).counts["val"] == 360
    assert not (out / ".old-val").exists() and not (out / ".staging-val").exists()


# --- labels outside the classes ----------------------------------------------------------------------------


def _poison_label(shard, sample: int) -> str:
    """Rewrite the raw int32 label of the shard's ``sample`` to 10 (10 classes) in place, same size, and
    the manifest's checksum with it (a shard written with a bad label); returns the sample's key."""
    import numpy as np

    fields = shard.index_path.read_text().splitlines()[sample + 1].split()  # line 0 is the header
    at = fields.index("lbl")
    offset, member = int(fields[at + 1]), fields[at + 3]
    with open(shard.path, "r+b") as f:
        f.seek(offset)
        f.write(np.int32(10).tobytes())
    manifest = shard.path.parent / "manifest.json"  # written so: the checksum matches the bad label
    raw = json.loads(manifest.read_text())
    for entry in (e for split in raw["splits"].values() for e in split["shards"]):
        if entry["tar"] == shard.path.name:
            entry["sha256"] = sha256_file(shard.path)
    manifest.write_text(json.dumps(raw))
    return member.split(".", 1)[0]


def test_out_of_range_label_in_a_shard_is_named_and_evaluate_refuses(tmp_path):
    """One sample's label rewritten to 10 in a real val shard: reading names the shard and key, and
    evaluation stops instead of counting a miss."""
    import torch

    from pipelines.data.manifest import LabelRangeError
    from pipelines.evaluation.metrics import evaluate_model
    from tests.tiny import tiny

    out = tmp_path / "shards"
    write_shards("digits", out, split="val", img_size=32, workers=1)
    shard = read_manifest(out).shard_infos("val")[0]
    key = _poison_label(shard, 6)
    with pytest.raises(LabelRangeError, match=rf"{shard.path}: sample '{key}' has label 10, outside the 10"):
        evaluate_model(tiny("deit_t", rho=None), out, batch_size=64, device=torch.device("cpu"))


@pytest.mark.integration
def test_out_of_range_label_met_in_training_stops_every_rank_at_once_naming_shard_and_key(
    ray_cluster, pipeline_dir, tiny_options, tmp_path, capsys
):
    """The same poisoned label in a training shard, 2 workers: the rank that reads it and the other stop at
    the same step (no worker restart reading it again), the run is FAILED naming shard and key."""
    out = tmp_path / "shards"
    for split in ("train", "val"):
        write_shards("digits", out, split=split, img_size=32, workers=1)
    shard = read_manifest(out).shard_infos("train")[0]
    key = _poison_label(shard, 6)
    name = "bad-label"
    options = {**tiny_options, "data": str(out), "dense": True, "epochs": 2, "run_name": name,
               "register_as": "bad-label-test", "vis_images": 0}
    line, reason = _failed_at_once(options, tmp_path, pipeline_dir, capsys)
    assert f"{shard.path}: sample '{key}' has label 10" in line and key in reason, line


@pytest.mark.integration
def test_a_corrupt_shard_under_an_intact_manifest_fails_the_run_at_once_naming_it(
    ray_cluster, pipeline_dir, tiny_options, digits_shards, tmp_path, capsys
):
    """Bit rot in the middle of the last train shard (same size, manifest untouched), 2 workers: the rank
    that reads it finds the checksum wrong before DALI opens it, every rank stops (no restart onto the
    shard), the run is FAILED with the shard, expected and actual sha256 in one line and in
    ``stop_reason``; nothing registered."""
    out = tmp_path / "shards"
    shutil.copytree(digits_shards, out)
    shard = read_manifest(out).shard_infos("train")[-1]
    expected = _rot(shard)
    options = {**tiny_options, "data": str(out), "dense": True, "epochs": 2, "run_name": "corrupt-shard",
               "register_as": "corrupt-shard-test", "vis_images": 0}
    line, reason = _failed_at_once(options, tmp_path, pipeline_dir, capsys)
    assert line.startswith(f"finetune: training failed: {expected} (corrupt shard"), line
    assert expected in reason


def test_a_corrupt_val_shard_under_an_intact_manifest_is_named_by_evaluate_before_it_is_read(
    tmp_path, capsys
):
    """The same bit rot in a val shard: `evaluate` names the shard and both checksums in one line, exit 2,
    instead of handing the tar to DALI."""
    import torch

    from pipelines import evaluate
    from pipelines.storage.checkpoints import CONFIG_FILE, MODEL_FILE
    from tests.tiny import tiny

    out = tmp_path / "shards"
    for split in ("train", "val"):
        write_shards("digits", out, split=split, img_size=32, workers=1)
    shard = read_manifest(out).shard_infos("val")[0]
    expected = _rot(shard)
    model = tmp_path / "model"
    model.mkdir()
    net = tiny("deit_t", rho=None, img_size=32, num_classes=10)
    (model / CONFIG_FILE).write_text(json.dumps(net.spot_config))
    torch.save(net.state_dict(), model / MODEL_FILE)
    capsys.readouterr()
    assert evaluate.main(["--model", str(model), "--data", str(out)]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"evaluate: error: {expected}"), line


def _rot(shard) -> str:
    """Flip 64 bytes in the middle of ``shard``'s tar (same size, manifest untouched): the mismatch line."""
    data = bytearray(shard.path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
    shard.path.write_bytes(bytes(data))
    return f"{shard.path}: sha256 {sha256_file(shard.path)} does not match manifest {shard.sha256}"


def _failed_at_once(options: dict, tmp_path: Path, pipeline_dir: Path, capsys) -> tuple[str, str]:
    """Run ``options`` (with ``register_as``), expecting a run that fails at once: exit 1, one "training
    failed" line saying nothing was registered, the MLflow run FAILED without a worker restart, no model
    version, no result. That line and the run's ``stop_reason``."""
    code = _finetune_in_process(options, tmp_path, pipeline_dir)
    out_text, err = capsys.readouterr()
    assert code == 1, err[-3000:]
    [line] = [ln for ln in err.splitlines() if ln.startswith("finetune: training failed: ")]
    assert "nothing registered" in line, line
    record = Path(options["storage"]) / options["run_name"] / RUN_RECORD
    client = MlflowClient(options["mlflow_uri"])
    run = client.get_run(json.loads(record.read_text())["mlflow_run_id"])
    assert run.info.status == "FAILED"
    assert "worker_failures" not in run.data.tags  # stopped at once, not restarted --max-failures times
    assert client.search_model_versions(f"name = '{options['register_as']}'") == []
    assert "RESULT_JSON" not in out_text
    return line, run.data.tags["stop_reason"]


@pytest.mark.integration
def test_a_worker_killed_with_no_restart_left_is_named_on_the_console_and_in_mlflow(
    ray_cluster, pipeline_dir, tiny_options, tmp_path, capsys
):
    """SIGKILL to a Train worker of a run with ``--max-failures 0``: the run fails for good; the console line
    and ``stop_reason`` say which rank failed and how, not only Ray's "Training failed due to worker
    errors:"; the run is FAILED, nothing registered."""
    import os
    import signal
    import threading
    import time

    from ray.util.state import list_actors

    name = "killed-worker"
    record = Path(tiny_options["storage"]) / name / RUN_RECORD
    snapshot = record.parent / "checkpoint_manager_snapshot.json"  # training, not starting: a failure
    killed, errors = [], []

    def kill_a_worker():
        deadline = time.monotonic() + 300
        alive = [("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")]
        while not killed and time.monotonic() < deadline:
            time.sleep(0.5)
            try:
                workers = list_actors(address=ray_cluster, filters=alive) if snapshot.exists() else []
                if len(workers) == 2:
                    os.kill(max(workers, key=lambda a: a.pid).pid, signal.SIGKILL)
                    killed.append(True)
            except Exception as err:  # reported by the assertion below
                errors.append(repr(err))

    killer = threading.Thread(target=kill_a_worker, daemon=True)
    killer.start()
    options = {**tiny_options, "dense": True, "epochs": 4, "run_name": name, "max_failures": 0,
               "register_as": "killed-worker-test", "vis_images": 0}
    code = _finetune_in_process(options, tmp_path, pipeline_dir)
    killer.join(timeout=10)
    out_text, err = capsys.readouterr()
    assert killed, f"no Train worker was killed: {errors}"
    assert code == 1, err[-3000:]
    [line] = [ln for ln in err.splitlines() if ln.startswith("finetune: training failed: ")]
    assert line.startswith("finetune: training failed: worker rank "), line
    cause = line.removeprefix("finetune: training failed: ")
    assert "Training failed due to worker errors" not in cause and len(cause) > len("worker rank 1: "), line
    client = MlflowClient(tiny_options["mlflow_uri"])
    run = client.get_run(json.loads(record.read_text())["mlflow_run_id"])
    assert run.info.status == "FAILED" and run.data.tags["stop_reason"] == cause
    assert client.search_model_versions("name = 'killed-worker-test'") == []
    assert "RESULT_JSON" not in out_text


def test_a_failed_worker_is_named_with_its_error_not_only_ray_s_header():
    """What ``finetune`` prints and tags ``stop_reason`` with when the workers fail for good: each failed
    rank and its error (Ray's own message starts "Training failed due to worker errors:")."""
    from ray.train.v2.api.exceptions import ControllerError, WorkerGroupError

    from pipelines.training.trainer import failure_cause

    error = WorkerGroupError("traceback...", {1: RuntimeError("DALI reader: bad tar header\nmore"),
                                              0: OSError("disk gone")})
    assert str(error).splitlines()[0] == "Training failed due to worker errors:"
    assert failure_cause(error) == ("worker rank 0: OSError: disk gone; worker rank 1: RuntimeError: DALI "
                                    "reader: bad tar header")
    assert failure_cause(ControllerError(ValueError("no resources"))) == "no resources"


# --- secrets -----------------------------------------------------------------------------------------------


def test_password_in_the_tracking_uri_is_never_printed_and_the_check_reaches_the_host(
    digits_shards, tmp_path, monkeypatch, capsys, closed_port
):
    """A closed port on 127.0.0.1 behind ``user:password@``: refused as unreachable (not as an unknown host
    name), in one line without the credentials."""
    port = closed_port
    monkeypatch.chdir(tmp_path)
    uri = f"http://spot:s3cret-pw@127.0.0.1:{port}"
    assert finetune.main(["--data", str(digits_shards), "--batch-size", "64", "--mlflow-uri", uri]) == 2
    out, err = capsys.readouterr()
    assert "s3cret-pw" not in out + err
    assert f"MLflow tracking server http://127.0.0.1:{port} is unreachable" in err, err
    assert "Name or service" not in err, err


# --- MLflow outage -----------------------------------------------------------------------------------------


def test_reports_wait_while_the_server_is_down_and_are_sent_once_when_it_is_back(tmp_path, monkeypatch):
    """A killed tracking server: the unsent epochs go to the run's pending record, in order; once the
    server is back they are sent, and sending them again (a retry after a half-way failure) adds nothing."""
    from pipelines.tracking.pending_reports import (
        PENDING_RECORD,
        NotSent,
        pending,
        report_entry,
        send,
        send_pending,
    )
    from pipelines.training.worker import RUN_VALUES

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # as on the Train controller
    server = MlflowServer(tmp_path / "server").start()
    client = MlflowClient(server.url)
    run_id = client.create_run(client.create_experiment("outage")).info.run_id
    location, name = RunLocation(str(tmp_path / "runs"), "r"), "r"
    entries = [report_entry({"epoch": e, "val_acc1": 0.5 + e / 10, "worker_node_ids": ["n"]}, None, 1000 + e,
                            RUN_VALUES)
               for e in range(3)]
    send(client, run_id, location, entries[:1])
    server.kill()
    with pytest.raises(NotSent) as raised:
        send(client, run_id, location, entries[1:])
    assert [e["step"] for e in raised.value.entries] == [1, 2]
    assert pending(location) == entries[1:]

    server.start()
    assert send_pending(client, run_id, location) == 2
    assert not (tmp_path / "runs" / name / PENDING_RECORD).exists()
    send(client, run_id, location, entries)
    history = client.get_metric_history(run_id, "val_acc1")
    assert sorted((m.step, round(m.value, 6)) for m in history) == [(0, 0.5), (1, 0.6), (2, 0.7)]
    server.kill()


@pytest.mark.integration
def test_password_in_the_tracking_uri_is_used_and_left_nowhere(
    ray_cluster, pipeline_dir, tiny_options, tmp_path, capsys
):
    """A basic-auth server started by infra/mlflow/start_server.sh and ``--mlflow-uri
    http://admin:<password>@...``: the run logs and registers, and the password is in no file the run, the
    server or Ray wrote, in nothing printed, and on no command line of the server."""
    import ray

    password = secrets.token_urlsafe(16)
    server = MlflowServer(tmp_path / "server", admin_password=password).start()
    for pid in server.pids():
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        assert password.encode() not in cmdline and b"mlflow.db" not in cmdline, cmdline

    name = "secret-uri"
    options = {**tiny_options, "dense": True, "num_workers": 1, "epochs": 1, "run_name": name,
               "register_as": name, "mlflow_uri": f"http://admin:{password}@127.0.0.1:{server.port}"}
    previous = mlflow.get_tracking_uri()
    try:
        code = _finetune_in_process(options, tmp_path, pipeline_dir)
    finally:
        mlflow.set_tracking_uri(previous)  # the server is killed below: no later test may look there
    out, err = capsys.readouterr()
    assert code == 0, err[-3000:]
    result = json.loads(out.split("RESULT_JSON: ")[-1])
    assert result["mlflow_tracking_uri"] == server.url and result["registered_version"] == 1

    client = MlflowClient(server.url)  # authenticated by the variables the URI's credentials went to
    assert client.get_run(result["mlflow_run_id"]).info.status == "FINISHED"
    server.kill()
    assert password not in out + err
    session_dir = Path(ray._private.worker._global_node.get_session_dir_path())
    searched = [Path(tiny_options["storage"]) / name, server.root / "mlartifacts", server.root / "mlflow.db",
                server.root / "server.log", session_dir]
    leaks = [str(f) for root in searched for f in ([root] if root.is_file() else root.rglob("*"))
             if f.is_file() and password.encode() in f.read_bytes()]
    assert not leaks


@contextlib.contextmanager
def _locked(db: Path):
    """``db`` held in an exclusive transaction by another process for the block (MLflow waits 20 s for it,
    then gives up)."""
    locker = subprocess.Popen(
        [sys.executable, "-c", "import sqlite3, time\n"
         f"db = sqlite3.connect({str(db)!r}, isolation_level=None)\n"
         "db.execute('BEGIN EXCLUSIVE')\nprint('locked', flush=True)\ntime.sleep(600)\n"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert locker.stdout.readline().strip() == "locked"
        yield
    finally:
        locker.kill()
        locker.wait()


@pytest.mark.integration  # MLflow waits 20 s for a locked SQLite database before it gives up
def test_a_stopped_run_mlflow_cannot_mark_is_said_to_be_left_running(tmp_path, caplog):
    """Another process holds the store's database locked past MLflow's wait as a stopped run ends: the run
    is not marked KILLED, the warning names it, and finetune's last line says it is left RUNNING, not
    that it was marked."""
    from pipelines.tracking.mlflow_run import MlflowRun
    from pipelines.training.job import stopped

    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    run = MlflowRun.create(uri, "faults", "locked")
    with _locked(db):
        err = stopped(run, "python pipelines/finetune.py --resume x", 0)
    assert err.marked is False and str(err) == "python pipelines/finetune.py --resume x"
    assert MlflowClient(uri).get_run(run.run_id).info.status == "RUNNING"
    [warning] = [r.getMessage() for r in caplog.records if "could not be marked" in r.getMessage()]
    assert warning.startswith(f"MLflow run {run.run_id} could not be marked KILLED (")
    line = finetune.interrupted_line(err)
    assert line.split("; ", 1)[1] == ("MLflow run not marked KILLED (MLflow could not record it; it shows "
                                      "RUNNING until a --resume), no checkpoint yet (it starts again at "
                                      "epoch 1).")
    again = stopped(run, "python pipelines/finetune.py --resume x", 0)  # the lock gone: this one marks it
    assert again.marked is True and "; MLflow run marked KILLED, " in finetune.interrupted_line(again)
    assert MlflowClient(uri).get_run(run.run_id).info.status == "KILLED"


@pytest.mark.integration  # MLflow waits 20 s for a locked SQLite database before it gives up
def test_a_stopped_sweep_mlflow_cannot_mark_is_said_to_be_left_running(tmp_path):
    """As above, for a sweep: with the store locked neither the sweep's run nor its running trial's is
    marked, and sweep_lambdas' line says they show RUNNING; unlocked, both are marked and counted."""
    from pipelines.tracking.mlflow_run import MlflowRun
    from tuning import sweep_lambdas
    from tuning.sweep import stopped_sweep

    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    parent = MlflowRun.create(uri, "faults", "sweep")
    trial = MlflowRun.create(uri, "faults", "trial", parent=parent)
    setup = {"tracking_uri": uri, "parent_run_id": parent.run_id}
    with _locked(db):
        err = stopped_sweep(parent, setup, "python tuning/sweep_lambdas.py --resume x")
    assert err.marked is False and err.trials is None
    client = MlflowClient(uri)
    assert [client.get_run(r.run_id).info.status for r in (parent, trial)] == ["RUNNING", "RUNNING"]
    assert sweep_lambdas.interrupted_line(err).split("; ", 1)[1] == (
        "MLflow runs of the sweep and of its running trials not all marked KILLED (MLflow could not record "
        "it; they show RUNNING until a --resume), finished trials and checkpoints kept.")
    again = stopped_sweep(parent, setup, "python tuning/sweep_lambdas.py --resume x")
    assert again.marked is True and again.trials == 1
    assert [client.get_run(r.run_id).info.status for r in (parent, trial)] == ["KILLED", "KILLED"]
    assert "; MLflow runs of the sweep and of its 1 running trial(s) marked KILLED, " in (
        sweep_lambdas.interrupted_line(again))


def test_an_evaluation_run_whose_logging_fails_ends_failed_not_running(tmp_path):
    """A figure gone from disk before it is logged: the error reaches the caller and the evaluation's run
    ends FAILED, with what was logged before it, not RUNNING."""
    from pipelines.tracking.mlflow_run import log_results

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    gone = tmp_path / "masks.png"
    with pytest.raises(Exception, match="masks.png"), contextlib.chdir(tmp_path):
        log_results(uri, "faults", "evaluation", params={"rho": 0.5}, metrics={"acc1": 90.0},
                    text=("evaluation.md", "# table"), artifacts={"figures": [gone]})
    [run] = MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name("faults").experiment_id])
    assert run.info.run_name == "evaluation" and run.info.status == "FAILED"
    assert run.data.metrics == {"acc1": 90.0}
