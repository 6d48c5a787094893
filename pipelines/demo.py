#!/usr/bin/env python
"""``make demo``: the whole pipeline on the built-in cluttered digits, on this machine's CPUs, in minutes.

1. cluttered-digits shards in ./data/cluttered-digits (made on first use): one real digit scan among
   fragments of other scans, so most tokens are background (``--source cluttered-digits-hard`` and
   ``cluttered-digits-hard-96``: the harder canvases of pipelines/data/hard_cluttered_digits.py, 64 and 96
   px, in ./data/<source>);
2. dense baseline: a small DeiT trained from scratch with 2 Ray Train workers (DDP over gloo);
3. SPOT at rho 0.7 (``--finetune-rho``: at each rate given): fine-tuned from the registered dense model,
   which is also its frozen teacher;
4. the class-attention model fine-tuned from the same dense model with the same recipe (``--selector
   cls_attn_avg``, as the paper's Table 7 did), at the same rates;
5. selectors compared (paper Table 7): random and class attention on the dense weights, the fine-tuned
   class-attention models and SPOT on their own, at rho 0.7 and 0.5 (fine-tuned at several rates: at each of
   them, with the models fine-tuned at it), with top-1, GMACs and images/s, plus the kept-token figures
   (Fig. 3); table and figures logged to MLflow;
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
    RUNS_DIR,
    RunConfig,
    add_field,
    make_builtin_data,
    resolve_config,
)
from pipelines.training.job import end_run
from pipelines.training.job import run as run_job
from pipelines.training.ray_session import start_local_ray
from pipelines.utils import signals
from pipelines.utils.cli import Parser, bad_input, failed
from pipelines.utils.errors import Interrupted, RayStartError, TrackingError, check

EXPERIMENT = "spot-demo"
WORKFLOW = "machine_learning"  # the MLflow UI's model-training view (its URL parameter workflowType)


class DemoInterrupted(KeyboardInterrupt):
    """The demo stopped by Ctrl-C, SIGTERM or SIGHUP after its parent run existed; ``marked``: the parent run
    and any run in progress were marked KILLED (False: MLflow could not record it)."""

    def __init__(self, marked: bool) -> None:
        super().__init__()
        self.marked = marked


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


RHOS = (0.7, 0.5)  # the table's keep rates
FINETUNE_RHOS = (0.7,)  # the keep rates SPOT and class attention are fine-tuned at, unless given


def open_parent(uri: str, name: str) -> MlflowRun:
    """The demo's parent run: the dense, SPOT, class-attention and comparison runs are its children."""
    store.check_reachable(uri)
    note = ("make demo: dense baseline, SPOT and the class-attention selector fine-tuned from it, and the "
            "token selectors compared (its child runs)")
    artifacts = store.local_artifact_root(uri, Path.cwd())
    return MlflowRun.create(uri, EXPERIMENT, name, artifact_location=artifacts, tags={MLFLOW_RUN_NOTE: note})


def train_models(
    options: dict, dense_config: RunConfig, stamp: str, parent: MlflowRun, rhos: tuple[float, ...]
) -> dict[str, list[tuple[RunConfig, dict]]]:
    """The dense baseline, then at each of ``rhos`` SPOT and class attention fine-tuned from it with the same
    epochs and learning rates, on one local Ray: role -> [(RunConfig, RESULT dict)], one per rho."""
    num_workers = dense_config.num_workers
    steps = 2 + 2 * len(rhos)
    runs = {"dense": [], "spot": [], "heuristic": []}
    try:
        start_local_ray(max(os.cpu_count() or 1, num_workers), verbose=dense_config.verbose)
        print(f"== 1/{steps} dense baseline: {dense_config.backbone} {dense_config.model_args}, "
              f"{dense_config.epochs} epochs, {num_workers} Ray Train workers", flush=True)
        dense = run_job(dense_config, parent=parent)
        runs["dense"].append((dense_config, dense))
        teacher = dense["registered_uri"]
        for i, rho in enumerate(rhos):
            tag = "" if len(rhos) == 1 else f"-rho{rho:g}"
            spot_options = {**options, "pretrained": teacher, "rho": rho}  # the source's fine-tuning recipe
            spot_config = resolve_config(spot_options | {"run_name": f"demo-spot{tag}-{stamp}"})
            print(f"== {2 + 2 * i}/{steps} SPOT rho {rho}: {spot_config.epochs} epochs from {teacher} "
                  "(its teacher)", flush=True)
            runs["spot"].append((spot_config, run_job(spot_config, parent=parent)))
            heuristic_config = resolve_config(
                spot_options | {"selector": "cls_attn_avg", "run_name": f"demo-cls-attn{tag}-{stamp}"}
            )
            print(f"== {3 + 2 * i}/{steps} class attention rho {rho}: the same {heuristic_config.epochs} "
                  f"epochs and learning rates from {teacher}", flush=True)
            runs["heuristic"].append((heuristic_config, run_job(heuristic_config, parent=parent)))
    finally:
        ray.shutdown()
    return runs


def compare_models(runs: dict[str, list[tuple[RunConfig, dict]]], stamp: str, parent: MlflowRun) -> dict:
    """The selectors on the registered models (:func:`train_models`), on the val split, logged as a child
    run of ``parent``: at :data:`RHOS` and the rate of the fine-tuned models, or, fine-tuned at several,
    at each of those with its own models; returns ``rows``, ``table``, ``figures``, ``evaluation_run_id``."""
    steps = 1 + sum(len(trained) for trained in runs.values())  # the training runs, then this
    print(f"== {steps}/{steps} selectors on the validation split", flush=True)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    [(dense_config, _)] = runs["dense"]

    def weights(role: str, config: RunConfig) -> str:
        if role == "dense":
            return f"dense ({dense_config.epochs} epochs)"
        name = {"spot": "SPOT", "heuristic": "class attention"}[role]
        return f"{name} rho {config.rho} ({dense_config.epochs} + {config.epochs} epochs)"

    loaded = {role: [(load_model(result["registered_uri"]), config, result["registered_uri"])
                     for config, result in trained] for role, trained in runs.items()}
    models = {role: [(model, weights(role, config)) for model, config, _ in entries]
              for role, entries in loaded.items()}
    trained_at = [config.rho for config, _ in runs["spot"]]
    rhos = sorted({*RHOS, *trained_at} if len(trained_at) == 1 else trained_at, reverse=True)
    [(dense, dense_weights)] = models["dense"]
    rows = compare.comparison_models(dense, rhos, dense_weights=dense_weights, spot_models=models["spot"],
                                     heuristic_models=models["heuristic"])
    data = dense_config.data
    results = compare.compare(rows, data, batch_size=64, throughput_batch=64, device=device)
    table = compare.format_comparison(results)
    figures = compare.mask_figures(rows, data, Path(RUNS_DIR) / f"demo-{stamp}-token-masks")
    uris = compare.model_roles({role: [(model, uri) for model, _, uri in entries]
                                for role, entries in loaded.items()})
    run_id = compare.log_comparison(results, table, figures, tracking_uri=dense_config.mlflow_uri,
                                    experiment=EXPERIMENT, data=data, models=uris, parent=parent)
    return {"rows": results, "table": table, "figures": figures, "evaluation_run_id": run_id}


def run_demo(
    num_workers: int | None = None, epochs: int | None = None, verbose: bool = False,
    source: str = DIGITS_SOURCE, seed: int | None = None, finetune_rhos: tuple[float, ...] = FINETUNE_RHOS,
) -> dict:
    """Dense baseline, SPOT and fine-tuned class attention from it at each of ``finetune_rhos``, the selector
    comparison, all children of one parent run; returns the training RESULT dicts by role (a list per role,
    one per rho), rows and table. ``num_workers`` and ``seed`` (the training runs'; the data set is fixed by
    the task): the run configuration's defaults when None."""
    options = {"experiment": EXPERIMENT, "verbose": verbose, "source": source}
    given = {"num_workers": num_workers, "seed": seed}
    options |= {key: value for key, value in given.items() if value is not None}
    move_credentials_to_env(None)  # a user:password@ in $MLFLOW_TRACKING_URI
    make_builtin_data(options)
    stamp = f"{datetime.now():%Y%m%d-%H%M%S}"
    dense_options = {**options, "dense": True, "run_name": f"demo-dense-{stamp}"}
    dense_config = resolve_config(dense_options | ({"epochs": epochs} if epochs else {}))
    store.quiet_mlflow(verbose)
    parent = None
    try:  # every way out ends the parent run
        with signals.deferred():  # created and kept as one step
            parent = open_parent(dense_config.mlflow_uri, f"demo-{stamp}")
        log_shard_inputs(parent.client, parent.run_id, dense_config.data, ("train", "val"))  # the runs table
        runs = train_models(options, dense_config, stamp, parent, finetune_rhos)
        comparison = compare_models(runs, stamp, parent)
        parent.end("FINISHED")
    except KeyboardInterrupt as err:  # Ctrl-C, SIGTERM, SIGHUP (a run in progress is KILLED by its job)
        if parent is None:
            raise
        with signals.shielded():
            marked = end_run(parent, "KILLED") and (not isinstance(err, Interrupted) or err.marked)
        raise DemoInterrupted(marked) from None
    except BaseException:
        if parent is not None:
            end_run(parent, "FAILED")
        raise
    return {
        **{role: [result for _, result in trained] for role, trained in runs.items()},
        **comparison,
        "parent_run_id": parent.run_id,
        "experiment_id": parent.info.experiment_id,
        "tracking_uri": dense_config.mlflow_uri,
    }


def build_parser() -> Parser:
    parser = Parser(prog="demo", description=__doc__.split("\n\n")[0])
    add_field(parser, RunConfig, "num_workers")
    parser.add_argument("--epochs", type=int, help="epochs of the dense run [default: the task's preset]")
    add_field(parser, RunConfig, "verbose")
    parser.add_argument("--source", default=DIGITS_SOURCE, choices=tuple(BUILTIN_TASKS),
                        help=f"the built-in task [default: {DIGITS_SOURCE}]")
    add_field(parser, RunConfig, "seed")
    parser.add_argument("--finetune-rho", type=float, nargs="+", default=list(FINETUNE_RHOS), metavar="RHO",
                        help="keep rates SPOT and class attention are each fine-tuned at; given several, the "
                        "table compares each with the models fine-tuned at it (paper Table 7) [default: "
                        f"{' '.join(map(str, FINETUNE_RHOS))}]")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    started = time.monotonic()
    try:
        for rho in args.finetune_rho:
            check(0 < rho < 1, f"--finetune-rho {rho}: must be in (0, 1) (a sparse model's keep rate)")
        compare.check_rates(args.finetune_rho, option="--finetune-rho")
        with signals.stop_signals():
            demo = run_demo(args.num_workers, args.epochs, bool(args.verbose), args.source, args.seed,
                            tuple(args.finetune_rho))
    except (ValueError, FileNotFoundError, TrackingError) as err:
        return bad_input("demo", err)
    except DemoInterrupted as err:
        state = ("its parent run and any run in progress marked KILLED" if err.marked else "its parent run "
                 "and any run in progress not all marked KILLED (MLflow could not record it)")
        print(f"demo: interrupted ({signals.name()}); {state}, the models registered before kept; "
              "nothing continues a demo: run it again", file=sys.stderr)
        return signals.exit_code()
    except KeyboardInterrupt:  # before its parent run existed
        print(f"demo: interrupted ({signals.name()}) before it started; nothing recorded", file=sys.stderr)
        return signals.exit_code()
    except RayStartError as err:
        return failed("demo", err)
    print(f"\n{demo['table']}\n")
    for label in ("dense", "spot", "heuristic"):
        for r in demo[label]:
            champion = " (champion)" if r["champion"] else ""
            print(f"registered {label}: {r['registered_uri']}{champion}, MLflow run {r['mlflow_run_id']}")
    print(f"comparison and kept-token figures: MLflow run {demo['evaluation_run_id']}; every run above is a "
          f"child of MLflow run {demo['parent_run_id']}")
    print(f"demo wall time {time.monotonic() - started:.0f} s")
    print("\n" + ui_hint(demo["tracking_uri"], demo["experiment_id"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
