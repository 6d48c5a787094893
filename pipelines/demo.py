#!/usr/bin/env python
"""``make demo``: the whole pipeline on the built-in digits data, on this machine's CPUs, in minutes.

1. digits shards in ./data/digits (made on first use);
2. dense baseline: a small DeiT trained from scratch with 2 Ray Train workers (DDP over gloo);
3. SPOT: the same backbone with token sparsification, fine-tuned from the registered dense model, which is
   also its frozen teacher;
4. evaluation table of both (top-1 / top-5, GFLOPs, throughput), logged to MLflow;
5. both models registered in MLflow (./mlflow.db); how to open the MLflow UI is printed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from datetime import datetime
from pathlib import Path

import ray
import torch

from pipelines import evaluate
from pipelines.config import resolve_config
from pipelines.errors import TrackingError, first_line
from pipelines.job import run as run_job
from pipelines.ray_session import start_local_ray

EXPERIMENT = "spot-demo"


def ui_hint(uri: str) -> str:
    """How to look at ``uri``'s runs and models in the MLflow UI."""
    if not uri.startswith("sqlite:///"):
        return f"Open the MLflow UI at {uri} (experiment {EXPERIMENT!r}, Models tab)"
    db = Path(uri.removeprefix("sqlite:///"))
    store = "sqlite:///mlflow.db" if db.parent == Path.cwd() else uri
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    with contextlib.suppress(ValueError):
        mlflow_cli = mlflow_cli.relative_to(Path.cwd())
    return (
        f"Open the MLflow UI:  {mlflow_cli} ui --backend-store-uri {store}\n"
        f"then browse http://127.0.0.1:5000 (experiment {EXPERIMENT!r}; registered models in the Models tab)"
    )


def run_demo(num_workers: int = 2, epochs: int | None = None) -> dict:
    """Dense baseline, SPOT from it, evaluation of both; returns the two RESULT dicts, the rows, the table."""
    options = {"experiment": EXPERIMENT, "num_workers": num_workers} | ({"epochs": epochs} if epochs else {})
    stamp = f"{datetime.now():%Y%m%d-%H%M%S}"
    dense_config = resolve_config({**options, "dense": True, "run_name": f"demo-dense-{stamp}"})
    start_local_ray(max(os.cpu_count() or 1, num_workers))
    try:
        print(f"== 1/3 dense baseline: {dense_config.backbone} {dense_config.model_args}, "
              f"{dense_config.epochs} epochs, {num_workers} Ray Train workers", flush=True)  # fmt: skip
        dense = run_job(dense_config)
        teacher = f"models:/{dense['registered_model']}/{dense['registered_version']}"
        spot_config = resolve_config(
            {**options, "pretrained": teacher, "run_name": f"demo-spot-{stamp}"}
        )
        print(
            f"== 2/3 SPOT rho {spot_config.rho}: fine-tuned from {teacher}, its frozen teacher", flush=True
        )
        sparse = run_job(spot_config)
    finally:
        ray.shutdown()
    print("== 3/3 evaluation on the digits validation split", flush=True)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    rows = [
        evaluate.evaluate(f"models:/{r['registered_model']}/{r['registered_version']}", dense_config.data,
                          batch_size=64, throughput_batch=64, device=device, label=label)
        for label, r in (("SPOT", sparse), ("dense", dense))
    ]  # fmt: skip
    table = evaluate.format_table(rows)
    run_id = evaluate.log_to_mlflow(
        rows, table, tracking_uri=dense_config.mlflow_uri, experiment=EXPERIMENT, data=dense_config.data
    )
    return {"dense": dense, "spot": sparse, "rows": rows, "table": table, "evaluation_run_id": run_id,
            "tracking_uri": dense_config.mlflow_uri}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-workers", type=int, default=2, help="Ray Train workers [default: 2]")
    parser.add_argument("--epochs", type=int, help="epochs of each run [default: finetune's digits default]")
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        demo = run_demo(args.num_workers, args.epochs)
    except (ValueError, FileNotFoundError, TrackingError) as err:
        print(f"demo: error: {first_line(err)}", file=sys.stderr)
        return 2
    print(f"\n{demo['table']}\n")
    for label in ("dense", "spot"):
        r = demo[label]
        champion = " (champion)" if r["champion"] else ""
        print(f"registered {label}: models:/{r['registered_model']}/{r['registered_version']}{champion}, "
              f"MLflow run {r['mlflow_run_id']}")  # fmt: skip
    print(f"evaluation: MLflow run {demo['evaluation_run_id']}")
    print(f"demo wall time {time.monotonic() - started:.0f} s")
    print("\n" + ui_hint(demo["tracking_uri"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
