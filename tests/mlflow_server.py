"""A real MLflow tracking server on 127.0.0.1 for fault tests: started, killed and started again on the same
port over the same SQLite store and artifact directory."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from pipelines.utils.ports import free_port

REPO = Path(__file__).resolve().parents[1]
START_SCRIPT = REPO / "infra" / "mlflow" / "start_server.sh"


class MlflowServer:
    """``mlflow server`` over ``root``; with ``admin_password``, through ``infra/mlflow/start_server.sh``
    (basic auth, user ``admin``). The stores are SQLite files and the artifacts a directory in ``root``
    unless ``backend_store_uri`` / ``auth_database_uri`` / ``artifacts_destination`` name others (PostgreSQL
    databases and an S3 bucket, as deployed; ``env``: what the server needs to reach them)."""

    def __init__(self, root: Path, admin_password: str | None = None, *, backend_store_uri: str | None = None,
                 auth_database_uri: str | None = None, artifacts_destination: str | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.root = root
        self.admin_password = admin_password
        self.backend_store_uri = backend_store_uri or f"sqlite:///{root / 'mlflow.db'}"
        self.auth_database_uri = auth_database_uri or f"sqlite:///{root / 'mlflow_auth.db'}"
        self.artifacts_destination = artifacts_destination or str(root / "mlartifacts")
        self.env = env or {}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        root.mkdir(parents=True, exist_ok=True)

    def _command(self) -> tuple[list[str], dict[str, str]]:
        bindir = Path(sys.executable).parent
        env = {**os.environ, **self.env, "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}",
               "MLFLOW_BACKEND_STORE_URI": self.backend_store_uri,
               "MLFLOW_ARTIFACTS_DESTINATION": self.artifacts_destination}
        if self.admin_password is None:  # without start_server.sh: its default of no job runner, set here
            env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
            return [str(bindir / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port),
                    "--workers", "1"], env
        env.update(MLFLOW_AUTH_DATABASE_URI=self.auth_database_uri,
                   MLFLOW_AUTH_ADMIN_PASSWORD=self.admin_password, MLFLOW_HOST="127.0.0.1",
                   MLFLOW_PORT=str(self.port), MLFLOW_WORKERS="1",
                   SPOT_MLFLOW_RUNTIME_DIR=str(self.root / "runtime"))
        return ["bash", str(START_SCRIPT)], env

    def start(self, timeout_s: float = 120.0) -> MlflowServer:
        command, env = self._command()
        log = open(self.root / "server.log", "ab")  # noqa: SIM115 - owned by the process
        self.proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.root / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(f"MLflow server {self.url} did not answer in {timeout_s} s")

    def pids(self) -> list[int]:
        """Every process of the server's session (the CLI and its uvicorn / gunicorn workers)."""
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    if os.getsid(int(entry.name)) == self.proc.pid:
                        found.append(int(entry.name))
                except OSError:
                    pass
        return found

    def kill(self) -> None:
        """SIGKILL the whole server (no clean shutdown), and wait until the port is closed."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        deadline = time.monotonic() + 30
        while self.pids() and time.monotonic() < deadline:
            time.sleep(0.2)
