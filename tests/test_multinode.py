"""The local multi-node rehearsal (infra/local_multinode.py): a Ray head plus two worker nodes on this
machine, the real pipelines/finetune.py with two workers STRICT_SPREAD over them, then teardown.

The integration test runs the rehearsal as a subprocess (3-4 minutes on 2 cores, longer when the machine
is busy) and re-checks its report; the unit tests check that the placement and teardown checks can fail.
"""

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.ray_faults import STOP_RAYLETS
from tests.scripts import load_script

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "infra" / "local_multinode.py"


lm = load_script(SCRIPT)

NODES = {"head": "h" * 56, "node_a": "a" * 56, "node_b": "b" * 56}


class FakeCluster:
    """What check_placement reads from a LocalRayCluster, with Train worker actors on given nodes."""

    worker_nodes = lm.WORKER_NODES
    node_ids = NODES

    def __init__(self, actor_nodes):
        self.actor_nodes = actor_nodes

    def list_state(self, resource, detail=False):
        assert resource == "actors"
        return [{"class_name": lm.TRAIN_WORKER_CLASS, "node_id": n} for n in self.actor_nodes] + [
            {"class_name": "TrainController", "node_id": NODES["head"]}
        ]


def test_placement_check_accepts_one_worker_per_worker_node():
    ids = [NODES["node_b"], NODES["node_a"]]
    report = lm.check_placement(FakeCluster(ids), {"worker_node_ids": ids})
    assert sorted(report["train_worker_actor_nodes"]) == sorted(ids)


@pytest.mark.parametrize(
    "reported, actors, match",
    [
        (["a" * 56, "a" * 56], ["a" * 56, "b" * 56], "expected one worker on each"),  # both on one node
        (["h" * 56, "a" * 56], ["h" * 56, "a" * 56], "expected one worker on each"),  # one on the head
        (["a" * 56], ["a" * 56], "expected one worker on each"),  # one worker only
        (["a" * 56, "b" * 56], ["a" * 56, "a" * 56], "state API"),  # finetune's report disagrees with Ray
        (None, ["a" * 56, "b" * 56], "no 'worker_node_ids'"),
    ],
)
def test_placement_check_rejects_wrong_placement(reported, actors, match):
    result = {} if reported is None else {"worker_node_ids": reported}
    with pytest.raises(lm.RehearsalError, match=match):
        lm.check_placement(FakeCluster(actors), result)


def test_result_json_is_the_last_marked_line():
    out = 'noise\nRESULT_JSON: {"a": 1}\nmore\nRESULT_JSON: {"a": 2, "worker_node_ids": []}\n'
    assert lm.parse_result_json(out) == {"a": 2, "worker_node_ids": []}
    with pytest.raises(lm.RehearsalError, match="no 'RESULT_JSON"):
        lm.parse_result_json("no result here")


def test_stop_sessions_stops_a_whole_session_and_only_it():
    """A session leader with a child that ignores SIGTERM: both end; this test process survives."""
    code = "import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); " + (
        "subprocess.Popen([sys.executable, '-c', 'import signal, time; "
        "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)']); time.sleep(600)"
    )
    leader = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    try:
        lm.wait_until("the child", lambda: len(lm.session_members(leader.pid)) == 2, 30, [])
        leftovers = lm.stop_sessions([leader.pid], grace_s=0.5)
        assert leftovers == [] and lm.session_members(leader.pid) == []
    finally:
        if leader.poll() is None:
            leader.kill()
        leader.wait()


@pytest.mark.integration
def test_a_node_whose_raylet_is_late_is_started_once_more():
    """Ray gives a new node a fixed time to register its raylet; the head's first raylet stopped (a machine
    too busy to run it in time), the rehearsal's cluster stops that node, says so in one line, starts it once
    more on new ports and comes up whole; its teardown leaves nothing, the stopped raylet included."""
    root = Path(tempfile.mkdtemp(prefix="spotmn-"))  # short: Ray's socket paths under it have a length limit
    script = STOP_RAYLETS + f"""
import importlib.util, os, sys
from pathlib import Path
spec = importlib.util.spec_from_file_location("local_multinode", {str(SCRIPT)!r})
lm = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = lm
spec.loader.exec_module(lm)
stopped = stop_raylets(os.getpid(), first_only=True)
cluster = lm.LocalRayCluster(Path({str(root)!r}))
try:
    cluster.start(timeout_s=240)
    print("nodes", sorted(cluster.node_ids))
finally:
    print("left", cluster.stop())
    sessions = [p.sid for p in cluster.procs]
print("stopped", len(stopped), "alive", [p for p in stopped if psutil.pid_exists(p)
                                         and psutil.Process(p).status() != psutil.STATUS_ZOMBIE])
print("sessions", sessions)
"""
    try:
        proc = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True,
                              timeout=600)
        first_try = root / "ray-head.1.log"
        first_try_log = first_try.read_text() if first_try.exists() else ""
    finally:
        shutil.rmtree(root, ignore_errors=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "nodes ['head', 'node_a', 'node_b']" in proc.stdout, proc.stdout
    assert "left []" in proc.stdout and "stopped 1 alive []" in proc.stdout, proc.stdout
    [line] = [ln for ln in proc.stdout.splitlines() if "starting it once more" in ln]
    assert line.endswith("head: Ray gave up waiting for its raylet (timed out during startup); "
                         "starting it once more"), line
    heads = [ln for ln in proc.stdout.splitlines() if "starting Ray head at" in ln]
    assert len(heads) == 2 and heads[0].split(" at ")[1] != heads[1].split(" at ")[1]  # new ports
    assert "timed out during startup" in first_try_log  # kept
    sessions = json.loads(proc.stdout.split("sessions ", 1)[1].splitlines()[0])
    assert len(sessions) == 3 and all(lm.session_members(sid) == [] for sid in sessions)


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    """Run `python infra/local_multinode.py` once; returns (exit code, output, report)."""
    report_path = tmp_path_factory.mktemp("rehearsal") / "report.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--report", str(report_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=840,  # within pytest's 900 s per test
    )
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    return done.returncode, done.stdout + done.stderr, report


@pytest.mark.integration
def test_rehearsal_runs_finetune_on_two_nodes_and_tears_down(rehearsal):
    returncode, output, report = rehearsal
    assert returncode == 0, output[-6000:]
    assert report["ok"], report
    placement = report["placement"]
    nodes = placement["nodes"]
    assert set(nodes) == {"head", *lm.WORKER_NODES} and len(set(nodes.values())) == 3
    workers = placement["worker_node_ids"]
    assert len(workers) == 2 and len(set(workers)) == 2, "the two workers must be on two different nodes"
    assert set(workers) == {nodes["node_a"], nodes["node_b"]} and nodes["head"] not in workers
    assert set(placement["train_worker_actor_nodes"]) == set(workers)
    # torn down: the script saw nothing left, and nothing of its sessions is alive now
    assert report["leftover_pids"] == []
    assert len(report["sessions"]) == 5  # finetune, 3 Ray nodes, the MLflow server
    assert all(lm.session_members(sid) == [] for sid in report["sessions"])
    assert not Path(report["root"]).exists(), "the rehearsal's temp dir is removed after a success"
    assert report["mlflow"]["run_id"]


@pytest.mark.integration
def test_rehearsal_mlflow_server_enforces_basic_auth(rehearsal):
    returncode, output, report = rehearsal
    assert returncode == 0, output[-3000:]
    # the dev extra installs mlflow[auth] (Flask-WTF); without it the rehearsal falls back to no auth
    assert report["mlflow"]["auth"] is True, "mlflow[auth] is not installed: pip install -e '.[dev]'"
    # check_mlflow got 401 anonymously and 200 with the password, or the rehearsal would have failed
