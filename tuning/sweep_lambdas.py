#!/usr/bin/env python
"""Ray Tune sweep over SPOT's loss weights, learning rates and retention rate; each trial a Ray Train run.

    python tuning/sweep_lambdas.py                                  # built-in digits on the CPU, minutes
    python tuning/sweep_lambdas.py --gflops-budget 0.03 --rho 0.2:1  # best model within a budget
    python tuning/sweep_lambdas.py --data /data/imagenet-shards --backbone deit_s \\
        --pretrained deit_small_patch16_224.pth --epochs 30 --num-samples 32 --num-workers 8 \\
        --gpus-per-worker 1 --cpus-per-worker 10 --address auto --storage s3://bucket/sweeps \\
        --mlflow-uri http://head:5000
    python tuning/sweep_lambdas.py --resume ray_results/sweep-deit_t-20260101-120000

Each trial is a function that builds the fine-tuning job's ``TorchTrainer`` (:mod:`pipelines.finetune`)
for its sampled values, named ``train-<trial id>`` so that a retried trial resumes its Train run, and fits
it; every epoch's report reaches Tune (Optuna TPE searches, ASHA stops the weak trials early on validation
top-1) and the trial's MLflow run, a child of the sweep's run. After the sweep, the driver registers the
best feasible trial's best checkpoint (alias ``champion`` if it beats the current one), logs the results
table and the accuracy-vs-GFLOPs plot with the Pareto front to the sweep's run and prints the top trials.
The last line printed is ``RESULT_JSON: {...}``. Bad input exits with code 2 and one line on stderr, an
interrupted sweep (Ctrl-C) with 130 after printing how to resume it, a sweep without any result with 1.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import socket
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import mlflow
import yaml
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

import spot
from pipelines import finetune, tracking
from pipelines.errors import ConfigError, TrackingError, check, first_line
from tuning import pareto, space

EXPERIMENT = "spot-sweep"
METRIC = "objective"
TIME_ATTR = "epochs_done"
TRIAL_TAG = "sweep_trial_id"
STATUS_TAG = "trial_status"
TRIAL_RETRIES = 1  # a trial whose driver dies is restarted once (its Train run resumes)
DRIVER_CPUS = 0.25  # a trial driver only waits on its Train run
TOP = 10
API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"
SEARCHERS = ("tpe", "random")
# Without --data: a small sweep of the digits model that finishes in minutes on two CPU cores (a quarter
# epoch of warm-up: the digits fine-tuning default of one would be half of these short runs).
DIGITS_SWEEP = {"epochs": 2, "num_workers": 1, "warmup_epochs": 0.25}
# Options derived from searched ones: each trial re-derives them unless they were given.
DERIVED = ("rho", "predictor_lr", "lambda_rate", "lambda_kl", "lambda_token")
# Fine-tuning options of the sweep's command line (the rest via --finetune-config).
TRAIN_FLAGS: dict = {
    "data": str, "backbone": str, "pretrained": str, "epochs": int, "batch_size": int, "img_size": int,
    "num_workers": int, "gpus_per_worker": float, "cpus_per_worker": float, "seed": int, "register_as": str,
}  # fmt: skip
METAVARS = {
    "data": "DIR",
    "backbone": "NAME",
    "pretrained": "SOURCE",
    "img_size": "PX",
    "register_as": "NAME",
}
RESUME_OPTIONS = ("resume", "address")
RESULT_KEYS = ("trial_id", "status", "epochs", "val_acc1", "val_acc5", "best_epoch", "gflops", "feasible",
               "pareto", "best", *space.SEARCHABLE, "mlflow_run_id")  # fmt: skip


class SweepError(ConfigError):
    """An invalid sweep invocation; the message says which option and why."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sweep_lambdas",
        description="Ray Tune sweep of SPOT fine-tuning (loss weights, learning rates, rho) with MLflow.",
        epilog="examples:\n"
        + __doc__.split("\n\n")[1]
        + "\n\nsearch space: a YAML file (--space) of fine-tuning options, each a number (fixed) or\n"
        "{distribution: uniform|loguniform, low: L, high: H}; SPEC overrides one option: VALUE (fixed),\n"
        "LOW:HIGH (the file's distribution) or DISTRIBUTION:LOW:HIGH. Without --pretrained there is no\n"
        "teacher, so the file's lambda_kl and lambda_token are fixed at 0.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    group = parser.add_argument_group("search space")
    group.add_argument("--space", default=str(space.DEFAULT_SPACE), metavar="FILE.yaml",
                       help="search-space file [default: tuning/search_space.yaml]")  # fmt: skip
    described = {
        "lambda_rate": "l1, weight of the keep-rate loss", "lambda_kl": "l2, weight of the KL to the teacher",
        "lambda_token": "l3, weight of the token cosine loss", "lr": "backbone learning rate",
        "predictor_lr": "learning rate of the relevance modules", "rho": "token retention rate in (0, 1]",
    }  # fmt: skip
    for key, text in described.items():
        group.add_argument(space.flag(key), dest=key, metavar="SPEC", help=f"{text} [default: from --space]")
    group = parser.add_argument_group("search")
    group.add_argument("--num-samples", type=int, default=8, metavar="N", help="trials [default: 8]")
    group.add_argument(
        "--max-concurrent",
        type=int,
        metavar="N",
        help="trials at once [default: what the cluster fits: GPUs (CPUs without GPUs) / (workers x GPUs "
        "(CPUs) per worker)]",
    )
    group.add_argument(
        "--searcher",
        choices=SEARCHERS,
        default="tpe",
        help="Optuna TPE (random for its first 10 trials) or random search [default: tpe]",
    )
    group.add_argument(
        "--grace-period",
        type=int,
        metavar="EPOCHS",
        default=1,
        help="epochs every trial runs before ASHA may stop it [default: 1]",
    )
    group.add_argument(
        "--reduction-factor",
        type=float,
        metavar="F",
        default=2.0,
        help="ASHA keeps 1/F of the trials at each rung [default: 2]",
    )
    group.add_argument(
        "--gflops-budget",
        type=float,
        metavar="G",
        help="GFLOPs (GMACs) per image a model may cost: the rho range is clipped to fit and "
        "the best feasible trial is registered [default: none, search the trade-off]",
    )
    group.add_argument(
        "--budget-clip",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="clip the rho range to the budget; without, trials over it run but are "
        "infeasible (objective = accuracy - 1, never registered) [default: clip]",
    )
    group = parser.add_argument_group("each trial (fine-tuning options, see pipelines/finetune.py --help)")
    helps = {
        "data": "shard directory [default: the built-in digits shards in ./data/digits]",
        "backbone": f"backbone {{{','.join(spot.BACKBONES)}}} [default: deit_s; digits: deit_t]",
        "pretrained": "initial weights (file, models:/NAME@ALIAS, hub); enables the distillation losses",
        "epochs": "epochs per trial (ASHA's max) [default: the fine-tuning default; digits: 2]",
        "batch_size": "global batch size [default: the fine-tuning default]",
        "img_size": "image side [default: the fine-tuning default]",
        "num_workers": "Ray Train workers per trial [default: 2; digits: 1]",
        "gpus_per_worker": "GPUs per worker [default: 1 if the cluster has GPUs, else 0]",
        "cpus_per_worker": "CPUs per worker [default: 1]",
        "seed": "seed of the training runs and the searcher [default: 0]",
        "register_as": "registered model name [default: spot-<backbone>]",
    }
    for key, kind in TRAIN_FLAGS.items():
        group.add_argument(
            space.flag(key), dest=key, type=kind, metavar=METAVARS.get(key, "N"), help=helps[key]
        )
    group.add_argument("--model-arg", dest="model_args", action="append", metavar="KEY=VALUE",
                       help="backbone override, repeatable (e.g. depth=4)")  # fmt: skip
    group.add_argument("--finetune-config", metavar="FILE.yaml",
                       help="any other fine-tuning options (pipelines/finetune.py --config format); "
                       "the search space and the flags above win")  # fmt: skip
    group = parser.add_argument_group("where")
    group.add_argument("--address", metavar="ADDR", help="Ray cluster address [default: start a local Ray]")
    group.add_argument(
        "--storage",
        metavar="URI",
        help=f"sweep and Train run storage: local dir, s3://, gs://, NFS [default: ./{finetune.RUNS_DIR}]",
    )
    group.add_argument(
        "--name",
        metavar="NAME",
        help="sweep name = its directory in --storage [default: sweep-<backbone>-<time>]",
    )
    group.add_argument(
        "--experiment", default=EXPERIMENT, metavar="NAME", help=f"MLflow experiment [default: {EXPERIMENT}]"
    )
    group.add_argument(
        "--mlflow-uri",
        metavar="URI",
        help=f"MLflow tracking URI [default: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/{tracking.DB_FILE}]",
    )
    group.add_argument("--resume", metavar="PATH",
                       help="continue the interrupted sweep in PATH (<storage>/<name>) where it stopped; "
                       "takes no other option but --address")  # fmt: skip
    return parser


def _given(args: argparse.Namespace) -> dict:
    """Fine-tuning options given explicitly: --finetune-config's, overridden by the flags."""
    flags = {k: getattr(args, k) for k in (*TRAIN_FLAGS, "model_args")}
    given = finetune.given_values(argparse.Namespace(config=args.finetune_config, **flags))
    if given.get("data") is None:
        given = {**DIGITS_SWEEP, **given}
    return given


def trial_options(config: dict, given: dict, fixed: dict) -> dict:
    """Options of every trial: the driver's resolved ``config`` (data, digits defaults...) but for the
    options derived from searched values, which each trial re-derives unless given; then the fixed values."""
    options = {k: config[k] for k in finetune.DEFAULTS if k not in DERIVED}
    options.update({k: given[k] for k in DERIVED if k in given})
    return options | fixed


def default_max_concurrent(resources: dict, config: dict) -> int:
    """Trials the cluster runs at once; Tune counts only trial drivers, not their Train workers."""
    workers, gpus = config["num_workers"], resources.get("GPU", 0)
    per_worker = config["gpus_per_worker"] if config["gpus_per_worker"] is not None else (1 if gpus else 0)
    if per_worker:
        if not gpus:
            raise SweepError("the cluster shows no GPUs (yet: autoscaling?); pass --max-concurrent")
        return max(1, int(gpus // (workers * per_worker)))
    need = workers * config["cpus_per_worker"] + DRIVER_CPUS
    if need > resources.get("CPU", 0):
        raise SweepError(f"a trial needs {need:g} CPUs ({workers} workers x {config['cpus_per_worker']:g} + "
                         f"the driver); the cluster has {resources.get('CPU', 0):g}")  # fmt: skip
    return max(1, int(resources["CPU"] // need))


def train_name(trial_id: str) -> str:
    """The Ray Train run name of a trial (= resume key: a retried trial continues its run)."""
    return f"train-{trial_id}"


def trial_dirname(trial) -> str:
    """A trial's Tune directory: its id (the results table reads it back from the result's path)."""
    return trial.trial_id


def _find_child(client: MlflowClient, setup: dict, trial_id: str) -> str | None:
    """The id of the trial's MLflow run under the sweep's run, if it exists."""
    parent = setup["parent_run_id"]
    runs = client.search_runs(
        [setup["experiment_id"]],
        filter_string=f"tags.{TRIAL_TAG} = '{trial_id}' and tags.`mlflow.parentRunId` = '{parent}'",
    )
    return runs[0].info.run_id if runs else None


def child_run(setup: dict, trial_id: str, config: dict, summary: dict) -> str:
    """The trial's MLflow run under the sweep's run: created with its params, or reopened on a retry."""
    uri = setup["tracking_uri"]
    existing = _find_child(MlflowClient(uri), setup, trial_id)
    tags = {"mlflow.parentRunId": setup["parent_run_id"], TRIAL_TAG: trial_id, STATUS_TAG: "running"}
    run_id = tracking.start_run(uri, setup["experiment"], train_name(trial_id), artifact_location=None,
                                run_id=existing, tags=tags)  # fmt: skip
    if existing is None:
        tracking.log_params(uri, run_id, finetune.run_params(config, summary))
    return run_id


class TrialReport(TuneReportCallback):
    """Forwards each epoch's report to Tune with what the sweep needs (runs on the Train controller).

    Adds ``objective`` (validation top-1; minus 1 over the GFLOPs budget, so any infeasible trial ranks below
    every feasible one), ``feasible``, ``epochs_done`` (ASHA's time axis, survives restarts) and the trial's
    MLflow run id.
    """

    def __init__(self, budget: float | None, mlflow_run_id: str) -> None:
        super().__init__()
        self.budget = budget
        self.mlflow_run_id = mlflow_run_id

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        report = {k: v for k, v in metrics[0].items() if not isinstance(v, list)}  # node ids: not for Tune
        feasible = space.is_feasible(report["gflops"], self.budget)
        extra = {
            METRIC: report["val_acc1"] if feasible else report["val_acc1"] - 1.0,
            "feasible": feasible,
            TIME_ATTR: report["epoch"] + 1,
            "mlflow_run_id": self.mlflow_run_id,
        }
        super().after_report(run_context, [{**report, **extra}, *metrics[1:]], checkpoint)


def run_trial(params: dict, *, setup: dict) -> None:
    """One trial (a Tune function trainable): fine-tune with the sampled ``params`` on Ray Train.

    Nothing may follow ``fit()``: Tune kills the trial as soon as ASHA stops it or its last epoch is
    reported, so the sweep's driver does the bookkeeping.
    """
    os.environ.update(setup["env"])
    trial_id = tune.get_context().get_trial_id()
    name = train_name(trial_id)
    options = {**setup["options"], **params, "run_name": name, "storage": setup["train_storage"]}
    config = finetune.resolve_config(options)
    mlflow.set_tracking_uri(setup["tracking_uri"])  # --pretrained models:/...
    init, summary = finetune.prepare_init(config)
    run_id = child_run(setup, trial_id, config, summary)
    callbacks = [
        tracking.MlflowReportCallback(setup["tracking_uri"], run_id),
        TrialReport(setup["budget"], run_id),
    ]
    trainer = finetune.build_trainer(config, name=name, storage=setup["train_storage"], callbacks=callbacks,
                                     init=init)  # fmt: skip
    trainer.fit()


class TrialRuns(tune.Callback):
    """Closes each trial's MLflow run with its outcome and prints it (runs in the sweep's driver)."""

    def __init__(self, setup: dict) -> None:
        self.sweep = {k: setup[k] for k in ("tracking_uri", "experiment_id", "parent_run_id", "epochs")}

    def _close(self, trial, status: str, outcome: str, feasible) -> None:
        client = MlflowClient(self.sweep["tracking_uri"])
        run_id = _find_child(client, self.sweep, trial.trial_id)
        if run_id is None:  # failed before its run existed
            return
        tags = {STATUS_TAG: outcome} | ({} if feasible is None else {"feasible": feasible})
        tracking.set_tags(self.sweep["tracking_uri"], run_id, tags)
        tracking.end_run(self.sweep["tracking_uri"], run_id, status)

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        result = trial.last_result or {}
        done, epochs = result.get(TIME_ATTR, 0), self.sweep["epochs"]
        outcome = "completed" if done >= epochs else "stopped early"
        self._close(trial, "FINISHED" if done >= epochs else "KILLED", outcome, result.get("feasible"))
        over = "" if result.get("feasible", True) else ", over the GFLOPs budget"
        acc, gflops = result.get("val_acc1", math.nan), result.get("gflops", math.nan)
        print(f"trial {trial.trial_id}: {outcome} after {done}/{epochs} epochs, val top-1 {acc:.4f}, "
              f"{gflops:.4g} GFLOPs{over}", flush=True)  # fmt: skip

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self._close(trial, "FAILED", "error", (trial.last_result or {}).get("feasible"))
        print(f"trial {trial.trial_id}: failed, see {trial.error_file}", flush=True)


def _prepare_new(args: argparse.Namespace, cwd: Path) -> dict:
    """The plan of a new sweep, everything checked: ``setup`` (what trials and a later ``--resume`` need,
    JSON), ``config`` (the driver's resolved fine-tuning configuration), ``dims`` (the search space),
    ``notes`` (what the sweep decided for the user) and ``summary`` (the model's GFLOPs and size)."""
    overrides = {k: getattr(args, k) for k in space.SEARCHABLE if getattr(args, k) is not None}
    dims = space.load_space(args.space, overrides)
    check(args.num_samples >= 1, f"--num-samples {args.num_samples}: must be >= 1")
    check(args.max_concurrent is None or args.max_concurrent >= 1, "--max-concurrent must be >= 1")
    check(args.grace_period >= 1, f"--grace-period {args.grace_period}: must be >= 1")
    check(args.reduction_factor > 1, f"--reduction-factor {args.reduction_factor}: must be > 1")
    check(args.gflops_budget is None or args.gflops_budget > 0, "--gflops-budget must be > 0")
    given = _given(args)
    storage = args.storage or str(cwd / finetune.RUNS_DIR)
    config = finetune.resolve_config({**given, "storage": storage}, cwd=cwd)
    notes: list[str] = []
    if config["pretrained"] is None:
        dims, notes = space.without_teacher(dims)
    if args.gflops_budget is not None and args.budget_clip:
        rho_max = space.rho_limit(config, args.gflops_budget)
        dims = space.clip_rho(dims, rho_max, args.gflops_budget, finetune.DEFAULTS["rho"])
    _, fixed = space.split(dims, args.space)  # the Tuner samples the rest
    name = args.name or f"sweep-{config['backbone']}-{datetime.now():%Y%m%d-%H%M%S}"
    check(finetune.read_run_record(config["storage"], name) is None,
           f"sweep {name!r} already exists in {config['storage']}: pass --resume {config['storage']}/{name} "
           "or another --name")  # fmt: skip
    uri = tracking.resolve_tracking_uri(args.mlflow_uri, cwd)
    tracking.check_reachable(uri)
    mlflow.set_tracking_uri(uri)  # --pretrained models:/...
    _, summary = finetune.prepare_init(config)  # a --pretrained that does not fit fails here, not per trial
    setup = {
        "name": name,
        "storage": config["storage"],
        "train_storage": f"{config['storage']}/{name}/train_runs",
        "options": trial_options(config, given, fixed),
        "epochs": config["epochs"],
        "budget": args.gflops_budget,
        "num_samples": args.num_samples,
        "max_concurrent": args.max_concurrent,
        "searcher": args.searcher,
        "grace_period": min(args.grace_period, config["epochs"]),
        "reduction_factor": args.reduction_factor,
        "seed": config["seed"],
        "register_as": config["register_as"],
        "experiment": args.experiment,
        "tracking_uri": uri,
        "dense_gflops": summary["dense_gflops"],
    }
    return {"setup": setup, "config": config, "dims": dims, "notes": notes, "summary": summary}


def _prepare_resume(args: argparse.Namespace, cwd: Path) -> dict:
    """The plan of ``--resume PATH``: the sweep's recorded ``setup`` and its ``path``, checked."""
    path = args.resume.rstrip("/")
    storage, name = path.rsplit("/", 1) if "/" in path else (str(cwd), path)
    if "://" not in storage:
        storage = str(Path(storage).expanduser().resolve())
    record = finetune.read_run_record(storage, name)
    check(record is not None and "sweep" in record, f"--resume {args.resume}: not a sweep directory")
    setup = record["sweep"]
    tracking.check_reachable(setup["tracking_uri"])
    try:
        status = MlflowClient(setup["tracking_uri"]).get_run(setup["parent_run_id"]).info.status
    except MlflowException as err:
        raise SweepError(f"--resume {args.resume}: its MLflow run: {first_line(err)}") from None
    check(status != "FINISHED", f"--resume {args.resume}: the sweep has finished (MLflow run "
           f"{setup['parent_run_id']})")  # fmt: skip
    return {"setup": setup, "path": f"{storage}/{name}", "notes": []}


def prepare(args: argparse.Namespace, cwd: Path) -> dict:
    """Check everything that can be checked before Ray starts; the plan :func:`sweep` runs."""
    if args.resume:
        return _prepare_resume(args, cwd)
    return _prepare_new(args, cwd)


def _trainable(setup: dict):
    env = {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_")}  # credentials: never on disk
    return tune.with_resources(
        tune.with_parameters(run_trial, setup={**setup, "env": env}), {"CPU": DRIVER_CPUS}
    )


def _tuner(setup: dict, dims: dict):
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator
    from ray.tune.search.optuna import OptunaSearch

    searched, _ = space.split(dims, "search space")
    if setup["searcher"] == "tpe":
        searcher, limit = OptunaSearch(seed=setup["seed"]), setup["max_concurrent"]
    else:  # not a Searcher: Tune's max_concurrent_trials would not apply, it takes its own limit
        limit = None
        searcher = BasicVariantGenerator(random_state=setup["seed"], max_concurrent=setup["max_concurrent"])
    scheduler = ASHAScheduler(time_attr=TIME_ATTR, max_t=setup["epochs"], grace_period=setup["grace_period"],
                              reduction_factor=setup["reduction_factor"])  # fmt: skip
    return tune.Tuner(
        _trainable(setup),
        param_space=searched,
        tune_config=tune.TuneConfig(
            metric=METRIC,
            mode="max",
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=setup["num_samples"],
            max_concurrent_trials=limit,
            trial_dirname_creator=trial_dirname,
        ),  # fmt: skip
        run_config=tune.RunConfig(
            name=setup["name"],
            storage_path=setup["storage"],
            callbacks=[TrialRuns(setup)],
            failure_config=tune.FailureConfig(max_failures=TRIAL_RETRIES),
        ),  # fmt: skip
    )


def _start_parent(setup: dict, config: dict, dims: dict, summary: dict, cwd: Path) -> None:
    """Create the sweep's MLflow run (and experiment) on the driver, before any trial: no SQLite races."""
    uri = setup["tracking_uri"]
    run_id = tracking.start_run(uri, setup["experiment"], setup["name"],
                                artifact_location=tracking.local_artifact_root(uri, cwd))  # fmt: skip
    setup["parent_run_id"] = run_id
    setup["experiment_id"] = MlflowClient(uri).get_run(run_id).info.experiment_id
    searched = {f"space_{k}": d.describe() for k, d in dims.items()}
    sweep = {k: setup[k] for k in ("num_samples", "max_concurrent", "searcher", "grace_period",
                                   "reduction_factor", "budget")}  # fmt: skip
    fixed = {k: config[k] for k in finetune.TRAINING_KEYS if k not in dims}
    model = {"dense_gflops": round(summary["dense_gflops"], 6), "params": summary["params"]}
    tracking.log_params(uri, run_id, searched | sweep | fixed | model | tracking.versions())
    tracking.set_tags(
        uri, run_id, tracking.system_info() | {"storage": f"{setup['storage']}/{setup['name']}"}
    )
    entries = {k: d.low if d.fixed else {"distribution": d.distribution, "low": d.low, "high": d.high}
               for k, d in dims.items()}  # fmt: skip
    text = yaml.safe_dump(entries, sort_keys=False)
    mlflow.log_text(text, "search_space.yaml", run_id=run_id)


def _trial_row(result, setup: dict) -> dict:
    """One results-table row of a Tune result (the best epoch of the trial's history)."""
    row = {"trial_id": Path(result.path).name, **{k: setup["options"].get(k) for k in space.SEARCHABLE},
           **result.config}  # fmt: skip
    history = result.metrics_dataframe
    if history is None or "val_acc1" not in history or history["val_acc1"].isna().all():
        error = first_line(result.error) if result.error else ""
        return row | {"status": "error", "epochs": 0, "feasible": False, "val_acc1": math.nan,
                      "gflops": math.nan, "error": error}  # fmt: skip
    history = history.dropna(subset=["val_acc1"])  # only reports with a validation result
    best = history.sort_values(["val_acc1", "epoch"]).iloc[-1]
    done = int(history[TIME_ATTR].max())
    status = "error" if result.error else ("completed" if done >= setup["epochs"] else "stopped early")
    return row | {
        "status": status, "epochs": done, "best_epoch": int(best["epoch"]), "gflops": float(best["gflops"]),
        "val_acc1": float(best["val_acc1"]), "val_acc5": float(best["val_acc5"]),
        "feasible": bool(best["feasible"]), "mlflow_run_id": best["mlflow_run_id"],
    }  # fmt: skip


def _rank(row: dict) -> tuple:
    """Sort key, best last: feasible first, then validation top-1, then fewer GFLOPs."""
    if math.isnan(row["val_acc1"]):
        return (False, -math.inf, -math.inf)
    return (row["feasible"], row["val_acc1"], -row["gflops"])


def mark_rows(rows: list[dict]) -> list[dict]:
    """The result rows best first, each marked ``pareto`` (on the front of the completed trials) and
    ``best`` (the first row, if it is feasible and has a checkpoint: the one to register)."""
    rows = sorted(rows, key=_rank, reverse=True)
    contenders = [r for r in rows if r["status"] == pareto.FRONT_STATUS]
    front = pareto.pareto_front([r["gflops"] for r in contenders], [r["val_acc1"] for r in contenders])
    on_front = {contenders[i]["trial_id"] for i in front}
    for i, row in enumerate(rows):
        row["pareto"] = row["trial_id"] in on_front
        row["best"] = i == 0 and row["feasible"] and "mlflow_run_id" in row
    return rows


def results_table(grid, setup: dict) -> list[dict]:
    """Marked rows (:func:`mark_rows`) of all trials of a finished sweep."""
    return mark_rows([_trial_row(result, setup) for result in grid])


def _format(value) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4g}"
    return "" if value is None else str(value)


def markdown(rows: list[dict], keys: tuple[str, ...] = RESULT_KEYS) -> str:
    lines = ["| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)]
    return "\n".join(lines + ["| " + " | ".join(_format(r.get(k)) for k in keys) + " |" for r in rows]) + "\n"


def _csv(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=[*RESULT_KEYS, "error"], extrasaction="ignore")
    writer.writeheader()
    writer.writerows({k: _format(v) for k, v in row.items()} for row in rows)
    return out.getvalue()


def register_best(rows: list[dict], setup: dict) -> dict | None:
    """Register the best feasible trial's best checkpoint (reusing the fine-tuning job's registry code)."""
    from ray.train import Result

    from pipelines.registry import register_checkpoint

    best = next((r for r in rows if r["best"]), None)
    if best is None:
        return None
    train_run = Result.from_path(f"{setup['train_storage']}/{train_name(best['trial_id'])}")
    checkpoint, metrics = finetune.best_checkpoint(train_run)
    uri, run_id = setup["tracking_uri"], best["mlflow_run_id"]
    status = MlflowClient(uri).get_run(run_id).info.status
    with checkpoint.as_directory() as directory:
        registered = register_checkpoint(directory, run_id=run_id, name=setup["register_as"], metrics=metrics)
    tracking.end_run(uri, run_id, status)  # logging the model reopened the run
    return registered | {"trial_id": best["trial_id"], "checkpoint": checkpoint.path}


def summarize(grid, setup: dict, started: float) -> dict:
    """After the sweep: table, plot, registration, parent run closed; returns the RESULT_JSON dict."""
    uri, parent = setup["tracking_uri"], setup["parent_run_id"]
    rows = results_table(grid, setup)
    registered = register_best(rows, setup)
    with tempfile.TemporaryDirectory() as tmp:
        title = f"{setup['name']}: {len(rows)} trials" + (f", budget {setup['budget']:g} GFLOPs"
                                                          if setup["budget"] is not None else "")  # fmt: skip
        measured = [r for r in rows if not math.isnan(r["val_acc1"])]
        plot = pareto.plot_pareto(measured, Path(tmp) / "pareto.png", budget=setup["budget"],
                                  dense_gflops=setup["dense_gflops"], title=title)  # fmt: skip
        mlflow.log_artifact(str(plot), run_id=parent)
    mlflow.log_text(_csv(rows), "sweep_results.csv", run_id=parent)
    mlflow.log_text(markdown(rows), "sweep_results.md", run_id=parent)
    counts = {
        status: sum(r["status"] == status for r in rows) for status in ("completed", "stopped early", "error")
    }
    wall = round(time.monotonic() - started, 1)
    metrics = {"trials_completed": counts["completed"], "trials_stopped_early": counts["stopped early"],
               "trials_failed": counts["error"], "trials_infeasible": sum(not r["feasible"] for r in rows
                                                                          if r["status"] != "error"),
               "wall_time_s": wall}  # fmt: skip
    best = next((r for r in rows if r["best"]), None)
    if best is not None:
        metrics |= {"best_val_acc1": best["val_acc1"], "best_gflops": best["gflops"]}
    client = MlflowClient(uri)
    for key, value in metrics.items():
        client.log_metric(parent, key, value)
    if registered is not None:
        tags = {
            "best_trial": best["trial_id"],
            "registered_model": registered["name"],
            "registered_version": registered["version"],
            "champion": registered["champion"],
        }
        tracking.set_tags(uri, parent, tags)
    tracking.end_run(uri, parent, "FINISHED" if best is not None else "FAILED")
    print(
        f"\ntop {min(TOP, len(rows))} of {len(rows)} trials (objective: validation top-1"
        + (f" within {setup['budget']:g} GFLOPs" if setup["budget"] is not None else "")
        + "):"
    )
    print(markdown(rows[:TOP], ("trial_id", "status", "epochs", "val_acc1", "gflops", "feasible", "pareto",
                                *space.SEARCHABLE)), flush=True)  # fmt: skip
    return {
        "sweep": setup["name"],
        "path": f"{setup['storage']}/{setup['name']}",
        "trials": len(rows),
        **{k.replace(" ", "_"): v for k, v in counts.items()},
        "best_trial": None if best is None else best["trial_id"],
        "best_val_acc1": None if best is None else best["val_acc1"],
        "best_gflops": None if best is None else best["gflops"],
        "pareto_trials": [r["trial_id"] for r in rows if r["pareto"]],
        "registered_model": None if registered is None else registered["name"],
        "registered_version": None if registered is None else registered["version"],
        "champion": None if registered is None else registered["champion"],
        "mlflow_tracking_uri": uri,
        "mlflow_experiment": setup["experiment"],
        "mlflow_run_id": parent,
        "wall_time_s": wall,
    }


def _interrupted(grid, num_samples: int) -> bool:
    """Whether Tune stopped (Ctrl-C) before every trial ended, by the experiment state it saved for a resume
    (the result grid shows the trials after Tune's cleanup, which ends the running ones)."""
    trials = tune.ExperimentAnalysis(grid.experiment_path).trials
    return sum(t.status in ("TERMINATED", "ERROR") for t in trials) < num_samples


def _start_local_ray() -> None:
    """Start a local Ray whose processes reach its State API even when other Ray instances run on this host.

    Ray Train's placement-group cleaner asks the State API whether the controller of a trial that Tune
    stopped is gone; with several local instances it cannot tell which one to ask and gives up, so the
    stopped trial's workers keep their CPUs / GPUs and the next trial never starts. The local Ray's
    processes inherit the driver's environment: naming the dashboard's address there avoids that.
    """
    import ray

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ[API_SERVER_ENV] = f"http://127.0.0.1:{port}"
    ray.init(dashboard_port=port)


def sweep(plan: dict, address: str | None) -> dict | None:
    """Run a :func:`prepare` d sweep (or resume one); the RESULT_JSON dict, or None if it was interrupted.

    Raises :class:`SweepError` before any trial if the cluster cannot run one.
    """
    import ray

    started = time.monotonic()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    setup = plan["setup"]
    uri = setup["tracking_uri"]
    mlflow.set_tracking_uri(uri)
    local = address is None and not ray.is_initialized()
    if local:
        _start_local_ray()
    elif not ray.is_initialized():
        ray.init(address=address)
    try:
        if "path" in plan:
            tracking.start_run(uri, setup["experiment"], setup["name"], artifact_location=None,
                               run_id=setup["parent_run_id"])  # fmt: skip
            tuner = tune.Tuner.restore(plan["path"], _trainable(setup), resume_unfinished=True,
                                       resume_errored=True)  # fmt: skip
        else:
            config, dims = plan["config"], plan["dims"]
            setup["max_concurrent"] = setup["max_concurrent"] or default_max_concurrent(
                ray.cluster_resources(), config
            )
            _start_parent(setup, config, dims, plan["summary"], Path.cwd())
            finetune.write_run_record(setup["storage"], setup["name"], {"sweep": setup})
            tuner = _tuner(setup, dims)
            print(
                f"sweep {setup['name']}: {setup['num_samples']} trials, {setup['max_concurrent']} at a time, "
                f"{setup['epochs']} epochs each; searching "
                + ", ".join(f"{k} ~ {d.describe()}" for k, d in dims.items() if not d.fixed),
                flush=True,
            )
        resume = f"python tuning/sweep_lambdas.py --resume {setup['storage']}/{setup['name']}"
        try:
            grid = tuner.fit()
            if _interrupted(grid, setup["num_samples"]):
                tracking.end_run(uri, setup["parent_run_id"], "KILLED")
                print(f"sweep interrupted; continue it with: {resume}", file=sys.stderr, flush=True)
                return None
            return summarize(grid, setup, started)
        except Exception:
            tracking.end_run(uri, setup["parent_run_id"], "FAILED")
            print(
                f"sweep failed; finished trials are kept, continue it with: {resume}",
                file=sys.stderr,
                flush=True,
            )
            raise
    finally:
        if local:
            ray.shutdown()
            os.environ.pop(API_SERVER_ENV, None)


def _bad_input(err: BaseException) -> int:
    print(f"sweep_lambdas: error: {first_line(err)}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.resume:
            extra = [
                k for k, v in vars(args).items() if k not in RESUME_OPTIONS and v != parser.get_default(k)
            ]
            check(not extra, f"--resume continues a sweep as it was started; remove {', '.join(extra)}")
        plan = prepare(args, Path.cwd())
    except (ValueError, FileNotFoundError, TrackingError) as err:
        return _bad_input(err)
    for note in plan["notes"]:
        print(f"note: {note}", flush=True)
    try:
        result = sweep(plan, args.address)
    except SweepError as err:  # the cluster cannot run a trial
        return _bad_input(err)
    if result is None:
        return 130
    print("RESULT_JSON: " + json.dumps(result), flush=True)
    return 0 if result["best_trial"] is not None else 1


if __name__ == "__main__":
    from tuning.sweep_lambdas import main as _main  # trials and callbacks pickle by module, not __main__

    sys.exit(_main())
