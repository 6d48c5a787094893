"""pipelines/training/ray_session.py: a local Ray as the commands start it, on a quiet console."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


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
