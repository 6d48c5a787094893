#!/usr/bin/env python
"""Autoscaling rehearsal: a cold cluster whose worker nodes take a while to boot.

Starts a Ray head with no CPUs whose autoscaler uses Ray's fake multi-node provider (real local raylets on
127.0.0.1) with one worker node type, `gpu_8x_stand_in`, that starts only after a boot delay (the stand-in
for a p4d node's boot, image pull and setup). Then, on that cold cluster:

1. `pipelines/finetune.py` with a deliberately short worker-group start timeout
   (RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S; a small fraction of the boot delay, as Ray's 60 s default is of
   a p4d's 10-15 minutes): it must give up on that timeout (the defect of item 2 of issue 15);
2. right after, while the node it asked for is still booting, `pipelines/finetune.py` and a 2-trial
   `tuning/sweep_lambdas.py`, both with the start timeout that `ray_cluster.yaml` sets for every
   container: both must wait for the node and finish.

The worker type offers CPUs and the head none, so Train workers and trial drivers can only run on
autoscaled nodes, as GPU workers can only run on the GPU type of the real cluster. (Logical GPUs on a
machine without CUDA would make Ray Train choose NCCL and fail, so the stand-in asks for CPUs.)

Teardown stops only what this script started (process sessions, as infra/local_multinode.py does).

    python infra/autoscaling_rehearsal.py [--report r.json]     # exit code 0 = the rehearsal passed
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

from pipelines.utils.ports import free_ports

INFRA = Path(__file__).resolve().parent
REPO = INFRA.parent
sys.path.insert(0, str(INFRA))
import local_multinode as lm  # noqa: E402  (the process helpers of the other rehearsal)

WORKER_TYPE = "gpu_8x_stand_in"
FAKE_HEAD_ID = "fffffffffffffffffffffffffffffffffffffffffffffffffff00000"
RESULT_PREFIX = "RESULT_JSON:"





# ---------------------------------------------------------------------------------------------------------
# The node provider (imported by the autoscaler process on the head: PYTHONPATH holds this directory).


def _slow_boot_provider() -> type:
    """Ray's fake multi-node provider whose nodes join only `boot_delay_s` after the launch request, each
    as a raylet on 127.0.0.1 with its temp files under `temp_dir`."""
    from ray.autoscaler._private.fake_multi_node.node_provider import FakeMultiNodeProvider

    class SlowBootProvider(FakeMultiNodeProvider):
        def create_node_with_resources_and_labels(self, node_config, tags, count, resources, labels):
            # One boot delay per launch request, then all `count` nodes (Ray's fake provider would start
            # only one node per request unless `launch_multiple` is set).
            time.sleep(float(self.provider_config.get("boot_delay_s", 0)))
            for _ in range(count):
                self._create_node_with_resources_and_labels(node_config, tags, count, resources, labels)

        def _create_node_with_resources_and_labels(self, node_config, tags, count, resources, labels):
            import ray._private.node
            import ray._private.parameter
            from ray._private import ray_constants
            from ray.autoscaler.tags import (
                NODE_KIND_WORKER,
                STATUS_UP_TO_DATE,
                TAG_RAY_NODE_KIND,
                TAG_RAY_NODE_NAME,
                TAG_RAY_NODE_STATUS,
                TAG_RAY_USER_NODE_TYPE,
            )

            custom = dict(resources)
            cpus, gpus = custom.pop("CPU", 0), custom.pop("GPU", 0)
            store = custom.pop("object_store_memory", None)
            with self.lock:
                node_id = self._next_hex_node_id()
                node_type = tags[TAG_RAY_USER_NODE_TYPE]
                params = ray._private.parameter.RayParams(
                    gcs_address=self._gcs_address,
                    node_ip_address="127.0.0.1",
                    num_cpus=cpus,
                    num_gpus=gpus,
                    resources=custom,
                    labels=labels,
                    object_store_memory=store,
                    min_worker_port=0,
                    max_worker_port=0,
                    dashboard_agent_listen_port=0,
                    temp_dir=self.provider_config.get("temp_dir"),
                    env_vars={
                        "RAY_OVERRIDE_NODE_ID_FOR_TESTING": node_id,
                        "RAY_CLOUD_INSTANCE_ID": node_id,
                        "RAY_NODE_TYPE_NAME": node_type,
                        ray_constants.RESOURCES_ENVIRONMENT_VARIABLE: json.dumps(custom),
                        ray_constants.LABELS_ENVIRONMENT_VARIABLE: json.dumps(labels),
                    },
                )
                node = ray._private.node.Node(params, head=False, shutdown_at_exit=False, spawn_reaper=False)
                self._nodes[node_id] = {
                    "tags": {
                        TAG_RAY_NODE_KIND: NODE_KIND_WORKER,
                        TAG_RAY_USER_NODE_TYPE: node_type,
                        TAG_RAY_NODE_NAME: node_id,
                        TAG_RAY_NODE_STATUS: STATUS_UP_TO_DATE,
                        **tags,
                    },
                    "node": node,
                }

    return SlowBootProvider


def __getattr__(name: str):
    # Built on first access, so that importing this module does not import Ray: Ray reads the auth mode
    # from the environment once, and the rehearsal sets it only when it starts a cluster.
    if name == "SlowBootProvider":
        return _slow_boot_provider()
    raise AttributeError(name)


# ---------------------------------------------------------------------------------------------------------
# The cluster.


def autoscaling_config(gcs_address: str, boot_delay_s: float, temp_dir: Path, max_nodes: int) -> dict:
    """A complete autoscaler config (the autoscaler reads it as is, without `ray up`'s defaults)."""
    return {
        "cluster_name": "spot-autoscaling-rehearsal",
        "max_workers": max_nodes,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 5,
        "provider": {
            "type": "external",
            "module": "autoscaling_rehearsal.SlowBootProvider",
            "gcs_address": gcs_address,
            "head_node_id": FAKE_HEAD_ID,
            "boot_delay_s": boot_delay_s,
            "temp_dir": str(temp_dir),
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
        },
        "auth": {},
        "docker": {},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            # The GPU type's stand-in: what the jobs need exists only here (4 CPUs: the fine-tune's Train
            # worker, and two trials of the sweep, each a driver and a Train worker).
            WORKER_TYPE: {
                "resources": {"CPU": 4, "object_store_memory": 200 * 1024**2},
                "node_config": {},
                "min_workers": 0,
                "max_workers": max_nodes,
            },
        },
        "head_node_type": "ray.head.default",
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


class AutoscalingCluster:
    """A head with 0 CPUs and the fake provider's autoscaler; nodes appear on demand after a delay."""

    def __init__(self, root: Path, boot_delay_s: float, max_nodes: int = 2):
        self.root = root
        self.boot_delay_s = boot_delay_s
        self.max_nodes = max_nodes
        self.token = secrets.token_hex(32)
        # This process reads the GCS too (alive_worker_nodes); Ray reads the auth mode once, at first use.
        os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token)
        self.procs: list[lm.Proc] = []
        self.gcs_address = ""
        self.node_log: list[tuple[float, int]] = []  # (seconds since start, alive worker nodes) on change
        self._stop = threading.Event()

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in lm._SCRUBBED_ENV and k != lm.START_TIMEOUT_VAR}
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token, RAY_USAGE_STATS_ENABLED="0")
        if self.gcs_address:
            # Every process of this cluster (also Ray Train's helper actors, which look for "auto") must find
            # this cluster and not another local Ray instance on the machine.
            env["RAY_ADDRESS"] = self.gcs_address
        return env

    def start(self, timeout_s: float = 120.0) -> None:
        """Start the head (once more on new ports if Ray gave up on its raylet: lm.start_node)."""
        lm.start_node("head", self._start_head, self.procs, timeout_s)
        threading.Thread(target=self._watch_nodes, daemon=True).start()

    def _start_head(self) -> lm.Proc:
        gcs_port, client_port = free_ports(2)
        self.gcs_address = f"127.0.0.1:{gcs_port}"
        temp_dir = self.root / "ray"
        temp_dir.mkdir(parents=True, exist_ok=True)
        config_path = self.root / "autoscaler.yaml"
        config = autoscaling_config(self.gcs_address, self.boot_delay_s, temp_dir, self.max_nodes)
        config_path.write_text(yaml.safe_dump(config))
        env = {
            **self.env,
            "RAY_FAKE_CLUSTER": "1",
            "AUTOSCALER_UPDATE_INTERVAL_S": "1",
            "PYTHONPATH": os.pathsep.join([str(INFRA), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        }
        ray = str(Path(sys.executable).with_name("ray"))
        cmd = [
            ray, "start", "--head", "--block", "--disable-usage-stats", "--node-ip-address=127.0.0.1",
            f"--port={gcs_port}", f"--ray-client-server-port={client_port}", f"--temp-dir={temp_dir}",
            "--num-cpus=0", "--num-gpus=0", "--include-dashboard=false",
            "--object-store-memory=150000000", f"--autoscaling-config={config_path}",
        ]
        lm.log(f"starting the head at {self.gcs_address}: 0 CPUs, {WORKER_TYPE} nodes boot in "
               f"{self.boot_delay_s:.0f}s")
        head = lm.start_proc("ray-head", cmd, env, self.root)
        self.procs.append(head)
        return head

    def alive_worker_nodes(self) -> int:
        """Alive nodes other than the head, from the GCS."""
        from ray._raylet import GcsClient

        nodes = GcsClient(address=self.gcs_address).get_all_node_info(timeout=10)
        return sum(1 for n in nodes.values() if n.state == 0 and not n.is_head_node)

    def _watch_nodes(self) -> None:
        last = -1
        while not self._stop.is_set():
            try:
                alive = self.alive_worker_nodes()
            except Exception:  # the GCS is busy or going away: try again
                alive = last
            if alive != last:
                self.node_log.append((round(time.monotonic() - lm._T0, 1), alive))
                lm.log(f"alive worker nodes: {alive}")
                last = alive
            self._stop.wait(1.0)

    def stop(self) -> list[int]:
        self._stop.set()
        return lm.stop_procs(self.procs)


# ---------------------------------------------------------------------------------------------------------
# The jobs.

TINY = ["--model-arg", "depth=4", "--model-arg", "embed_dim=32", "--model-arg", "num_heads=2",
        "--model-arg", "patch_size=8"]


def job_cmd(kind: str, cluster: AutoscalingCluster, root: Path, name: str) -> list[str]:
    common = ["--address", cluster.gcs_address, "--num-workers", "1", "--cpus-per-worker", "1",
              "--gpus-per-worker", "0", "--img-size", "32", "--storage", str(root / "storage"),
              "--shared-storage",  # every node of the rehearsal is this machine; its autoscaler adds nodes
              "--mlflow-uri", f"sqlite:///{root / name / 'mlflow.db'}"]
    if kind == "finetune":
        return [sys.executable, str(REPO / "pipelines" / "finetune.py"), *common, "--epochs", "1",
                "--run-name", name, "--experiment", "autoscaling-rehearsal", "--max-failures", "0",
                "--vis-images", "2", *TINY]
    # The documented sweep command passes --max-concurrent: on a cold cluster there is nothing to count.
    return [sys.executable, str(REPO / "tuning" / "sweep_lambdas.py"), *common, "--epochs", "1",
            "--num-samples", "2", "--max-concurrent", "2", "--name", name, *TINY]


def start_job(
    kind: str, cluster: AutoscalingCluster, root: Path, name: str, start_timeout_s: float
) -> lm.Proc:
    workdir = root / name
    workdir.mkdir(parents=True, exist_ok=True)
    env = {**cluster.env, lm.START_TIMEOUT_VAR: f"{start_timeout_s:g}"}
    lm.log(f"{name}: {kind} with {lm.START_TIMEOUT_VAR}={start_timeout_s:g}")
    # cwd = its own directory: the built-in digits shards are made there, not in the checkout.
    proc = lm.start_proc(name, job_cmd(kind, cluster, root, name), env, root, cwd=workdir)
    proc.started = time.monotonic()
    return proc


def wait_job(proc: lm.Proc, timeout_s: float) -> tuple[int, float, str]:
    """(exit code, seconds since the job started, output) of a started job."""
    try:
        rc = proc.popen.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise lm.RehearsalError(
            f"{proc.name} did not finish in {timeout_s:.0f}s:\n{lm.tail(proc.log_path)}"
        ) from None
    return rc, time.monotonic() - proc.started, proc.log_path.read_text(errors="replace")


def result_json(name: str, output: str) -> dict:
    lines = [ln for ln in output.splitlines() if ln.startswith(RESULT_PREFIX)]
    if not lines:
        raise lm.RehearsalError(
            f"{name} printed no RESULT_JSON line:\n" + "\n".join(output.splitlines()[-40:])
        )
    return json.loads(lines[-1][len(RESULT_PREFIX) :])


def rehearse(args) -> dict:
    """Run the rehearsal; always tears down. Returns the report (raises RehearsalError on failure)."""
    root = Path(tempfile.mkdtemp(prefix="spotas-", dir=args.tmp_root))
    cluster = AutoscalingCluster(root, args.boot_delay, max_nodes=1)
    report: dict = {"root": str(root), "ok": False, "boot_delay_s": args.boot_delay}
    jobs: list[lm.Proc] = []
    started = time.monotonic()
    try:
        good_timeout = args.start_timeout if args.start_timeout is not None else lm.cluster_start_timeout()
        report["start_timeout_s"] = good_timeout
        cluster.start()
        if cluster.alive_worker_nodes() != 0:
            raise lm.RehearsalError("the cluster is not cold: worker nodes are alive before any demand")
        # (1) A fine-tune whose start timeout is too short for the boot delay must give up on its start
        # timeout (its demand makes the autoscaler launch the node). (2) As soon as it has, a fine-tune and a
        # sweep with the cluster's own start timeout start and must wait for that node and finish. The
        # node's delay runs from the first job's demand, so (2) starts while the node is still booting.
        short = None
        if args.short_timeout:
            short = start_job("finetune", cluster, root, "short-timeout", args.short_timeout)
            jobs.append(short)
            rc, seconds, output = wait_job(short, args.job_timeout)
            alive = cluster.alive_worker_nodes()
            report["short_timeout"] = {"start_timeout_s": args.short_timeout, "exit_code": rc,
                                       "seconds": round(seconds, 1), "alive_worker_nodes_at_exit": alive,
                                       "timed_out": "WorkerGroupStartupTimeoutError" in output}
            lm.log(f"short-timeout fine-tune: exit {rc} after {seconds:.0f}s, {alive} worker nodes alive")
            if rc == 0:
                raise lm.RehearsalError("the fine-tune with the short start timeout finished: the boot delay "
                                        "did not outlast it, so the rehearsal shows nothing")
            if not report["short_timeout"]["timed_out"]:
                last = "\n".join(output.splitlines()[-40:])
                raise lm.RehearsalError(f"the short-timeout fine-tune failed, not on the timeout:\n{last}")
        waiting_from = round(time.monotonic() - lm._T0, 1)
        good = []
        if not args.only_short:
            good = [start_job("finetune", cluster, root, "finetune", good_timeout),
                    start_job("sweep", cluster, root, "sweep", good_timeout)]
        jobs += good
        if args.only_short:
            report["ok"] = True
            return report
        results = {}
        for proc in good:
            rc, seconds, output = wait_job(proc, args.job_timeout)
            if rc != 0:
                raise lm.RehearsalError(
                    f"{proc.name} exited with code {rc}:\n" + "\n".join(output.splitlines()[-60:])
                )
            results[proc.name] = {"seconds": round(seconds, 1), "result": result_json(proc.name, output)}
            lm.log(f"{proc.name}: finished {seconds:.0f}s after its start")
        first_node = next((t for t, n in cluster.node_log if n > 0), None)
        report["jobs"] = {
            "started_at_s": waiting_from,
            "first_worker_node_at_s": first_node, "node_log": cluster.node_log,
            "finetune": results["finetune"], "sweep": results["sweep"],
        }
        sweep = results["sweep"]["result"]
        if sweep.get("completed") != sweep.get("trials") or sweep.get("trials") != 2:
            raise lm.RehearsalError(f"the sweep did not complete its 2 trials: {sweep}")
        first = report["jobs"]["first_worker_node_at_s"]
        if first is None or first <= waiting_from:
            raise lm.RehearsalError(f"no worker node joined after the jobs started: {cluster.node_log}")
        ft = results["finetune"]["result"]
        if FAKE_HEAD_ID in ft.get("worker_node_ids", [FAKE_HEAD_ID]):
            raise lm.RehearsalError(
                f"the fine-tune's Train worker ran on the head: {ft.get('worker_node_ids')}"
            )
        report["ok"] = True
        return report
    finally:
        report["sessions"] = [p.sid for p in jobs + cluster.procs]
        report["leftover_pids"] = lm.stop_procs(jobs) + cluster.stop()
        report["seconds"] = round(time.monotonic() - started, 1)
        if args.report:
            Path(args.report).write_text(json.dumps(report, indent=2))
        if report["ok"] and not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        else:
            lm.log(f"logs kept in {root}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--boot-delay", type=float, default=60.0, help="seconds before a worker node joins")
    p.add_argument("--short-timeout", type=float, default=2.0,
                   help=f"{lm.START_TIMEOUT_VAR} of the run that must fail (0: skip that run)")
    p.add_argument(
        "--start-timeout",
        type=float,
        default=None,
        help=f"{lm.START_TIMEOUT_VAR} of the runs that must finish [default: ray_cluster.yaml's]",
    )
    p.add_argument(
        "--only-short",
        action="store_true",
        help="run only the short-timeout fine-tune (to measure Ray's default: --short-timeout 60)",
    )
    p.add_argument("--job-timeout", type=float, default=600.0, help="seconds allowed for each job")
    p.add_argument("--report", help="write the JSON report here")
    p.add_argument("--tmp-root", default="/tmp", help="parent of the rehearsal's temp dir (keep it short)")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs) also after a success")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        report = rehearse(args)
    except lm.RehearsalError as e:
        lm.log(f"FAILED: {e}")
        return 1
    lm.log(f"PASSED in {report['seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
