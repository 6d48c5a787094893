"""The autoscaling rehearsal (infra/autoscaling_rehearsal.py): a cold local cluster whose worker nodes,
started by Ray's autoscaler through the fake multi-node provider, join only after a boot delay.

It shows both sides of item 2 of issue 15. With Ray Train's worker-group start timeout too short for the
boot (2 s against a 60 s boot here; Ray's 60 s default against a p4d node's 10-15 minutes), the fine-tune
gives up on the timeout. With the timeout ray_cluster.yaml sets, a fine-tune and a 2-trial sweep started
while the node is still booting wait for it and finish.

Ray's own default was measured once against a 330 s boot (`python infra/autoscaling_rehearsal.py
--only-short --short-timeout 60 --boot-delay 330`): the fine-tune exited with code 1 after 281 s, after 4
WorkerGroupStartupTimeoutErrors (finetune allows 3 controller failures), with no worker node up yet.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.scripts import load_script

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "infra" / "autoscaling_rehearsal.py"


ar = load_script(SCRIPT)


def test_the_rehearsal_uses_the_cluster_configs_start_timeout():
    assert ar.lm.cluster_start_timeout() >= 15 * 60


def test_the_autoscaler_config_offers_the_jobs_resources_only_on_late_nodes(tmp_path):
    config = ar.autoscaling_config("127.0.0.1:1", 45.0, tmp_path, 2)
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}
    assert types[ar.WORKER_TYPE]["min_workers"] == 0 and types[ar.WORKER_TYPE]["resources"]["CPU"] >= 3.5
    assert config["provider"]["module"] == "autoscaling_rehearsal.SlowBootProvider"


@pytest.mark.integration
def test_cold_cluster_a_short_start_timeout_fails_and_the_clusters_one_waits(tmp_path):
    report_path = tmp_path / "report.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--report", str(report_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=840)
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    short = report["short_timeout"]
    assert short["exit_code"] != 0 and short["timed_out"]
    jobs = report["jobs"]
    # the second pair started after the short-timeout run had given up, and before the node joined
    assert jobs["first_worker_node_at_s"] > jobs["started_at_s"], "the node came after the jobs asked"
    assert jobs["sweep"]["result"]["completed"] == 2
    assert all(n != ar.FAKE_HEAD_ID for n in jobs["finetune"]["result"]["worker_node_ids"])
    assert report["leftover_pids"] == []
