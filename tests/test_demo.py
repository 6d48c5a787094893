"""pipelines/demo.py: its parent run ends in a true state whichever step stops it."""

import os
import subprocess
import sys

import pytest
from mlflow import MlflowClient

from tests.test_ray_session import ROOT, STOP_RAYLETS

pytestmark = pytest.mark.integration


def test_a_demo_whose_local_ray_cannot_start_ends_its_parent_run_failed_in_one_line(tmp_path):
    """The demo's parent run exists before Ray starts (it holds the data set): every raylet stopped, the demo
    says so in one line, exit 1, and its parent run is FAILED, not left RUNNING."""
    demo = ROOT / "pipelines" / "demo.py"
    script = STOP_RAYLETS + f"""
import subprocess, sys
driver = subprocess.Popen([sys.executable, {str(demo)!r}], stderr=subprocess.PIPE, text=True)
stopped = stop_raylets(driver.pid, first_only=False)
stderr = driver.communicate(timeout=600)[1]
print("exit", driver.returncode, "stopped", len(stopped))
sys.stderr.write(stderr)
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "token"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=700)
    assert "exit 1 stopped 2" in proc.stdout, proc.stdout + proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("demo: the local Ray did not start (")
    assert "Traceback" not in proc.stderr
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    [parent] = client.search_runs([client.get_experiment_by_name("spot-demo").experiment_id])
    assert parent.info.run_name.startswith("demo-") and parent.info.status == "FAILED"
    assert {d.dataset.name for d in parent.inputs.dataset_inputs} == {"cluttered-digits-train",
                                                                        "cluttered-digits-val"}


@pytest.mark.parametrize("rates, message", [
    (["1.0"], "--finetune-rho 1.0: must be in (0, 1) (a sparse model's keep rate)"),
    (["0.5", "0.5"], "--finetune-rho 0.5 0.5: each rate once"),
])
def test_a_bad_fine_tuning_rate_is_refused_before_anything_runs(rates, message, tmp_path, monkeypatch,
                                                                 capsys):
    from pipelines import demo

    monkeypatch.chdir(tmp_path)
    assert demo.main(["--finetune-rho", *rates]) == 2
    assert capsys.readouterr().err.strip() == f"demo: error: {message}"
    assert list(tmp_path.iterdir()) == []  # no data, no store, no run
