#!/usr/bin/env python
"""``make demo``: the whole pipeline on the built-in cluttered digits, on this machine's CPUs, in minutes.

1. cluttered-digits shards in ./data/cluttered-digits (made on first use): one real digit scan among
   fragments of other scans, so most tokens are background;
2. dense baseline: a small DeiT trained from scratch with 2 Ray Train workers (DDP over gloo);
3. SPOT at rho 0.7: fine-tuned from the registered dense model, which is also its frozen teacher;
4. selectors compared on the same weights (paper Table 7): random and class attention on the dense
   weights, SPOT on its own, at rho 0.7 and 0.5, with top-1, GMACs and images/s, plus the kept-token
   figures (Fig. 3); table and figures logged to MLflow;
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

from pipelines.evaluation import compare
from pipelines.tracking.registry import load_model
from pipelines.training.config import DIGITS_SPOT_FINETUNE, RUNS_DIR, resolve_config
from pipelines.training.job import run as run_job
from pipelines.training.ray_session import start_local_ray
from pipelines.utils.errors import TrackingError, first_line

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


RHOS = (0.7, 0.5)


def run_demo(num_workers: int = 2, epochs: int | None = None) -> dict:
    """Dense baseline, SPOT from it, the selector comparison; returns both RESULT dicts, rows and table."""
    options = {"experiment": EXPERIMENT, "num_workers": num_workers}
    stamp = f"{datetime.now():%Y%m%d-%H%M%S}"
    dense_options = {**options, "dense": True, "run_name": f"demo-dense-{stamp}"}
    dense_config = resolve_config(dense_options | ({"epochs": epochs} if epochs else {}))
    start_local_ray(max(os.cpu_count() or 1, num_workers))
    try:
        print(
            f"== 1/3 dense baseline: {dense_config.backbone} {dense_config.model_args}, "
            f"{dense_config.epochs} epochs, {num_workers} Ray Train workers",
            flush=True,
        )
        dense = run_job(dense_config)
        teacher = f"models:/{dense['registered_model']}/{dense['registered_version']}"
        spot_options = {**options, **DIGITS_SPOT_FINETUNE, "pretrained": teacher, "rho": RHOS[0]}
        spot_config = resolve_config(spot_options | {"run_name": f"demo-spot-{stamp}"})
        print(
            f"== 2/3 SPOT rho {spot_config.rho}: {spot_config.epochs} epochs from {teacher} (its teacher)",
            flush=True,
        )
        sparse = run_job(spot_config)
    finally:
        ray.shutdown()
    print("== 3/3 selectors on the same weights, on the validation split", flush=True)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    dense_uri, spot_uri = (
        f"models:/{r['registered_model']}/{r['registered_version']}" for r in (dense, sparse)
    )
    rows = compare.comparison_models(
        load_model(dense_uri),
        load_model(spot_uri),
        list(RHOS),
        dense_weights=f"dense ({dense_config.epochs} epochs)",
        spot_weights=f"SPOT rho {spot_config.rho} ({dense_config.epochs} + {spot_config.epochs} epochs)",
    )
    data = dense_config.data
    results = compare.compare(rows, data, batch_size=64, throughput_batch=64, device=device)
    table = compare.format_comparison(results)
    figures = compare.mask_figures(rows, data, Path(RUNS_DIR) / f"demo-{stamp}-token-masks")
    run_id = compare.log_comparison(
        results, table, figures, tracking_uri=dense_config.mlflow_uri, experiment=EXPERIMENT, data=data
    )
    return {
        "dense": dense,
        "spot": sparse,
        "rows": results,
        "table": table,
        "figures": figures,
        "evaluation_run_id": run_id,
        "tracking_uri": dense_config.mlflow_uri,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-workers", type=int, default=2, help="Ray Train workers [default: 2]")
    parser.add_argument("--epochs", type=int, help="epochs of the dense run [default: the digits preset]")
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
              f"MLflow run {r['mlflow_run_id']}")
    print(f"comparison and kept-token figures: MLflow run {demo['evaluation_run_id']}")
    print(f"demo wall time {time.monotonic() - started:.0f} s")
    print("\n" + ui_hint(demo["tracking_uri"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
