"""Rehearsal of ray_cluster.yaml's node commands: the setup commands of the head and of a worker, run as a
non-root user in a scratch home laid out as the container is (the synced repository read-only, the token
file mounted straight into the home directory), then the head's MLflow start command.

Real components throughout: bash, the repository's scripts, Secrets Manager served by moto on 127.0.0.1,
the MLflow server (SQLite in place of PostgreSQL). The one stand-in is `pip`: installs need the network,
so a `pip` first on PATH records what it was asked to install (the pins are checked against
pyproject.toml by test_cluster_config.py). Needs root (to run the commands as another user and to lay out
root-owned directories as Docker does) and util-linux's setpriv; skipped otherwise.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from base64 import b64encode
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config

from pipelines.utils.ports import free_port
from tests.scripts import load_script

REPO = Path(__file__).resolve().parents[1]
UID = GID = 4242  # the container's `ray` (1000 there); any unprivileged id will do
REGION = "us-east-1"

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv to switch users"
)


@pytest.fixture(scope="module")
def secrets_manager():
    """moto's Secrets Manager on 127.0.0.1 with the stack's three secrets; (endpoint, {name: ARN})."""
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    client = boto3.client("secretsmanager", region_name=REGION, endpoint_url=endpoint,
                          aws_access_key_id="test", aws_secret_access_key="test")
    arns = {}
    for name, value in {
        "MlflowJobsSecretArn": {"username": "spot-jobs", "password": "jobs pw $1"},
        "MlflowAdminSecretArn": {"username": "admin", "password": "admin-password-0001"},
        "MlflowDbSecretArn": {"username": "mlflow", "password": "db/pw@x"},
    }.items():
        arns[name] = client.create_secret(Name=name, SecretString=json.dumps(value))["ARN"]
    yield endpoint, arns
    server.stop()


def rendered_config(arns: dict) -> dict:
    """ray_cluster.yaml as `ray up` sees it: placeholders filled, setup commands merged per node kind."""
    render = load_script("infra/aws/render_cluster_config.py")
    text = (REPO / "ray_cluster.yaml").read_text()
    values = {name: f"x-{name}" for name in render.placeholders(text)}
    values.update(arns, Region=REGION, BucketName="spot-bucket", DbEndpoint="db.internal")
    return prepare_config(yaml.safe_load(render.render(text, values)))


def container_home(root: Path, token: str) -> Path:
    """A home directory as Docker leaves it for ray_cluster.yaml's file_mounts, owned by UID."""
    home = root / "home"
    home.mkdir(parents=True)
    (home / "spot").symlink_to(REPO)  # the synced repository; not writable by UID
    (home / ".spot-auth-token").write_text(token)
    for path in (home, home / ".spot-auth-token"):
        os.chown(path, UID, GID)
    return home


def pip_stand_in(root: Path) -> tuple[Path, Path]:
    """A directory with a `pip` that records its arguments (one JSON list per call) and succeeds."""
    bindir, record = root / "bin", root / "pip-calls.jsonl"
    bindir.mkdir()
    record.touch()
    os.chmod(record, 0o666)
    (bindir / "pip").write_text(
        f"#!{sys.executable}\nimport json, sys\n"
        f"open({str(record)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
    )
    os.chmod(bindir / "pip", 0o755)
    return bindir, record


def node_env(home: Path, bindir: Path, endpoint: str) -> dict[str, str]:
    keep = {k: v for k, v in os.environ.items() if k in ("LANG", "LC_ALL", "TZ")}
    return {
        **keep,
        "HOME": str(home),
        "USER": "ray",
        "PATH": f"{bindir}:{Path(sys.executable).parent}:/usr/bin:/bin",
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
    }


def run_as_user(cmd: str, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    """bash -c cmd as UID:GID. The process keeps one capability, reading any file (this machine's Python
    lives under root's private home); every write is checked as UID, which is what the rehearsal is about."""
    setpriv = ["setpriv", f"--reuid={UID}", f"--regid={GID}", "--clear-groups",
               "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search"]
    return subprocess.run([*setpriv, "bash", "-c", cmd], env=env, cwd=env["HOME"], capture_output=True,
                          text=True, timeout=timeout)


def run_all(commands: list[str], env: dict) -> None:
    for cmd in commands:
        done = run_as_user(cmd, env)
        assert done.returncode == 0, f"{cmd!r} failed:\n{done.stdout}\n{done.stderr}"


@pytest.fixture
def scratch():
    """A directory the other user can reach (pytest's own tmp dirs are private to root)."""
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="spot-setup-"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def test_head_and_worker_setup_commands_succeed_as_non_root(scratch, secrets_manager):
    endpoint, arns = secrets_manager
    config = rendered_config(arns)
    token = secrets.token_hex(16)
    bindir, record = pip_stand_in(scratch)

    head_home = container_home(scratch / "head", token)
    run_all(config["head_setup_commands"], node_env(head_home, bindir, endpoint))
    for d in (".spot", ".ray"):
        info = (head_home / d).stat()
        assert (info.st_uid, info.st_mode & 0o777) == (UID, 0o700), d
    assert (head_home / ".ray/auth_token").read_text() == token
    for f in (".ray/auth_token", ".spot/jobs.env", ".spot/server.env"):
        assert (head_home / f).stat().st_mode & 0o777 == 0o600, f
    shown = run_as_user(
        "set -a; . ~/.spot/jobs.env; . ~/.spot/server.env; set +a; env", node_env(head_home, bindir, endpoint)
    )
    env = dict(line.split("=", 1) for line in shown.stdout.splitlines() if "=" in line)
    assert env["MLFLOW_TRACKING_USERNAME"] == "spot-jobs" and env["MLFLOW_TRACKING_PASSWORD"] == "jobs pw $1"
    assert env["MLFLOW_BACKEND_STORE_URI"] == "postgresql://mlflow:db%2Fpw%40x@db.internal:5432/mlflow"
    assert env["SPOT_BUCKET"] == "spot-bucket" and env["MLFLOW_AUTH_ADMIN_PASSWORD"] == "admin-password-0001"
    assert "SPOT_MLFLOW_URI=http://" in (head_home / ".spot/head.env").read_text()

    worker_home = container_home(scratch / "worker", token)
    # a GPU node: its container lists 8 GPUs (the workers' setup stops when it lists none)
    gpus = "\n".join(f"GPU {i}: NVIDIA A100-SXM4-40GB (UUID: GPU-{i})" for i in range(8))
    (bindir / "nvidia-smi").write_text(f"#!/bin/sh\ncat <<'EOF'\n{gpus}\nEOF\n")
    os.chmod(bindir / "nvidia-smi", 0o755)
    run_all(config["worker_setup_commands"], node_env(worker_home, bindir, endpoint))
    assert (worker_home / ".spot/jobs.env").exists() and (worker_home / ".ray/auth_token").exists()
    assert not (worker_home / ".spot/server.env").exists(), "the server's secrets stay on the head"

    calls = [json.loads(line) for line in record.read_text().splitlines()]
    assert all(call[0] == "install" for call in calls)
    installed = " ".join(" ".join(call) for call in calls)
    assert "-e " + str(head_home / "spot") in installed and "mlflow[auth]" in installed
    constraints = str(head_home / "spot/infra/constraints.txt")
    assert all(call[call.index("-c") + 1] in (constraints, constraints.replace("head", "worker"))
               for call in calls), calls


def test_the_old_mount_layout_breaks_the_head_setup(scratch):
    """Item 1 of issue 15, as it was: a file mounted at ~/.spot/cluster.env makes Docker create ~/.spot as
    root, and the head setup's write of ~/.spot/head.env fails for `ray`."""
    home = scratch / "home"
    home.mkdir()
    os.chown(home, UID, GID)
    (home / ".spot").mkdir(mode=0o755)  # created by Docker (root) for the bind mount of cluster.env
    (home / ".spot/cluster.env").write_text("X=1\n")
    os.chown(home / ".spot/cluster.env", UID, GID)
    old_head_setup = 'echo "export SPOT_MLFLOW_URI=http://127.0.0.1:5000" > ~/.spot/head.env'
    done = run_as_user(old_head_setup, node_env(home, home, "http://127.0.0.1:9"))
    assert done.returncode != 0 and "Permission denied" in done.stderr


# --------------------------------------------------------------------------------------------------------
# The head's MLflow start command (infra/mlflow/head_service.sh)


def mlflow_start_command() -> str:
    (cmd,) = [c for c in yaml.safe_load((REPO / "ray_cluster.yaml").read_text())["head_start_ray_commands"]
              if "head_service.sh start" in c]
    return cmd


def server_env_file(home: Path, backend: str, auth: str, port: int) -> None:
    (home / ".spot").mkdir(mode=0o700, exist_ok=True)
    values = {
        "MLFLOW_BACKEND_STORE_URI": backend,
        "MLFLOW_AUTH_DATABASE_URI": auth,
        "MLFLOW_ARTIFACTS_DESTINATION": str(home / "artifacts"),
        "MLFLOW_AUTH_ADMIN_USERNAME": "admin",
        "MLFLOW_AUTH_ADMIN_PASSWORD": "admin-password-0001",
        "MLFLOW_JOBS_USERNAME": "spot-jobs",
        "MLFLOW_JOBS_PASSWORD": "jobs-password-0001",
        "MLFLOW_PORT": str(port),
        "MLFLOW_WORKERS": "1",
        "SPOT_MLFLOW_START_TIMEOUT_S": "150",
    }
    (home / ".spot/server.env").write_text("".join(f"{k}='{v}'\n" for k, v in values.items()))
    for path in (home / ".spot", home / ".spot/server.env"):
        os.chown(path, UID, GID)


def mlflow_home(scratch: Path) -> Path:
    home = scratch / "home"
    home.mkdir()
    os.chown(home, UID, GID)
    (home / "spot").symlink_to(REPO)
    return home


def get(url: str, user: str, password: str) -> int:
    auth = b64encode(f"{user}:{password}".encode()).decode()
    request = urllib.request.Request(url, headers={"Authorization": f"Basic {auth}"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


@pytest.mark.integration
def test_mlflow_service_starts_checks_health_and_creates_the_jobs_user(scratch):
    home = mlflow_home(scratch)
    port = free_port()
    server_env_file(home, f"sqlite:///{home}/mlflow.db", f"sqlite:///{home}/auth.db", port)
    env = node_env(home, Path("/nonexistent"), "http://127.0.0.1:9")
    try:
        done = run_as_user(mlflow_start_command(), env)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "MLflow is up" in done.stdout and "spot-jobs is ready" in done.stdout
        api = f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search?max_results=1"
        assert get(api, "spot-jobs", "jobs-password-0001") == 200
        assert get(api, "spot-jobs", "wrong") == 401
    finally:
        stopped = run_as_user("bash ~/spot/infra/mlflow/head_service.sh stop", env)
    assert stopped.returncode == 0
    assert run_as_user("bash ~/spot/infra/mlflow/head_service.sh status", env).returncode != 0


@pytest.mark.integration
@pytest.mark.parametrize(
    "backend, auth, reason",
    [
        ("sqlite:////nonexistent-dir/mlflow.db", "sqlite:///{home}/auth.db", "mlflow db upgrade failed"),
        ("sqlite:///{home}/mlflow.db", "sqlite:////nonexistent-dir/auth.db", "exited during start-up"),
    ],
)
def test_mlflow_service_fails_loudly_on_a_bad_database_uri(scratch, backend, auth, reason):
    """A wrong URI fails the head start command (so `ray up`) with the reason; nothing is left running."""
    home = mlflow_home(scratch)
    port = free_port()
    server_env_file(home, backend.format(home=home), auth.format(home=home), port)
    env = node_env(home, Path("/nonexistent"), "http://127.0.0.1:9")
    done = run_as_user(mlflow_start_command(), env)
    assert done.returncode != 0 and reason in done.stderr, done.stdout + done.stderr
    assert not (home / ".spot/mlflow-supervisor.pid").exists()
    assert run_as_user("bash ~/spot/infra/mlflow/head_service.sh status", env).returncode != 0
