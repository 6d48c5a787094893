"""What blocking SIGTERM / SIGHUP in a local Ray's processes costs at ``ray.shutdown``.

    python benchmarks/ray_shutdown.py [--repeats 3]

``pipelines.training.ray_session.start_local_ray`` starts Ray's processes with both signals blocked, so a
signal to the command's process group reaches the command only; ``ray.shutdown`` then waits out its grace
period for each process before the SIGKILL. Each round starts a local Ray in a fresh process both ways
(``start_local_ray``, and the same ``ray.init`` without the mask), runs one task and times
``ray.shutdown``; the rounds alternate the two ways. Prints the median and range of each, and their
difference.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = """
import logging, sys, time, ray
from pipelines.training.ray_session import start_local_ray
if sys.argv[1] == "blocked":
    start_local_ray(1)
else:
    ray.init(num_cpus=1, include_dashboard=True, logging_level=logging.WARNING)
ray.get(ray.remote(lambda: 1).remote())
start = time.perf_counter()
ray.shutdown()
print(time.perf_counter() - start)
"""


def shutdown_seconds(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], cwd=ROOT, capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    return float(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    times: dict[str, list[float]] = {"blocked": [], "plain": []}
    for _ in range(args.repeats):
        for mode in times:
            times[mode].append(shutdown_seconds(mode))
    for mode, seconds in times.items():
        print(f"{mode}: ray.shutdown median {statistics.median(seconds):.2f} s "
              f"(range {min(seconds):.2f}-{max(seconds):.2f}, {len(seconds)} runs)")
    extra = statistics.median(times["blocked"]) - statistics.median(times["plain"])
    print(f"blocked - plain: {extra:+.2f} s per shutdown (medians)")


if __name__ == "__main__":
    main()
