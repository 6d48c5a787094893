"""pipelines/training/ray_session.py: a local Ray as the commands start it, on a quiet console."""

import os
import subprocess
import sys
from pathlib import Path

from mlflow import MlflowClient

from tests.ray_faults import STOP_RAYLETS
from tests.scripts import ROOT
from tests.tiny import TINY_ARGS


def test_a_local_ray_starts_with_token_auth_and_no_warning_line(tmp_path):
    """A new local Ray with RAY_AUTH_MODE unset turns token auth on (Ray's default) and, without --verbose,
    prints no WARNING about it; its token goes to the (temporary) home directory. Its processes (raylet and
    the workers it starts) block SIGTERM and SIGHUP, a signal to the command's process group being the
    command's to handle; the driver, after the start, blocks neither."""
    script = (
        "import os, signal, psutil, ray\n"
        "from pipelines.training.ray_session import start_local_ray\n"
        "start_local_ray(1)\n"
        "print('auth mode', os.environ.get('RAY_AUTH_MODE'))\n"
        "print('task', ray.get(ray.remote(lambda: 7).remote()))\n"
        "def blocked(pid):\n"
        "    line = next(ln for ln in open(f'/proc/{pid}/status') if ln.startswith('SigBlk:'))\n"
        "    mask = int(line.split()[1], 16)\n"
        "    return sorted(s.name for s in (signal.SIGTERM, signal.SIGHUP) if mask >> (s - 1) & 1)\n"
        "raylet = next(p for p in psutil.Process().children(recursive=True) if p.name() == 'raylet')\n"
        "print('raylet blocks', blocked(raylet.pid))\n"
        "print('worker blocks', ray.get(ray.remote(lambda: blocked(os.getpid())).remote()))\n"
        "print('driver blocks', sorted(s.name for s in signal.pthread_sigmask(signal.SIG_BLOCK, [])))\n"
        "ray.shutdown()\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS", "RAY_AUTH_TOKEN")}
    env |= {"PYTHONPATH": str(ROOT), "HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "auth mode token" in proc.stdout and "task 7" in proc.stdout  # Ray enabled token auth itself
    assert (tmp_path / ".ray" / "auth_token").is_file()
    for process in ("raylet", "worker"):
        assert f"{process} blocks ['SIGHUP', 'SIGTERM']" in proc.stdout, proc.stdout
    assert "driver blocks []" in proc.stdout, proc.stdout
    output = proc.stdout + proc.stderr
    assert "WARNING" not in output and "ERROR" not in output, output[-2000:]



def _python(script: str, cwd: Path, timeout_s: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", script], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout_s)


def test_a_local_ray_whose_raylet_is_late_is_started_once_more_and_the_late_one_is_gone(tmp_path):
    """Ray gives a new local node a fixed time to register its raylet; when the first raylet cannot (stopped
    here), the start says so in one line, stops what the failed try left and starts again."""
    proc = _python(STOP_RAYLETS + """
import os, ray, psutil
from pipelines.training.ray_session import start_local_ray
stopped = stop_raylets(os.getpid(), first_only=True)
start_local_ray(1)
print("task", ray.get(ray.remote(lambda: 7).remote()))
print("stopped", len(stopped), "left", [p for p in stopped if psutil.pid_exists(p)])
ray.shutdown()
""", tmp_path, 300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "task 7" in proc.stdout and "stopped 1 left []" in proc.stdout, proc.stdout
    [line] = [ln for ln in proc.stderr.splitlines() if "did not start" in ln]
    assert line.startswith("the local Ray did not start (The current node timed out during startup")
    assert line.endswith("; starting it once more")


def test_finetune_whose_local_ray_cannot_start_says_so_in_one_line_and_leaves_nothing(digits_shards,
                                                                                      tmp_path):
    """Every raylet stopped: finetune exits 1 with one line after its second try, before any MLflow run,
    and none of the processes it started is left."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    argv = [str(ROOT / "pipelines" / "finetune.py"), "--data", str(digits_shards), "--mlflow-uri", uri,
            "--storage", str(tmp_path / "runs"), "--backbone", "deit_t", "--dense", *TINY_ARGS]
    proc = _python(STOP_RAYLETS + f"""
import subprocess, sys
driver = subprocess.Popen([sys.executable, *{argv!r}], stderr=subprocess.PIPE, text=True)
stopped = stop_raylets(driver.pid, first_only=False)
stderr = driver.communicate(timeout=400)[1]
left = [p for p in stopped if psutil.pid_exists(p)]
print("exit", driver.returncode, "stopped", len(stopped), "left", left)
sys.stderr.write(stderr)
""", tmp_path, 500)
    assert "exit 1 stopped 2 left []" in proc.stdout, proc.stdout + proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 2, lines
    assert lines[0].endswith("; starting it once more")
    assert lines[1].startswith("finetune: the local Ray did not start (The current node timed out")
    assert "--address" in lines[1]  # the way around a machine too busy for Ray's wait
    client = MlflowClient(uri)
    assert not client.search_runs([e.experiment_id for e in client.search_experiments()])  # nothing recorded
