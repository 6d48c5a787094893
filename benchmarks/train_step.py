#!/usr/bin/env python
"""Time of one fine-tuning step on one worker: SPOT (mask mode + frozen dense teacher) vs the dense backbone.

Both run the project's training step (``pipelines.training.worker.train_one_epoch`` over pre-made random
batches, so no data loading is timed): forward, loss, backward, AdamW step, scheduler step. SPOT adds the
relevance modules, the Gumbel masks with the policy attention and the teacher's forward. The two models run
in turns in this one process (dense, SPOT, dense, ...), so a change of load hits both. Reported: wall-clock
ms per step (median of the repeats), CPU-ms per step (process CPU time: meaningful when other jobs share the
machine), and the median of the per-repeat SPOT / dense ratios. ``--demo`` also times ``make demo``'s
script end to end in a scratch directory.

    python benchmarks/train_step.py                     # the demo's model (digits defaults), batch 32
    python benchmarks/train_step.py --preset hard-96    # the 96 px built-in task's model, batch 16
    python benchmarks/train_step.py --preset paper      # DeiT-S at 224, batch 8
    python benchmarks/train_step.py --demo              # also the demo's wall time
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from pipelines.data.shards import ensure_digits_shards
from pipelines.training.config import DIGITS_SOURCE, RunConfig, field_default, resolve_config, task_preset
from pipelines.training.recipe import build_optimizer, freeze_embeddings
from pipelines.training.weights import prepare_init
from pipelines.training.worker import build_models, train_one_epoch

DEMO = Path(__file__).resolve().parents[1] / "pipelines" / "demo.py"
DEMO_WORKERS = field_default("num_workers")  # the demo's Ray Train workers, each with its share of the batch


def builtin_recipes(source: str) -> tuple[dict, dict]:
    """The dense and the SPOT options of a built-in ``source``'s demo (its preset, then its fine-tuning
    recipe from --pretrained), the batch per worker."""
    presets = (task_preset(source, finetuning=tuning) for tuning in (False, True))
    return tuple(options | {"batch_size": options["batch_size"] // DEMO_WORKERS} for options in presets)


PAPER = {"backbone": "deit_s", "img_size": 224, "model_args": {}, "batch_size": 8}
PRESETS = {  # name -> (dense options, SPOT options)
    "demo": builtin_recipes(DIGITS_SOURCE),
    "hard-96": builtin_recipes("cluttered-digits-hard-96"),
    "paper": (PAPER, PAPER),
}


class Stepper:
    """``run_config``'s student (and teacher) with ``steps`` random CPU batches, ready to time one epoch
    of them at a time."""

    def __init__(self, run_config: RunConfig, *, steps: int, runs: int) -> None:
        init, self.summary = prepare_init(run_config)
        self.config = replace(run_config, epochs=runs)
        self.student, self.teacher = build_models(init, torch.device("cpu"))
        if run_config.pretrained:  # as a worker fine-tunes
            freeze_embeddings(self.student)
        self.epoch = 0
        side, classes, batch = self.config.img_size, self.config.num_classes, self.config.batch_size
        self.batches = [(torch.randn(batch, 3, side, side), torch.randint(0, classes, (batch,)))
                        for _ in range(steps)]
        self.optimizer, self.scheduler = build_optimizer(self.student, self.config, set(init["fresh"]),
                                                         steps_per_epoch=steps)
        self.scaler = torch.amp.GradScaler("cpu", enabled=False)

    def run(self) -> tuple[float, float]:
        """Wall and CPU milliseconds per step of one epoch over the batches."""
        cpu_start, wall_start = time.process_time(), time.perf_counter()
        train_one_epoch(self.student, self.teacher, self.batches, self.optimizer, self.scheduler, self.scaler,
                        None, self.config, torch.device("cpu"), epoch=self.epoch)
        self.epoch += 1
        wall, cpu = time.perf_counter() - wall_start, time.process_time() - cpu_start
        return wall * 1e3 / len(self.batches), cpu * 1e3 / len(self.batches)


def step_times(configs: dict[str, RunConfig], *, steps: int, repeats: int, warmup: int) -> dict:
    """Median wall and CPU milliseconds per training step of each of ``configs`` (random data, CPU), the
    models timed in turns; ``ratios``: each later config's wall time over the first's, per repeat."""
    steppers = {name: Stepper(config, steps=steps, runs=warmup + repeats) for name, config in configs.items()}
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in configs}
    for run in range(warmup + repeats):
        for name, stepper in steppers.items():
            measured = stepper.run()
            if run >= warmup:
                times[name].append(measured)
    results = {
        name: {
            "wall_ms_per_step": statistics.median(w for w, _ in times[name]),
            "cpu_ms_per_step": statistics.median(c for _, c in times[name]),
            "wall_ms_per_run": [round(w, 1) for w, _ in times[name]],
            "gmacs": steppers[name].summary.gmacs,
            "params": steppers[name].summary.params,
        }
        for name in configs
    }
    first, *others = configs
    results["ratios"] = {
        name: [round(w / d, 3) for (w, _), (d, _) in zip(times[name], times[first], strict=True)]
        for name in others
    }
    return results


def teacher_checkpoint(config: RunConfig, directory: Path) -> str:
    """A dense checkpoint of the architecture (random weights): SPOT then trains with a teacher, as in
    the demo, where the teacher is the trained dense model."""
    init, _ = prepare_init(replace(config, rho=None, pretrained=None))
    path = directory / "dense.pt"
    torch.save(init["student"], path)
    return str(path)


def time_demo(workdir: Path) -> float:
    """Seconds of ``python pipelines/demo.py`` in ``workdir`` (fresh data, MLflow store and Ray)."""
    start = time.perf_counter()
    subprocess.run([sys.executable, str(DEMO)], cwd=workdir, check=True)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="demo",
        help="demo: the demo's model (digits defaults); hard-96: the same model on the 96 px built-in task; "
        "paper: DeiT-S at 224 [default: demo]",
    )
    parser.add_argument("--batch-size", type=int, help="per-worker batch [default: the preset's]")
    parser.add_argument("--threads", type=int, default=1, help="torch threads [default: 1, as a demo worker]")
    parser.add_argument("--steps", type=int, default=10, help="steps per timed run [default: 10]")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs [default: 5]")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs first [default: 1]")
    parser.add_argument("--demo", action="store_true", help="also time pipelines/demo.py end to end")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results: dict = {"machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}"}
    with tempfile.TemporaryDirectory() as tmp:
        # random batches: the digits shards only give the class count, the preset gives the recipe
        common = {"num_workers": 1, "mixup": 0.0, "cutmix": 0.0,
                  "data": str(ensure_digits_shards(Path(tmp) / "digits")),
                  **({"batch_size": args.batch_size} if args.batch_size else {})}
        dense_options, spot_options = PRESETS[args.preset]
        dense = resolve_config({**dense_options, **common, "dense": True}, cwd=Path(tmp))
        teacher = teacher_checkpoint(dense, Path(tmp))
        sparse = resolve_config({**spot_options, **common, "pretrained": teacher}, cwd=Path(tmp))
        results |= step_times({"dense": dense, "spot": sparse}, steps=args.steps, repeats=args.repeats,
                              warmup=args.warmup)
        if args.demo:
            demo_dir = Path(tmp) / "demo"
            demo_dir.mkdir()
            results["demo_wall_s"] = round(time_demo(demo_dir), 1)
    ratio = statistics.median(results["ratios"]["spot"])
    print("| model | GMACs (prune mode) | ms/step (wall) | CPU-ms/step | ms/step per run |")
    print("| --- | ---: | ---: | ---: | --- |")
    for name in ("dense", "spot"):
        r = results[name]
        print(f"| {name} | {r['gmacs']:.4g} | {r['wall_ms_per_step']:.1f} | {r['cpu_ms_per_step']:.1f} | "
              f"{', '.join(map(str, r['wall_ms_per_run']))} |")
    print(f"SPOT / dense wall time per step: {ratio:.2f}x (median of the per-repeat ratios "
          f"{', '.join(f'{r:.2f}' for r in results['ratios']['spot'])})")
    if "demo_wall_s" in results:
        print(f"demo wall time: {results['demo_wall_s']:.0f} s")
    print("JSON: " + json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
