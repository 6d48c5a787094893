"""Checkpoints in S3, resume from S3 (issue 23, item 6): ``finetune.py --storage s3://bucket/prefix`` against
a moto S3 server on 127.0.0.1 (boto3 and pyarrow, hence Ray Train's storage, find it through
``AWS_ENDPOINT_URL_S3``), the driver SIGKILLed once the first epoch's checkpoint is in S3 and in MLflow,
then ``--resume``: one MLflow run with every epoch, FINISHED.

The driver runs as a process with its own local Ray (the session's Ray was started without the S3
variables, which its workers would need): Ray's processes share the driver's fate, so the kill takes the
whole training down, as losing the head's driver does on a cluster.
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from pipelines import finetune
from pipelines.storage.run_record import RUN_RECORD
from tests.s3_server import S3Server

BUCKET = "spot-runs"
PREFIX = "team/runs"


@pytest.fixture(scope="module")
def s3_server():
    server = S3Server(BUCKET).start()
    yield server
    server.stop()


def _finetune(args: list[str], cwd: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(Path(finetune.__file__)), *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _kill_marked(marker: str) -> None:
    """SIGKILL every process whose environment holds ``marker`` (the drivers and the Ray processes they
    started, which inherit it), so that a test failing half-way leaves no Ray behind."""
    needle = f"SPOT_TEST_MARKER={marker}".encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if needle in (entry / "environ").read_bytes().split(b"\0"):
                    os.kill(int(entry.name), signal.SIGKILL)


@pytest.mark.integration
def test_driver_killed_after_a_checkpoint_in_s3_resumes_from_s3_into_the_same_mlflow_run(
    s3_server, digits_shards, tmp_path
):
    from tests.tiny import TINY_PIPELINE_MODEL

    s3, name = s3_server.client(), "s3-resume"
    storage = f"s3://{BUCKET}/{PREFIX}"
    mlflow_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    marker = uuid.uuid4().hex
    env = {**os.environ, **s3_server.env, "PYTHONPATH": str(Path(finetune.__file__).parents[1]),
           "SPOT_TEST_MARKER": marker}
    options = {"backbone": "deit_t", "data": str(digits_shards), "img_size": 32,
               "model_args": TINY_PIPELINE_MODEL, "batch_size": 64, "num_workers": 2, "warmup_epochs": 1,
               "freeze_epochs": 1, "randaugment": False, "vis_images": 0, "dense": True, "epochs": 3,
               "storage": storage, "mlflow_uri": mlflow_uri, "experiment": "s3", "run_name": name,
               "register_as": name}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(options))

    driver = _finetune(["--config", str(tmp_path / "run.yaml")], tmp_path, env)
    run_dir = f"{PREFIX}/{name}"
    run_id, deadline = None, time.monotonic() + 400
    try:
        # the first epoch is done: its checkpoint is in Ray's snapshot in S3 and its metrics in MLflow
        while time.monotonic() < deadline and driver.poll() is None:
            keys = s3_server.keys(BUCKET, run_dir + "/")
            if run_id is None and f"{run_dir}/{RUN_RECORD}" in keys:
                record = s3.get_object(Bucket=BUCKET, Key=f"{run_dir}/{RUN_RECORD}")["Body"].read()
                run_id = json.loads(record)["mlflow_run_id"]
            if (run_id and f"{run_dir}/checkpoint_manager_snapshot.json" in keys
                    and MlflowClient(mlflow_uri).get_metric_history(run_id, "val_acc1")):
                break
            time.sleep(0.5)
        assert driver.poll() is None, f"the driver ended too early: {driver.communicate()[1][-3000:]}"
        checkpoints = {k.split("/")[-2] for k in keys if "/checkpoint_2" in k}
        assert checkpoints, keys
        driver.send_signal(signal.SIGKILL)
        driver.communicate(timeout=60)
    finally:
        _kill_marked(marker)
    assert driver.returncode == -signal.SIGKILL
    client = MlflowClient(mlflow_uri)
    assert client.get_run(run_id).info.status == "RUNNING"  # nobody could end it

    resumed = _finetune(["--resume", "--run-name", name, "--storage", storage], tmp_path, env)
    try:
        stdout, stderr = resumed.communicate(timeout=600)
    finally:
        _kill_marked(marker)
    assert resumed.returncode == 0, stderr[-3000:]
    result = json.loads(stdout.split("RESULT_JSON: ")[-1])
    assert result["mlflow_run_id"] == run_id and result["epochs_logged"] == [0, 1, 2]
    assert result["storage"] == f"{storage}/{name}" and result["checkpoint"].startswith(f"{storage}/{name}/")

    experiment = client.get_experiment_by_name("s3")
    [run] = client.search_runs([experiment.experiment_id], filter_string=f"attributes.run_name = '{name}'")
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    # one value per epoch: none lost, none trained twice
    for key in ("val_acc1", "train_total", "epoch_time_s"):
        assert sorted(m.step for m in client.get_metric_history(run_id, key)) == [0, 1, 2], key
    assert client.get_model_version_by_alias(name, "champion").run_id == run_id
    assert not (tmp_path / "ray_results").exists()  # nothing went to a local default storage


def test_checkpoint_uri_names_the_file_system_of_a_checkpoint_in_s3(tmp_path):
    """Ray's ``Checkpoint.path`` in S3 is ``bucket/key`` (what RESULT_JSON and the ``latest_checkpoint`` tag
    printed before); the URI keeps ``s3://``, and a local path stays as it is."""
    import pyarrow.fs
    from ray.train import Checkpoint

    from pipelines.storage.checkpoints import checkpoint_uri

    s3 = pyarrow.fs.S3FileSystem(access_key="testing", secret_key="testing", region="us-east-1",
                                 endpoint_override="http://127.0.0.1:9")  # never contacted
    in_s3 = Checkpoint(f"{BUCKET}/{PREFIX}/r/checkpoint_1", filesystem=s3)
    assert in_s3.path == f"{BUCKET}/{PREFIX}/r/checkpoint_1"
    assert checkpoint_uri(in_s3) == f"s3://{BUCKET}/{PREFIX}/r/checkpoint_1"
    assert checkpoint_uri(Checkpoint(str(tmp_path))) == str(tmp_path)
