#!/usr/bin/env python
"""``make demo``: the whole pipeline on the built-in cluttered digits, on this machine's CPUs, in minutes.

1. cluttered-digits shards in ./data/cluttered-digits (made on first use): one real digit scan among
   fragments of other scans, so most tokens are background (``--source cluttered-digits-hard``: the harder
   canvases of pipelines/data/hard_cluttered_digits.py, in ./data/cluttered-digits-hard);
2. dense baseline: a small DeiT trained from scratch with 2 Ray Train workers (DDP over gloo);
3. SPOT at rho 0.7: fine-tuned from the registered dense model, which is also its frozen teacher;
4. the class-attention model fine-tuned from the same dense model with the same recipe (``--selector
   cls_attn_avg``, as the paper's Table 7 did);
5. selectors compared (paper Table 7): random and class attention on the dense weights, the fine-tuned
   class-attention model and SPOT on their own, at rho 0.7 and 0.5, with top-1, GMACs and images/s, plus
   the kept-token figures (Fig. 3); table and figures logged to MLflow;
6. the models registered in MLflow (./mlflow.db); how to open the MLflow UI is printed at the end.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from datetime import datetime
from pathlib import Path

if __package__ in (None, ""):  # run as a script from a checkout: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ray
import torch
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE

from pipelines.evaluation import compare
from pipelines.tracking import store
from pipelines.tracking.datasets import log_shard_inputs
from pipelines.tracking.mlflow_run import MlflowRun
from pipelines.tracking.registry import load_model
from pipelines.tracking.uri import move_credentials_to_env
from pipelines.training.config import (
    BUILTIN_TASKS,
    DIGITS_SOURCE,
    DIGITS_SPOT_FINETUNE,
    RUNS_DIR,
    RunConfig,
    make_builtin_data,
    resolve_config,
)
from pipelines.training.job import end_run
from pipelines.training.job import run as run_job
from pipelines.training.ray_session import start_local_ray
from pipelines.utils.cli import Parser, bad_input, failed
from pipelines.utils.errors import RayStartError, TrackingError

EXPERIMENT = "spot-demo"
WORKFLOW = "machine_learning"  # the MLflow UI's model-training view (its URL parameter workflowType)


def ui_hint(uri: str, experiment_id: str) -> str:
    """How to open ``uri``'s demo runs and registered models in the MLflow UI's model-training view
    (MLflow 3's UI opens on GenAI pages unless the URL's ``workflowType`` says so; docs/tracking.md)."""
    view = f"?workflowType={WORKFLOW}"
    if not uri.startswith("sqlite:///"):
        base = uri.rstrip("/")
        start = ""
    else:
        db = Path(uri.removeprefix("sqlite:///"))
        store_uri = "sqlite:///mlflow.db" if db.parent == Path.cwd() else uri
        mlflow_cli = Path(sys.executable).with_name("mlflow")
        with contextlib.suppress(ValueError):
            mlflow_cli = mlflow_cli.relative_to(Path.cwd())
        base = "http://127.0.0.1:5000"
        start = f"Start the MLflow UI:  {mlflow_cli} ui --backend-store-uri {store_uri}\n"
    return (
        f"{start}Runs (model-training view): {base}/#/experiments/{experiment_id}{view}\n"
        f"Registered models: {base}/#/models{view}  (the sidebar's \"Model registry\"; if the UI shows "
        "GenAI pages, switch \"GenAI | Model training\" at the top of the sidebar to \"Model training\")"
    )


RHOS = (0.7, 0.5)


def open_parent(uri: str, name: str) -> MlflowRun:
    """The demo's parent run: the dense, SPOT, class-attention and comparison runs are its children."""
    store.check_reachable(uri)
    note = ("make demo: dense baseline, SPOT and the class-attention selector fine-tuned from it, and the "
            "token selectors compared (its child runs)")
    artifacts = store.local_artifact_root(uri, Path.cwd())
    return MlflowRun.create(uri, EXPERIMENT, name, artifact_location=artifacts, tags={MLFLOW_RUN_NOTE: note})


def train_models(options: dict, dense_config: RunConfig, stamp: str, parent: MlflowRun) -> dict:
    """The dense baseline, then SPOT and class attention fine-tuned from it with the same epochs and learning
    rates, on one local Ray: role -> (RunConfig, RESULT dict)."""
    num_workers = dense_config.num_workers
    try:
        start_local_ray(max(os.cpu_count() or 1, num_workers), verbose=dense_config.verbose)
        print(f"== 1/4 dense baseline: {dense_config.backbone} {dense_config.model_args}, "
              f"{dense_config.epochs} epochs, {num_workers} Ray Train workers", flush=True)
        dense = run_job(dense_config, parent=parent)
        teacher = f"models:/{dense['registered_model']}/{dense['registered_version']}"
        spot_options = {**options, **DIGITS_SPOT_FINETUNE, "pretrained": teacher, "rho": RHOS[0]}
        spot_config = resolve_config(spot_options | {"run_name": f"demo-spot-{stamp}"})
        print(f"== 2/4 SPOT rho {spot_config.rho}: {spot_config.epochs} epochs from {teacher} (its teacher)",
              flush=True)
        sparse = run_job(spot_config, parent=parent)
        heuristic_config = resolve_config(
            spot_options | {"selector": "cls_attn_avg", "run_name": f"demo-cls-attn-{stamp}"}
        )
        print(f"== 3/4 class attention rho {heuristic_config.rho}: the same {heuristic_config.epochs} "
              f"epochs and learning rates from {teacher}", flush=True)
        heuristic = run_job(heuristic_config, parent=parent)
    finally:
        ray.shutdown()
    return {"dense": (dense_config, dense), "spot": (spot_config, sparse),
            "heuristic": (heuristic_config, heuristic)}


def compare_models(runs: dict, stamp: str, parent: MlflowRun) -> dict:
    """The selectors on the three registered models (:func:`train_models`), on the val split, logged as a
    child run of ``parent``: ``rows``, ``table``, ``figures``, ``evaluation_run_id``."""
    print("== 4/4 selectors on the validation split", flush=True)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    uris = {role: f"models:/{result['registered_model']}/{result['registered_version']}"
            for role, (_, result) in runs.items()}
    dense_config, spot_config, heuristic_config = (runs[role][0] for role in ("dense", "spot", "heuristic"))
    epochs = f"({dense_config.epochs} + {spot_config.epochs} epochs)"
    rows = compare.comparison_models(
        load_model(uris["dense"]),
        load_model(uris["spot"]),
        list(RHOS),
        dense_weights=f"dense ({dense_config.epochs} epochs)",
        spot_weights=f"SPOT rho {spot_config.rho} {epochs}",
        heuristic=load_model(uris["heuristic"]),
        heuristic_weights=f"class attention rho {heuristic_config.rho} {epochs}",
    )
    data = dense_config.data
    results = compare.compare(rows, data, batch_size=64, throughput_batch=64, device=device)
    table = compare.format_comparison(results)
    figures = compare.mask_figures(rows, data, Path(RUNS_DIR) / f"demo-{stamp}-token-masks")
    run_id = compare.log_comparison(results, table, figures, tracking_uri=dense_config.mlflow_uri,
                                    experiment=EXPERIMENT, data=data, models=uris, parent=parent)
    return {"rows": results, "table": table, "figures": figures, "evaluation_run_id": run_id}


def run_demo(
    num_workers: int = 2, epochs: int | None = None, verbose: bool = False, source: str = DIGITS_SOURCE,
    seed: int | None = None,
) -> dict:
    """Dense baseline, SPOT and fine-tuned class attention from it, the selector comparison, all children of
    one parent run; returns the three RESULT dicts, rows and table."""
    options = {"experiment": EXPERIMENT, "num_workers": num_workers, "verbose": verbose, "source": source}
    if seed is not None:
        options["seed"] = seed  # the three training runs' (the data set is fixed by the task)
    move_credentials_to_env(None)  # a user:password@ in $MLFLOW_TRACKING_URI
    make_builtin_data(options)
    stamp = f"{datetime.now():%Y%m%d-%H%M%S}"
    dense_options = {**options, "dense": True, "run_name": f"demo-dense-{stamp}"}
    dense_config = resolve_config(dense_options | ({"epochs": epochs} if epochs else {}))
    store.quiet_mlflow(verbose)
    parent = open_parent(dense_config.mlflow_uri, f"demo-{stamp}")
    try:  # every way out ends the parent run
        log_shard_inputs(parent.client, parent.run_id, dense_config.data, ("train", "val"))  # the runs table
        runs = train_models(options, dense_config, stamp, parent)
        comparison = compare_models(runs, stamp, parent)
    except KeyboardInterrupt:
        end_run(parent, "KILLED")
        raise
    except BaseException:
        end_run(parent, "FAILED")
        raise
    parent.end("FINISHED")
    return {
        **{role: result for role, (_, result) in runs.items()},
        **comparison,
        "parent_run_id": parent.run_id,
        "experiment_id": parent.info.experiment_id,
        "tracking_uri": dense_config.mlflow_uri,
    }


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-workers", type=int, default=2, help="Ray Train workers [default: 2]")
    parser.add_argument("--epochs", type=int, help="epochs of the dense run [default: the task's preset]")
    parser.add_argument("--verbose", action="store_true", help="show Ray's and MLflow's own log lines too")
    parser.add_argument("--source", default=DIGITS_SOURCE, choices=tuple(BUILTIN_TASKS),
                        help=f"the built-in task [default: {DIGITS_SOURCE}]")
    parser.add_argument("--seed", type=int, help="random seed of the training runs [default: 0]")
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        demo = run_demo(args.num_workers, args.epochs, args.verbose, args.source, args.seed)
    except (ValueError, FileNotFoundError, TrackingError) as err:
        return bad_input("demo", err)
    except RayStartError as err:
        return failed("demo", err)
    print(f"\n{demo['table']}\n")
    for label in ("dense", "spot", "heuristic"):
        r = demo[label]
        champion = " (champion)" if r["champion"] else ""
        print(f"registered {label}: models:/{r['registered_model']}/{r['registered_version']}{champion}, "
              f"MLflow run {r['mlflow_run_id']}")
    print(f"comparison and kept-token figures: MLflow run {demo['evaluation_run_id']}; every run above is a "
          f"child of MLflow run {demo['parent_run_id']}")
    print(f"demo wall time {time.monotonic() - started:.0f} s")
    print("\n" + ui_hint(demo["tracking_uri"], demo["experiment_id"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
