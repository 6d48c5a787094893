"""The sweep as a library: check everything before Ray starts (:func:`prepare`), then run or resume the
Tuner (:func:`sweep`): Optuna TPE (or random) proposes, ASHA stops weak trials, each trial a Ray Train run."""

from __future__ import annotations

import argparse
import contextlib
import logging
import shlex
import signal
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import fields, replace
from datetime import datetime
from pathlib import Path

import mlflow
import ray
import yaml
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator
from ray.tune.search.optuna import OptunaSearch

from pipelines.storage.location import RunLocation
from pipelines.storage.run_record import SWEEP_RECORD, read_record, write_record
from pipelines.tracking import store
from pipelines.tracking.datasets import log_shard_inputs
from pipelines.tracking.lineage import registered_version
from pipelines.tracking.mlflow_run import MlflowRun
from pipelines.tracking.registry import CHAMPION, DATA_TAGS, champion_metrics, data_tags, load_model
from pipelines.tracking.uri import resolve_tracking_uri
from pipelines.training.config import (
    DIGITS_SOURCE,
    RUNS_DIR,
    GivenOptions,
    RunConfig,
    check_name,
    given_values,
    make_builtin_data,
    resolve_config,
    training_keys,
)
from pipelines.training.job import end_run
from pipelines.training.ray_session import check_shared_storage, ray_session, worker_gpus
from pipelines.training.weights import prepare_init
from pipelines.utils import signals
from pipelines.utils.errors import ConfigError, Interrupted, check, first_line
from tuning import space
from tuning.options import TRAIN_FLAGS, builtin_sweep
from tuning.results import summarize
from tuning.trial import METRIC, TIME_ATTR, TrialRuns, close_interrupted, run_trial, trial_dirname

log = logging.getLogger(__name__)

TRIAL_RETRIES = 1  # a trial whose driver dies is restarted once (its Train run resumes)
DRIVER_CPUS = 0.25  # a trial driver only waits on its Train run
TUNE_LOGGER = "ray.tune.tune"  # where Tune logs its interrupt lines
TUNE_INTERRUPT_LINES = ("Stop signal received", "Experiment has been interrupted")
# Options derived from searched ones: each trial re-derives them unless they were given.
DERIVED = ("rho", "predictor_lr", "lambda_rate", "lambda_kl", "lambda_token")


class SweepError(ConfigError):
    """An invalid sweep invocation; the message says which option and why."""


def given_training_options(args: argparse.Namespace) -> GivenOptions:
    """Fine-tuning options given explicitly: --finetune-config's, overridden by the flags (without --data,
    the built-in source's sweep preset under them)."""
    flags = argparse.Namespace(**{k: getattr(args, k) for k in TRAIN_FLAGS})
    given = given_values(flags, args.finetune_config)
    if given.data is not None:
        return given
    return GivenOptions.from_mapping(builtin_sweep(given.source or DIGITS_SOURCE) | given.as_mapping())


def digits_teacher(given: GivenOptions, uri: str, cwd: Path, notes: list[str]) -> str | None:
    """The dense model a digits sweep fine-tunes (and distils) from: the champion that ``make demo`` or
    ``finetune.py --dense`` registered in ``uri``, if its architecture is the trials'; else None (trials
    train SPOT from scratch), with a note either way."""
    arch_keys = ("source", "backbone", "img_size", "model_args", "mean", "std")
    arch = {k: v for k, v in given.values.items() if k in arch_keys}
    dense = resolve_config({"dense": True, **arch}, cwd=cwd)
    teacher = f"models:/{dense.register_as}@{CHAMPION}"
    if champion_metrics(MlflowClient(uri), dense.register_as) is not None:
        found = load_model(teacher).spot_config
        wanted = {"img_size": dense.img_size, **dense.model_args}
        if all(found.get(k) == v for k, v in wanted.items()):
            notes.append(f"trials fine-tune SPOT from the dense digits model {teacher} (also their "
                         "teacher); --pretrained chooses another")
            return teacher
    notes.append(f"no dense {dense.backbone} digits model of this architecture registered in "
                 f"{uri} ({teacher}): trials train SPOT from scratch; `make demo` or "
                 "`python pipelines/finetune.py --dense` first registers one to fine-tune from")
    return None


def _data_set(tags: dict, path: str | None) -> str:
    """A data set as the registry records it: its path (where known), manifest digest, classes, image side."""
    if not any(tags.get(k) for k in DATA_TAGS):
        return "a data set it does not record (registered before data set tags)"
    where = f"{path} " if path else ""
    return (f"{where}(manifest {tags.get('data_digest')}, {tags.get('data_classes')} classes, "
            f"{tags.get('img_size')} px)")


def check_teacher_data(uri: str, config: RunConfig) -> None:
    """A registered teacher (``--pretrained models:/NAME@ALIAS`` or ``/VERSION``, the digits champion) must
    have been trained on the trials' data set: its version's data set tags
    (:func:`pipelines.tracking.registry.data_tags`) equal the trials'. Raises :class:`SweepError` naming
    both data sets."""
    client = MlflowClient(uri)
    version = registered_version(client, config.pretrained) if config.pretrained else None
    if version is None:
        return
    theirs = {k: version.tags.get(k) for k in DATA_TAGS}
    ours = data_tags(config.data, config.img_size)
    if theirs == ours:
        return
    trained_on = client.get_run(version.run_id).data.params.get("data") if version.run_id else None
    raise SweepError(f"--pretrained {config.pretrained}: the teacher was trained on "
                     f"{_data_set(theirs, trained_on)}, the trials train on {_data_set(ours, config.data)}; "
                     "a teacher must know the trials' data set (--pretrained a model trained on it)")


def trial_options(config: RunConfig, given: GivenOptions, fixed: dict) -> dict:
    """Options of every trial: the driver's resolved ``config`` (data, digits defaults...) but for the
    options derived from searched values, which each trial re-derives unless given; then the fixed values."""
    options = {f.name: getattr(config, f.name) for f in fields(RunConfig)
               if f.metadata["cli"] and f.name not in (*DERIVED, "resume")}
    options.update({k: v for k, v in given.values.items() if k in DERIVED})
    return options | fixed


def default_max_concurrent(resources: dict, config: RunConfig) -> int:
    """Trials the cluster runs at once; Tune counts only trial drivers, not their Train workers."""
    workers, gpus = config.num_workers, resources.get("GPU", 0)
    per_worker = config.gpus_per_worker if config.gpus_per_worker is not None else (1 if gpus else 0)
    if per_worker:
        if not gpus:
            raise SweepError("the cluster shows no GPUs (yet: autoscaling?); pass --max-concurrent")
        return max(1, int(gpus // (workers * per_worker)))
    need = workers * config.cpus_per_worker + DRIVER_CPUS
    if need > resources.get("CPU", 0):
        raise SweepError(f"a trial needs {need:g} CPUs ({workers} workers x {config.cpus_per_worker:g} + "
                         f"the driver); the cluster has {resources.get('CPU', 0):g}")
    return max(1, int(resources["CPU"] // need))


def _prepare_new(args: argparse.Namespace, cwd: Path) -> dict:
    """The plan of a new sweep, everything checked: ``setup`` (what trials and a later ``--resume`` need,
    JSON), ``config`` (the driver's resolved fine-tuning configuration), ``dims`` (the search space),
    ``notes`` (what the sweep decided for the user) and ``summary`` (the model's size and cost)."""
    overrides = {k: getattr(args, k) for k in space.SEARCHABLE if getattr(args, k) is not None}
    dims = space.load_space(args.space, overrides)
    check(args.num_samples >= 1, f"--num-samples {args.num_samples}: must be >= 1", SweepError)
    check(args.max_concurrent is None or args.max_concurrent >= 1, "--max-concurrent must be >= 1",
          SweepError)
    check(args.grace_period >= 1, f"--grace-period {args.grace_period}: must be >= 1", SweepError)
    check(args.reduction_factor > 1, f"--reduction-factor {args.reduction_factor}: must be > 1", SweepError)
    check(args.gmacs_budget is None or args.gmacs_budget > 0, "--gmacs-budget must be > 0", SweepError)
    given = given_training_options(args)
    storage = args.storage or str(cwd / RUNS_DIR)
    uri = resolve_tracking_uri(args.mlflow_uri, cwd)
    store.check_reachable(uri)
    mlflow.set_tracking_uri(uri)  # where --pretrained models:/... and the digits teacher are looked up
    notes: list[str] = []
    make_builtin_data(given, cwd)  # the built-in digits without --data: the trials' and the teacher's data
    if given.data is None and given.pretrained is None:
        given = given.with_options(pretrained=digits_teacher(given, uri, cwd, notes))
    config = resolve_config(given.with_options(storage=storage), cwd=cwd)
    check_teacher_data(uri, config)
    if config.pretrained is None:
        dims, fixed_notes = space.without_teacher(dims)
        notes += fixed_notes
    if args.gmacs_budget is not None and args.budget_clip:
        rho_max = space.rho_limit(config, args.gmacs_budget)
        dims = space.clip_rho(dims, rho_max, args.gmacs_budget, RunConfig.rho)
    _, fixed = space.split(dims, args.space)  # the Tuner samples the rest
    name = args.name or f"sweep-{config.backbone}-{datetime.now():%Y%m%d-%H%M%S}"
    check_name("--name", name)
    location = RunLocation(config.storage, name)
    check(read_record(location, SWEEP_RECORD) is None,
          f"sweep {location.name!r} already exists in {config.storage}: pass --resume {location.uri} or "
          "another --name", SweepError)
    _, summary = prepare_init(config)  # a --pretrained that does not fit fails here, not per trial
    setup = {
        "name": location.name,
        "storage": location.storage,
        "train_storage": location.file("train_runs"),
        "options": trial_options(config, given, fixed),
        "epochs": config.epochs,
        "budget": args.gmacs_budget,
        "num_samples": args.num_samples,
        "max_concurrent": args.max_concurrent,
        "searcher": args.searcher,
        "grace_period": min(args.grace_period, config.epochs),
        "reduction_factor": args.reduction_factor,
        "seed": config.seed,
        "register_as": config.register_as,
        "experiment": args.experiment,
        "tracking_uri": uri,
        "dense_gmacs": summary.dense_gmacs,
        "verbose": config.verbose,
    }
    return {"setup": setup, "config": config, "dims": dims, "notes": notes, "summary": summary}


def _prepare_resume(args: argparse.Namespace, cwd: Path) -> dict:
    """The plan of ``--resume PATH``: the sweep's recorded ``setup`` and its ``path``, checked."""
    path = args.resume.rstrip("/")
    location = RunLocation.from_uri(path) if "/" in path else RunLocation(str(cwd), path)
    if "://" not in location.storage:
        location = RunLocation(str(Path(location.storage).expanduser().resolve()), location.name)
    setup = read_record(location, SWEEP_RECORD)
    check(setup is not None, f"--resume {args.resume}: not a sweep directory", SweepError)
    store.check_reachable(setup["tracking_uri"])
    try:
        status = MlflowRun(setup["tracking_uri"], setup["parent_run_id"]).info.status
    except MlflowException as err:
        raise SweepError(f"--resume {args.resume}: its MLflow run: {first_line(err)}") from None
    check(status != "FINISHED", f"--resume {args.resume}: the sweep has finished (MLflow run "
          f"{setup['parent_run_id']})", SweepError)
    return {"setup": setup, "path": location.uri, "notes": []}


def prepare(args: argparse.Namespace, cwd: Path) -> dict:
    """Check everything that can be checked before Ray starts; the plan :func:`sweep` runs."""
    if args.resume:
        return _prepare_resume(args, cwd)
    return _prepare_new(args, cwd)


def _trainable(setup: dict):
    """The trial function with its resources; ``launch`` tells this start (or resume) of the sweep from
    another."""
    trial = tune.with_parameters(run_trial, setup={**setup, "launch": uuid.uuid4().hex})
    return tune.with_resources(trial, {"CPU": DRIVER_CPUS})


def _tuner(setup: dict, dims: dict) -> tune.Tuner:
    searched, _ = space.split(dims, "search space")
    if setup["searcher"] == "tpe":
        searcher, limit = OptunaSearch(seed=setup["seed"]), setup["max_concurrent"]
    else:  # not a Searcher: Tune's max_concurrent_trials would not apply, it takes its own limit
        limit = None
        searcher = BasicVariantGenerator(random_state=setup["seed"], max_concurrent=setup["max_concurrent"])
    scheduler = ASHAScheduler(time_attr=TIME_ATTR, max_t=setup["epochs"], grace_period=setup["grace_period"],
                              reduction_factor=setup["reduction_factor"])
    return tune.Tuner(
        _trainable(setup),
        param_space=searched,
        tune_config=tune.TuneConfig(metric=METRIC, mode="max", search_alg=searcher, scheduler=scheduler,
                                    num_samples=setup["num_samples"], max_concurrent_trials=limit,
                                    trial_dirname_creator=trial_dirname),
        run_config=tune.RunConfig(name=setup["name"], storage_path=setup["storage"],
                                  callbacks=[TrialRuns(setup)],
                                  failure_config=tune.FailureConfig(max_failures=TRIAL_RETRIES),
                                  verbose=2 if setup.get("verbose") else 0),
    )


def _start_parent(setup: dict, config: RunConfig, dims: dict, summary, cwd: Path) -> None:
    """Create the sweep's MLflow run (and experiment) on the driver, before any trial: no SQLite races."""
    uri = setup["tracking_uri"]
    parent = MlflowRun.create(uri, setup["experiment"], setup["name"],
                              artifact_location=store.local_artifact_root(uri, cwd))
    setup["parent_run_id"] = parent.run_id
    searched = {f"space_{k}": d.describe() for k, d in dims.items()}
    sweep = {k: setup[k] for k in ("num_samples", "max_concurrent", "searcher", "grace_period",
                                   "reduction_factor", "budget")}
    fixed = {k: getattr(config, k) for k in training_keys() if k not in dims}
    model = {"dense_gmacs": round(summary.dense_gmacs, 6), "params": summary.params}
    parent.log_params(searched | sweep | fixed | model | store.versions())
    log_shard_inputs(parent.client, parent.run_id, config.data, ("train", "val"))
    parent.set_tags(store.system_info() | {"storage": f"{setup['storage']}/{setup['name']}"})
    entries = {k: d.low if d.fixed else {"distribution": d.distribution, "low": d.low, "high": d.high}
               for k, d in dims.items()}
    parent.log_text(yaml.safe_dump(entries, sort_keys=False), "search_space.yaml")


def _interrupted(grid, num_samples: int) -> bool:
    """Whether Tune stopped (Ctrl-C) before every trial ended, by the experiment state it saved for a resume
    (the result grid shows the trials after Tune's cleanup, which ends the running ones)."""
    trials = tune.ExperimentAnalysis(grid.experiment_path).trials
    return sum(t.status in ("TERMINATED", "ERROR") for t in trials) < num_samples


class SweepInterrupted(Interrupted):
    """A sweep stopped by Ctrl-C, SIGTERM or SIGHUP: its MLflow run and ``trials`` in-flight trial runs are
    KILLED (``marked`` False: MLflow could not record it for all of them; ``trials`` None: not known); the
    message is the command that continues it."""

    def __init__(self, command: str, trials: int | None, marked: bool = True) -> None:
        super().__init__(command, marked=marked)
        self.trials = trials


def stopped_sweep(parent: MlflowRun, setup: dict, command: str) -> SweepInterrupted:
    """A sweep stopped by a signal: the runs of its in-flight trials and its own run marked KILLED (as far as
    MLflow can record it), and the :class:`SweepInterrupted` to raise, with ``command`` that continues it."""
    with signals.shielded():  # a second Ctrl-C while MLflow is slow must not cut the marking short
        try:
            trials = close_interrupted(setup)
        except MlflowException as err:
            log.warning("the running trials' MLflow runs could not be marked KILLED (%s); they show RUNNING "
                        "until a --resume", first_line(err))
            trials = None
        marked = end_run(parent, "KILLED")
    return SweepInterrupted(command, trials, marked=marked and trials is not None)


class _WithoutTuneHint(logging.Filter):
    """Drops Ray Tune's own interrupt lines (its ``Tuner.restore(...)`` hint): the sweep prints the one
    command that continues it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(TUNE_INTERRUPT_LINES)


@contextlib.contextmanager
def _tune_signals() -> Iterator[None]:
    """Tune's SIGINT handler (installed by ``fit`` and left behind) replaced by the one before once ``fit``
    returns; its interrupt lines filtered out of its logger meanwhile."""
    handler, hint = signal.getsignal(signal.SIGINT), _WithoutTuneHint()
    tune_logger = logging.getLogger(TUNE_LOGGER)
    tune_logger.addFilter(hint)
    try:
        yield
    finally:
        tune_logger.removeFilter(hint)
        signal.signal(signal.SIGINT, handler)


def resume_command(setup: dict, address: str | None) -> str:
    """The command that continues the sweep (on the same cluster)."""
    args = ["--resume", f"{setup['storage']}/{setup['name']}", *(["--address", address] if address else [])]
    return "python tuning/sweep_lambdas.py " + " ".join(shlex.quote(a) for a in args)


def sweep(plan: dict, address: str | None) -> dict:
    """Run a :func:`prepare` d sweep (or resume one); the RESULT_JSON dict.

    Raises :class:`SweepError` before any trial if the cluster cannot run one; on Ctrl-C, SIGTERM or SIGHUP
    (inside :func:`pipelines.utils.signals.stop_signals`) marks the sweep's run and its in-flight trials'
    runs KILLED and raises :class:`SweepInterrupted` (a signal before the sweep's run exists:
    ``KeyboardInterrupt``, nothing recorded).
    """
    started = time.monotonic()
    setup = plan["setup"]
    store.quiet_mlflow(setup.get("verbose", False))
    mlflow.set_tracking_uri(setup["tracking_uri"])
    with ray_session(address, verbose=setup.get("verbose", False)):
        parent = None
        try:
            if "path" in plan:
                with signals.deferred():
                    parent = MlflowRun.reopen(setup["tracking_uri"], setup["parent_run_id"])
                tuner = tune.Tuner.restore(plan["path"], _trainable(setup), resume_unfinished=True,
                                           resume_errored=True)
            else:
                config, dims = plan["config"], plan["dims"]
                if address is not None:  # as a fine-tuning run: decided on the cluster, never from what is up
                    gpus = worker_gpus(config.gpus_per_worker, config.num_workers, address)
                    config = replace(config, gpus_per_worker=gpus)
                    setup["options"]["gpus_per_worker"] = config.gpus_per_worker
                    check_shared_storage(setup["storage"], address, config.shared_storage)
                setup["max_concurrent"] = setup["max_concurrent"] or default_max_concurrent(
                    ray.cluster_resources(), config
                )
                with signals.deferred():  # created and recorded as one step
                    _start_parent(setup, config, dims, plan["summary"], Path.cwd())
                    parent = MlflowRun(setup["tracking_uri"], setup["parent_run_id"])
                    write_record(RunLocation(setup["storage"], setup["name"]), setup, SWEEP_RECORD)
                tuner = _tuner(setup, dims)
                print(
                    f"sweep {setup['name']}: {setup['num_samples']} trials, {setup['max_concurrent']} at a "
                    f"time, {setup['epochs']} epochs each; searching "
                    + ", ".join(f"{k} ~ {d.describe()}" for k, d in dims.items() if not d.fixed),
                    flush=True,
                )
            with _tune_signals():
                grid = tuner.fit()
            if _interrupted(grid, setup["num_samples"]):  # Tune stopped on the signal and saved its state
                raise KeyboardInterrupt
            return summarize(grid, setup, started)
        except (KeyboardInterrupt, SystemExit):
            if parent is None:
                raise  # not started: nothing recorded
            raise stopped_sweep(parent, setup, resume_command(setup, address)) from None
        except Exception:
            if parent is None:
                raise
            end_run(parent, "FAILED")  # MLflow failing too must not hide the error or the command
            command = resume_command(setup, address)
            print(f"sweep failed; finished trials are kept, continue it with: {command}", file=sys.stderr,
                  flush=True)
            raise
