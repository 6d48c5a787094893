#!/usr/bin/env python
"""Local multi-node rehearsal of the cluster path.

Starts, on this one machine, a Ray head and two Ray worker "nodes" (separate `ray start --block` processes
with their own temp dirs, ports and custom resources `node_a` / `node_b`), plus the cluster MLflow server
(`infra/mlflow/start_server.sh`, basic auth on, with SQLite and a local directory standing in for
PostgreSQL and S3; a plain `mlflow server` and a warning when `mlflow[auth]` is not installed). It then
runs the real `pipelines/finetune.py` against the cluster address with two Train workers placed
STRICT_SPREAD and checks, both from finetune's `RESULT_JSON` line and independently from Ray's state API,
that the two workers ran on the two different worker nodes, and that the MLflow run finished. Everything
is torn down at the end, also on failure or Ctrl-C.

Ray token authentication is on (`RAY_AUTH_MODE=token`, a fresh random `RAY_AUTH_TOKEN` per rehearsal,
passed by environment only; nothing is written to ~/.ray). Teardown stops only the processes this script
started (each was started in its own session and is stopped by session id), so other Ray instances on the
machine survive; a plain `ray stop --force` would kill every Ray process of the user.

    python infra/local_multinode.py                 # exit code 0 = the cluster path works
    python infra/local_multinode.py --report r.json  # also write what was checked as JSON
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import functools
import importlib.util
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pipelines.utils.ports import LOWEST as FREE_PORTS_FROM
from pipelines.utils.ports import free_ports

REPO = Path(__file__).resolve().parents[1]
FINETUNE = REPO / "pipelines" / "finetune.py"
MLFLOW_START = REPO / "infra" / "mlflow" / "start_server.sh"
WORKER_NODES = ("node_a", "node_b")
TRAIN_WORKER_CLASS = "RayTrainWorker"  # Ray Train V2's worker actor class
RESULT_PREFIX = "RESULT_JSON:"
# Environment that would point the child processes at some other Ray cluster or token.
_SCRUBBED_ENV = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN_PATH", "RAY_NAMESPACE")


# Ray gives a new node a fixed time to register its raylet and says this when it runs out (a busy machine):
# the node is started once more (pipelines/training/ray_session.py does the same for a local Ray)
SLOW_START = "timed out during startup"
START_ATTEMPTS = 2

# How long Ray Train waits for its workers' resources; the cluster configs set it in every container.
START_TIMEOUT_VAR = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"


class RehearsalError(RuntimeError):
    """A step of the rehearsal failed; the message says which and why."""


def cluster_start_timeout(config_path: Path = REPO / "ray_cluster.yaml") -> float:
    """The worker-group start timeout that a `ray up` cluster config sets in its containers."""
    options = " ".join(yaml.safe_load(config_path.read_text())["docker"]["run_options"])
    found = re.search(rf"--env {START_TIMEOUT_VAR}=(\d+(?:\.\d+)?)", options)
    if not found:
        raise RehearsalError(f"{config_path.name} sets no {START_TIMEOUT_VAR} in docker.run_options")
    return float(found.group(1))


_T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[rehearsal {time.monotonic() - _T0:5.0f}s] {msg}", flush=True)


def said(path: Path, words: str) -> bool:
    """Whether the log at `path` holds `words`."""
    try:
        return words in path.read_text(errors="replace")
    except OSError:
        return False


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "<no log>"


# ---------------------------------------------------------------------------------------------------------
# Processes: each one is started as the leader of a new session and stopped by that session id.


def session_members(sid: int) -> list[int]:
    """PIDs of the live processes whose session id is `sid` (Linux /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Fields after the ")" that closes the command name: state ppid pgrp session ...
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(entry.name))
    return pids


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log_path: Path

    @property
    def sid(self) -> int:
        return self.popen.pid  # start_new_session=True makes the child its own session leader


def start_proc(name: str, cmd: list[str], env: dict[str, str], log_dir: Path, cwd: Path = REPO) -> Proc:
    """Start cmd as the leader of a new session, output to <log_dir>/<name>.log."""
    log_path = log_dir / f"{name}.log"
    with open(log_path, "wb") as out:
        popen = subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    return Proc(name, popen, log_path)


def stop_sessions(sids: list[int], grace_s: float = 3.0) -> list[int]:
    """Stop every process of the given sessions: SIGTERM to the session leaders (a `ray start --block`
    shuts its node down), then SIGKILL to whatever is left after grace_s.

    Returns the PIDs still alive afterwards (empty when the teardown worked).
    """

    def wait_empty(timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and any(session_members(s) for s in sids):
            time.sleep(0.2)

    def kill(pids: list[int], sig: int) -> None:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    kill(sids, signal.SIGTERM)
    wait_empty(grace_s)
    kill([pid for sid in sids for pid in session_members(sid)], signal.SIGKILL)
    wait_empty(5.0)
    return [pid for sid in sids for pid in session_members(sid)]


def stop_procs(procs: list[Proc]) -> list[int]:
    """Stop the sessions of procs and reap the direct children; returns PIDs still alive."""
    leftovers = stop_sessions([p.sid for p in procs])
    for p in procs:
        try:
            p.popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            leftovers.append(p.popen.pid)
    return leftovers


# ---------------------------------------------------------------------------------------------------------
# HTTP helpers (all traffic goes to 127.0.0.1).


def http_get(
    url: str, headers: dict[str, str] | None = None, payload: dict | None = None, timeout: float = 10.0
) -> tuple[int, bytes]:
    """GET url (POST `payload` as JSON when given); returns (status, body) also for HTTP errors."""
    headers = dict(headers or {})
    data = None
    if payload is not None:
        data = json.dumps(payload).encode()
        headers["Content-Type"] = "application/json"
    req = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def wait_until(what: str, check, timeout_s: float, procs: list[Proc], interval_s: float = 1.0):
    """Poll check() until it returns a truthy value; fail early if one of procs exited."""
    deadline = time.monotonic() + timeout_s
    while True:
        for p in procs:
            if p.popen.poll() is not None:
                raise RehearsalError(
                    f"{p.name} exited with code {p.popen.returncode} while waiting for {what}; "
                    f"last lines of {p.log_path}:\n{tail(p.log_path)}"
                )
        try:
            value = check()
        except (OSError, ValueError):
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise RehearsalError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(interval_s)


# ---------------------------------------------------------------------------------------------------------
# The Ray cluster.


def start_node(name: str, start: Callable[[], Proc], procs: list[Proc], timeout_s: float) -> Proc:
    """Start a Ray node with `start()` (which appends its Proc to `procs`) and wait until it says "Ray runtime
    started". Ray gives a new node a fixed time to register its raylet; a node it gave up on (a machine too
    busy to run the raylet in time) is stopped and started once more (`start` draws new ports), its log kept
    as ray-<name>.<try>.log."""
    for attempt in range(1, START_ATTEMPTS + 1):
        proc = start()
        started = functools.partial(said, proc.log_path, "Ray runtime started")
        try:
            wait_until(f"the node {name}", started, timeout_s, [proc])
            return proc
        except RehearsalError:
            if attempt == START_ATTEMPTS or not said(proc.log_path, SLOW_START):
                raise
        left = stop_procs([proc])
        if left:
            raise RehearsalError(f"{name}: processes of its failed start outlived the stop: {left}")
        procs.remove(proc)
        proc.log_path.rename(proc.log_path.with_suffix(f".{attempt}.log"))
        log(f"{name}: Ray gave up waiting for its raylet ({SLOW_START}); starting it once more")
    raise AssertionError("unreachable")


@dataclass
class LocalRayCluster:
    """A head (0 CPUs, so Train workers cannot land on it) and one 1-CPU node per name in worker_nodes."""

    root: Path
    worker_nodes: tuple[str, ...] = WORKER_NODES
    worker_cpus: int = 1
    object_store_bytes: int = 150 * 1024**2
    token: str = field(default_factory=lambda: secrets.token_hex(32))
    # Each node's worker processes bind ports from its own block of 1000, below Linux's ephemeral range and
    # apart from Ray's default 10002-19999 (other local Ray instances), placed at random per rehearsal; the
    # three nodes' blocks end below 31000, where free_ports draws the other ports (pipelines/utils/ports.py).
    worker_port_base: int = field(default_factory=lambda: 20000 + 1000 * secrets.randbelow(9))
    procs: list[Proc] = field(default_factory=list)
    gcs_address: str = ""
    dashboard_url: str = ""
    node_ids: dict[str, str] = field(default_factory=dict)  # "head" / "node_a" / ... -> Ray node id
    # what each node's `ray start` has besides (the MLflow jobs credentials, as infra/aws/node_env.py gives a
    # real node): the Train controller and the trials read them there, they never travel through Ray
    node_env: dict[str, str] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        """Environment for every process that talks to this cluster."""
        env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED_ENV}
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token, RAY_USAGE_STATS_ENABLED="0")
        return env

    def _ray_start(self, name: str, role_args: list[str]) -> Proc:
        temp_dir = self.root / name
        temp_dir.mkdir(parents=True, exist_ok=True)
        ports = free_ports(6)
        workers_from = self.worker_port_base + 1000 * len(self.procs)
        if workers_from + 999 >= FREE_PORTS_FROM:
            raise RehearsalError(f"{name}: its worker ports {workers_from}-{workers_from + 999} would reach "
                                 f"the ports free_ports draws from ({FREE_PORTS_FROM})")
        ray = str(Path(sys.executable).with_name("ray"))
        cmd = [
            ray, "start", "--block", "--disable-usage-stats",
            "--node-ip-address=127.0.0.1",
            f"--temp-dir={temp_dir}",
            f"--object-store-memory={self.object_store_bytes}",
            f"--node-manager-port={ports[0]}",
            f"--object-manager-port={ports[1]}",
            f"--dashboard-agent-listen-port={ports[2]}",
            f"--dashboard-agent-grpc-port={ports[3]}",
            f"--runtime-env-agent-port={ports[4]}",
            f"--metrics-export-port={ports[5]}",
            f"--min-worker-port={workers_from}",
            f"--max-worker-port={workers_from + 999}",
            *role_args,
        ]
        proc = start_proc(f"ray-{name}", cmd, {**self.env, **self.node_env}, self.root)
        self.procs.append(proc)
        return proc

    def api(self, path: str) -> dict:
        """GET a Ray dashboard (state API) endpoint with the cluster token."""
        status, body = http_get(self.dashboard_url + path, {"Authorization": f"Bearer {self.token}"})
        if status != 200:
            raise RehearsalError(f"GET {path} -> HTTP {status}: {body[:300]!r}")
        return json.loads(body)

    def list_state(self, resource: str, detail: bool = False) -> list[dict]:
        query = "limit=10000" + ("&detail=1" if detail else "")
        return self.api(f"/api/v0/{resource}?{query}")["data"]["result"]["result"]

    def alive_nodes(self) -> list[dict]:
        return [n for n in self.list_state("nodes", detail=True) if n["state"] == "ALIVE"]

    def _start_node(self, name: str, role_args: Callable[[], list[str]], timeout_s: float) -> Proc:
        """`ray start` the node `name` (its arguments from `role_args()`, called per try): see start_node."""
        return start_node(name, lambda: self._ray_start(name, role_args()), self.procs, timeout_s)

    def _head_args(self) -> list[str]:
        """The head's `ray start` arguments, on ports free now (a second try takes new ones)."""
        gcs_port, dash_port, client_port = free_ports(3)
        self.gcs_address = f"127.0.0.1:{gcs_port}"
        self.dashboard_url = f"http://127.0.0.1:{dash_port}"
        log(f"starting Ray head at {self.gcs_address} (dashboard {self.dashboard_url}, token auth on)")
        return [
            "--head", f"--port={gcs_port}", "--num-cpus=0", "--num-gpus=0",
            "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}",
            f"--ray-client-server-port={client_port}",
        ]

    def start(self, timeout_s: float = 90.0) -> None:
        # Workers may join as soon as the head's processes are up (the dashboard comes a little later).
        self._start_node("head", self._head_args, timeout_s)
        for name in self.worker_nodes:
            log(f"starting worker node {name} ({self.worker_cpus} CPU, resource {name!r})")
            args = [f"--address={self.gcs_address}", f"--num-cpus={self.worker_cpus}", "--num-gpus=0",
                    f"--resources={json.dumps({name: 1})}"]
            self._start_node(name, lambda args=args: args, timeout_s)
        want = 1 + len(self.worker_nodes)

        def all_alive():
            nodes = self.alive_nodes()
            return nodes if len(nodes) == want else None

        nodes = wait_until(f"{want} alive nodes", all_alive, timeout_s, self.procs)
        for n in nodes:
            names = [k for k in self.worker_nodes if k in n["resources_total"]]
            self.node_ids["head" if n["is_head_node"] else names[0]] = n["node_id"]
        log(f"cluster up: {self.node_ids}")

    def stop(self) -> list[int]:
        return stop_procs(self.procs)


# ---------------------------------------------------------------------------------------------------------
# The MLflow server (the same start script as on the cluster head).


def basic_auth_available() -> bool:
    """MLflow's basic-auth app needs Flask-WTF, which only the `mlflow[auth]` extra installs."""
    return importlib.util.find_spec("flask_wtf") is not None


@dataclass
class LocalMlflowServer:
    """The tracking server on 127.0.0.1: infra/mlflow/start_server.sh (basic auth) when `auth`, else a plain
    `mlflow server` (used only when mlflow[auth] is not installed; the report says so)."""

    root: Path
    auth: bool = True
    username: str = "admin"
    password: str = field(default_factory=lambda: secrets.token_urlsafe(16))
    proc: Proc | None = None
    url: str = ""

    @property
    def client_env(self) -> dict[str, str]:
        if not self.auth:
            return {}
        return {"MLFLOW_TRACKING_USERNAME": self.username, "MLFLOW_TRACKING_PASSWORD": self.password}

    def start(self) -> None:
        (port,) = free_ports(1)
        self.url = f"http://127.0.0.1:{port}"
        backend, artifacts = f"sqlite:///{self.root / 'mlflow.db'}", str(self.root / "mlartifacts")
        bindir = Path(sys.executable).parent
        env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"}
        if self.auth:
            env.update(
                MLFLOW_BACKEND_STORE_URI=backend,
                MLFLOW_ARTIFACTS_DESTINATION=artifacts,
                MLFLOW_AUTH_DATABASE_URI=f"sqlite:///{self.root / 'mlflow_auth.db'}",
                MLFLOW_AUTH_ADMIN_USERNAME=self.username,
                MLFLOW_AUTH_ADMIN_PASSWORD=self.password,
                MLFLOW_HOST="127.0.0.1",
                MLFLOW_PORT=str(port),
                MLFLOW_WORKERS="1",
                SPOT_MLFLOW_RUNTIME_DIR=str(self.root / "mlflow-runtime"),
            )
            cmd = ["bash", str(MLFLOW_START)]
        else:
            cmd = [
                str(bindir / "mlflow"), "server", "--backend-store-uri", backend, "--artifacts-destination",
                artifacts, "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
            ]
        mode = "basic auth" if self.auth else "NO auth"
        log(f"starting MLflow server at {self.url} ({mode}, SQLite + local artifacts dir)")
        self.proc = start_proc("mlflow", cmd, env, self.root)

    def wait_ready(self, timeout_s: float = 90.0) -> None:
        assert self.proc is not None
        wait_until("MLflow /health", lambda: http_get(self.url + "/health")[0] == 200, timeout_s, [self.proc])

    def api(self, path: str, payload: dict | None = None, auth: bool = True) -> tuple[int, dict]:
        headers = {}
        if auth and self.auth:
            cred = base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
            headers["Authorization"] = f"Basic {cred}"
        status, body = http_get(self.url + path, headers, payload)
        try:
            return status, json.loads(body or b"{}")
        except ValueError:
            return status, {"raw": body[:300].decode(errors="replace")}

    def stop(self) -> list[int]:
        return stop_procs([self.proc] if self.proc else [])


# ---------------------------------------------------------------------------------------------------------
# The job and the checks.


def parse_result_json(output: str) -> dict:
    lines = [ln for ln in output.splitlines() if ln.startswith(RESULT_PREFIX)]
    if not lines:
        raise RehearsalError(f"finetune printed no '{RESULT_PREFIX} {{...}}' line")
    return json.loads(lines[-1][len(RESULT_PREFIX) :])


def run_finetune(
    cluster: LocalRayCluster, mlflow: LocalMlflowServer, args, run_name: str, started: list[Proc]
) -> dict:
    """Run pipelines/finetune.py against the cluster (its Proc is appended to `started` for the teardown);
    returns its RESULT_JSON."""
    if not FINETUNE.exists():
        raise RehearsalError(f"{FINETUNE.relative_to(REPO)} does not exist (yet)")
    cmd = [
        sys.executable, str(FINETUNE),
        "--address", cluster.gcs_address,
        "--num-workers", str(len(cluster.worker_nodes)),
        "--cpus-per-worker", str(cluster.worker_cpus),
        "--gpus-per-worker", "0",
        "--placement-strategy", "STRICT_SPREAD",
        "--storage", str(cluster.root / "storage"),
        "--mlflow-uri", mlflow.url,
        "--experiment", args.experiment,
        "--run-name", run_name,
        "--epochs", str(args.epochs),
        "--img-size", str(args.img_size),
        "--max-failures", "0",  # a rehearsal should fail at once, not retry
        *args.finetune_arg,
    ]
    log("running: " + " ".join(cmd))
    # cwd = the rehearsal's temp dir: the built-in digits shards are made there, not in the checkout.
    # as on the cluster it rehearses: Ray's 60 s default fails on a busy machine while workers start
    env = {**cluster.env, **mlflow.client_env, START_TIMEOUT_VAR: f"{cluster_start_timeout():g}"}
    proc = start_proc("finetune", cmd, env, cluster.root, cwd=cluster.root)
    started.append(proc)
    try:
        rc = proc.popen.wait(timeout=args.job_timeout)
    except subprocess.TimeoutExpired:
        raise RehearsalError(
            f"finetune did not finish in {args.job_timeout}s; last lines:\n{tail(proc.log_path)}"
        ) from None
    output = proc.log_path.read_text(errors="replace")
    if rc != 0:
        raise RehearsalError(f"finetune exited with code {rc}; last lines:\n{tail(proc.log_path, 60)}")
    return parse_result_json(output)


def check_placement(cluster: LocalRayCluster, result: dict) -> dict:
    """Two workers, two distinct nodes, and those are exactly the two worker nodes (not the head)."""
    expected = {cluster.node_ids[n] for n in cluster.worker_nodes}
    reported = result.get("worker_node_ids")
    if not isinstance(reported, list):
        raise RehearsalError(f"RESULT_JSON has no 'worker_node_ids' list: keys {sorted(result)}")
    if len(reported) != len(cluster.worker_nodes) or set(reported) != expected:
        raise RehearsalError(
            f"finetune reports worker nodes {reported}, expected one worker on each of {sorted(expected)} "
            f"(node ids: {cluster.node_ids})"
        )
    # Independent of what finetune reports: Ray's own record of the Train worker actors of this job.
    actors = [a for a in cluster.list_state("actors", detail=True) if a["class_name"] == TRAIN_WORKER_CLASS]
    actor_nodes = sorted({a["node_id"] for a in actors})
    if set(actor_nodes) != expected:
        raise RehearsalError(
            f"Ray state API: {TRAIN_WORKER_CLASS} actors ran on {actor_nodes}, expected {sorted(expected)}"
        )
    return {"worker_node_ids": reported, "train_worker_actor_nodes": actor_nodes, "nodes": cluster.node_ids}


def check_mlflow(mlflow: LocalMlflowServer, result: dict, run_name: str) -> dict:
    """The job's MLflow run exists on the server under its name and is FINISHED; with auth on, anonymous
    requests are refused with HTTP 401."""
    if mlflow.auth:
        status, _ = mlflow.api("/api/2.0/mlflow/experiments/search?max_results=10", auth=False)
        if status != 401:
            raise RehearsalError(f"MLflow answered an anonymous request with HTTP {status}, expected 401")
    run_id = result.get("mlflow_run_id")
    if not run_id:
        raise RehearsalError(f"RESULT_JSON has no 'mlflow_run_id': keys {sorted(result)}")
    status, body = mlflow.api(f"/api/2.0/mlflow/runs/get?run_id={run_id}")
    if status != 200:
        raise RehearsalError(f"MLflow run {run_id} not found on {mlflow.url} (HTTP {status}): {body}")
    info = body["run"]["info"]
    if info.get("run_name") != run_name or info.get("status") != "FINISHED":
        raise RehearsalError(
            f"MLflow run {run_id} is {info.get('run_name')!r} {info.get('status')}, "
            f"expected {run_name!r} FINISHED"
        )
    return {"auth": mlflow.auth, "run_id": run_id, "experiment_id": info["experiment_id"]}


def rehearse(args) -> dict:
    """Run the whole rehearsal; always tears down. Returns the report (raises RehearsalError on failure)."""
    root = Path(tempfile.mkdtemp(prefix="spotmn-", dir=args.tmp_root))
    mlflow = LocalMlflowServer(root, auth=basic_auth_available())
    cluster = LocalRayCluster(root, node_env=mlflow.client_env)
    if not mlflow.auth:
        log("WARNING: mlflow[auth] (Flask-WTF) is not installed: the MLflow server runs WITHOUT basic auth")
    report: dict = {"root": str(root), "ok": False}
    jobs: list[Proc] = []
    started = time.monotonic()
    try:
        mlflow.start()  # starts in the background while Ray comes up
        cluster.start(timeout_s=args.start_timeout)
        mlflow.wait_ready(timeout_s=args.start_timeout)
        run_name = f"rehearsal-{secrets.token_hex(4)}"
        result = run_finetune(cluster, mlflow, args, run_name, jobs)
        report["placement"] = check_placement(cluster, result)
        log(f"placement OK: {report['placement']['worker_node_ids']} on {cluster.node_ids}")
        report["mlflow"] = check_mlflow(mlflow, result, run_name)
        log(f"MLflow OK: run {report['mlflow']['run_id']} FINISHED (basic auth checked: {mlflow.auth})")
        report["ok"] = True
        return report
    finally:
        everything = jobs + cluster.procs + ([mlflow.proc] if mlflow.proc else [])
        report["sessions"] = [p.sid for p in everything]
        leftovers = stop_procs(jobs) + cluster.stop() + mlflow.stop()
        report["leftover_pids"] = leftovers
        report["seconds"] = round(time.monotonic() - started, 1)
        if args.report:
            Path(args.report).write_text(json.dumps(report, indent=2))
        if leftovers:
            log(f"WARNING: processes still alive after teardown: {leftovers}")
        else:
            log(f"torn down (all processes of sessions {report.get('sessions', [])} gone)")
        if report["ok"] and not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        else:
            log(f"logs kept in {root}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--experiment", default="multinode-rehearsal")
    p.add_argument("--job-timeout", type=float, default=420.0, help="seconds allowed for finetune")
    p.add_argument(
        "--start-timeout", type=float, default=180.0, help="seconds allowed for Ray / MLflow to come up"
    )
    p.add_argument(
        "--finetune-arg", action="append", default=[], help="extra argument for finetune.py (repeatable)"
    )
    p.add_argument("--report", help="write the JSON report here")
    p.add_argument("--tmp-root", default="/tmp", help="parent of the rehearsal's temp dir (keep it short)")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs) also after a success")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the teardown in `finally`
    try:
        rehearse(args)
    except RehearsalError as e:
        log(f"FAILED: {e}")
        return 1
    log("PASSED: two Train workers ran on two different Ray nodes of a token-authenticated cluster")
    return 0


if __name__ == "__main__":
    sys.exit(main())
