"""A fine-tuning run end to end, as a library call: MLflow run, Ray Train fit, evaluation table, registry.

``run(resolve_config({...}))`` is what ``python pipelines/finetune.py`` and the demo do; the sweep's trials
use the same pieces (:func:`pipelines.training.weights.prepare_init`,
:func:`pipelines.training.trainer.fit_run`,
:func:`pipelines.tracking.registry.register_best`).
"""

from __future__ import annotations

import logging
import shlex
import time
from dataclasses import replace
from pathlib import Path

import mlflow
import pyarrow.fs as pafs
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE
from ray.train import Result

from pipelines.storage.checkpoints import checkpoint_uri
from pipelines.storage.location import RunLocation
from pipelines.storage.run_record import STOPPED, read_record, write_record
from pipelines.tracking import pending_reports, store
from pipelines.tracking.datasets import log_shard_inputs
from pipelines.tracking.mlflow_run import MlflowRun
from pipelines.tracking.registry import OtherTask, check_same_task, data_tags, register_best
from pipelines.training.config import PLACEMENT_KEYS, RunConfig, flag
from pipelines.training.ray_session import check_shared_storage, ray_session, worker_gpus
from pipelines.training.trainer import failure_cause, fit_run
from pipelines.training.weights import ModelSummary, prepare_init
from pipelines.utils import signals
from pipelines.utils.errors import (
    ConfigError,
    Interrupted,
    TrackingError,
    TrackingOutage,
    TrainingError,
    check,
    first_line,
)
from pipelines.utils.table import markdown_table

log = logging.getLogger(__name__)
EPOCH_COLUMNS = ("epoch", "val_acc1", "val_acc5", "val_total", "train_total")  # GMACs: the header


def run_params(config: RunConfig, summary: ModelSummary) -> dict:
    """The MLflow params of a training run: its training options and the model they give."""
    return config.training_options() | {
        "num_classes": config.num_classes,
        "world_size": config.num_workers,
        "params": summary.params,
        "gmacs": round(summary.gmacs, 6),
    }


def run_description(config: RunConfig) -> str:
    """The run's description in the MLflow UI: what is trained, from what, on which data."""
    kind = "dense" if config.rho is None else f"SPOT (rho {config.rho})"
    start = f"fine-tuned from {config.pretrained}" if config.pretrained else "trained from scratch"
    return (f"{kind} {config.backbone} {config.model_args or ''}, {start}, {config.epochs} epochs on "
            f"{config.data} with {config.num_workers} Ray Train workers; the best epoch is registered as "
            f"{config.register_as}")


def open_mlflow_run(config: RunConfig, summary: ModelSummary, parent: MlflowRun | None = None) -> MlflowRun:
    """Create the run's MLflow run (params, resolved config, dataset inputs, run record; a child of
    ``parent`` if given), or reopen it on ``--resume``."""
    uri, location = config.mlflow_uri, config.location
    record = read_record(location)
    if config.resume:
        run = MlflowRun.reopen(uri, record["mlflow_run_id"])
        if config.register_as != record["config"].get("register_as"):  # --resume --register-as NEW
            record["config"]["register_as"] = config.register_as  # a later --resume keeps it
            write_record(location, record)
    else:
        check(record is None, f"run {location.name!r} already exists in {location.storage}: pass --resume to "
              "continue it or choose another --run-name")
        artifacts = store.local_artifact_root(uri, Path.cwd())
        run = MlflowRun.create(uri, config.experiment, location.name, artifact_location=artifacts,
                               parent=parent)
        record = {"config": config.to_dict(), "mlflow_run_id": run.run_id, "tracking_uri": uri}
        write_record(location, record)
        run.log_params(run_params(config, summary) | store.versions())
        run.log_dict(config.to_dict(), "config/resolved_config.json")
        run.set_tags({MLFLOW_RUN_NOTE: run_description(config)})
        log_shard_inputs(run.client, run.run_id, config.data, ("train", "val"))
    run.set_tags(store.system_info() | {
        "storage": location.uri, "address": config.address or "local",
        "num_workers": config.num_workers, "placement_strategy": config.placement_strategy,
    })
    return run


def evaluation_table(rows: list[dict], best: dict, summary: ModelSummary) -> str:
    """The run's ``evaluation.md``: the best checkpoint and the per-epoch table."""
    return (
        f"# Best checkpoint: epoch {best['epoch']}, val top-1 {best['val_acc1']:.4f}, top-5 "
        f"{best['val_acc5']:.4f}, {best['gmacs']:.4f} GMACs (dense {summary.dense_gmacs:.4f}), "
        f"{summary.params} parameters\n\n" + markdown_table(rows, EPOCH_COLUMNS)
    )


def end_run(mlflow_run: MlflowRun, status: str, tags: dict | None = None) -> bool:
    """Mark a run that did not finish ``status`` (with ``tags``) and return True; if MLflow cannot be
    reached, say so, return False and go on: the error the user must see is the run's, not the tracking
    server's."""
    try:
        if tags:
            mlflow_run.set_tags(tags)
        mlflow_run.end(status)
    except MlflowException as err:
        log.warning("MLflow run %s could not be marked %s (%s); it shows RUNNING until a --resume",
                    mlflow_run.run_id, status, first_line(err))
        return False
    return True


def stopped(mlflow_run: MlflowRun, command: str, checkpoints: int | None) -> Interrupted:
    """A run stopped by a signal: its MLflow run marked KILLED (if MLflow can record it), and the
    :class:`Interrupted` to raise, with ``command`` that continues it."""
    with signals.shielded():  # a second Ctrl-C while MLflow is slow must not cut the marking short
        marked = end_run(mlflow_run, "KILLED")
    return Interrupted(command, checkpoints, marked=marked)


def stop_on_fault(result, mlflow_run: MlflowRun, fault: str | None) -> None:
    """If the workers stopped for good (``fault``: a NaN / inf loss, a bad sample): mark the MLflow run FAILED
    and raise ``TrainingError`` naming what and where, and the last good checkpoint (kept; nothing is
    registered)."""
    if fault is None:
        return
    end_run(mlflow_run, "FAILED", {STOPPED: fault})
    last = checkpoint_uri(result.checkpoint) if result.checkpoint is not None else "none (no epoch finished)"
    hint = " (try a lower --lr)" if fault.startswith("non-finite") else ""
    raise TrainingError(f"{fault}; nothing registered; last good checkpoint: {last}{hint}")


def aborted(result, config: RunConfig) -> bool:
    """Whether a run that raised nothing (and hit no NaN) ended before its last epoch: only an abort does
    that (Ray Train's SIGINT handler stops the controller, and ``fit()`` returns what was reported)."""
    last = (result.metrics or {}).get("epoch")
    return last is None or last + 1 < config.epochs


def resume_command(config: RunConfig) -> str:
    """The command that continues ``config``'s run from its last checkpoint (same MLflow run)."""
    args = ["--resume", "--run-name", config.run_name, "--storage", config.storage]
    for key in PLACEMENT_KEYS:  # where it ran, as started (the defaults of a --resume too)
        value = getattr(config, key)
        if value is not None:
            args += [flag(key), f"{value:g}" if isinstance(value, float) else str(value)]
    return "python pipelines/finetune.py " + " ".join(shlex.quote(a) for a in args)


def checkpoint_count(location: RunLocation) -> int | None:
    """How many checkpoints the run at ``location`` has (local or a pyarrow URI), None if unknown."""
    try:
        fs, root = location.filesystem()
        infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    except (OSError, ValueError):
        return None
    return sum(i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_") for i in infos)


def trained_result(config: RunConfig):
    """The Ray Train ``Result`` of ``config``'s run if every epoch of it was trained (a ``--resume`` that only
    finishes it in MLflow), else None."""
    try:
        result = Result.from_path(config.location.uri)
    except (RuntimeError, OSError, ValueError):
        return None
    return None if aborted(result, config) else result


def finish(
    result, mlflow_run: MlflowRun, config: RunConfig, summary: ModelSummary
) -> tuple[dict, list[dict]]:
    """Send the epochs MLflow has not got yet, register the best checkpoint, log the evaluation table and end
    the run FINISHED; ``(registered, per-epoch rows)``.

    Waits up to ``config.mlflow_wait`` seconds for an unreachable server, then raises ``TrackingOutage``
    with the command that does all this later (the checkpoints and the unsent epochs stay in storage).
    """
    location = config.location
    try:
        store.wait_until_reachable(config.mlflow_uri, config.mlflow_wait)
        pending_reports.send_pending(mlflow_run.client, mlflow_run.run_id, location)
        registered = register_best(result, run_id=mlflow_run.run_id, name=config.register_as,
                                   data=data_tags(config.data, config.img_size))
        rows = mlflow_run.metric_history(list(EPOCH_COLUMNS[1:]))
        mlflow_run.log_text(evaluation_table(rows, registered["metrics"], summary), "evaluation.md")
        mlflow_run.end("FINISHED")
    except OtherTask as err:  # another data set's model took the name while this run trained
        raise ConfigError(f"training finished (checkpoints in {location.uri}), nothing registered: "
                          f"{first_line(err)}; register it so with: {resume_command(config)} "
                          "--register-as NAME") from None
    except (TrackingError, pending_reports.NotSent, MlflowException) as err:
        waiting = len(pending_reports.pending(location))
        raise TrackingOutage(
            f"training finished (checkpoints in {location.uri}) but MLflow {config.mlflow_uri} failed: "
            f"{first_line(err)}. {waiting} epoch(s) of metrics wait in "
            f"{location.file(pending_reports.PENDING_RECORD)} and the run is not FINISHED. When the server "
            f"answers, send them, register the best checkpoint (once) and end the "
            f"run with:\n  {resume_command(config)}"
        ) from None
    return registered, rows


def run(config: RunConfig, parent: MlflowRun | None = None) -> dict:
    """Train ``config`` (from :func:`pipelines.training.config.resolve_config`) on Ray, track it in MLflow
    (as a child run of ``parent`` if given), register the best model. Returns the ``RESULT_JSON`` dict.

    Before any worker starts, raises ``TrackingError`` if MLflow is not usable and ``ConfigError`` for a bad
    ``--pretrained``, ``--address`` or run name; raises ``ray.train.TrainingFailedError`` if training fails
    for good and ``TrainingError`` on a NaN / inf loss (the MLflow run is then FAILED, nothing registered);
    on Ctrl-C the MLflow run is KILLED (if MLflow can record it) and
    :class:`~pipelines.utils.errors.Interrupted` says how to resume; if MLflow goes away during training,
    no epoch is lost (:func:`finish`). ``--resume`` of a run whose
    training is complete only finishes it in MLflow.
    """
    started = time.monotonic()
    uri, location = config.mlflow_uri, config.location
    store.quiet_mlflow(config.verbose)
    store.check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    check_same_task(MlflowClient(uri), config.register_as, data_tags(config.data, config.img_size))
    init, summary = prepare_init(config)
    need = config.num_workers * config.cpus_per_worker
    with ray_session(config.address, need_cpus=need, verbose=config.verbose):
        if config.address is not None:  # what a cluster can give is known once joined, before any run
            config = replace(config, gpus_per_worker=worker_gpus(config.gpus_per_worker, config.num_workers,
                                                                 config.address))
            check_shared_storage(location.storage, config.address, config.shared_storage)
        mlflow_run = None
        try:
            with signals.deferred():  # created and recorded as one step
                mlflow_run = open_mlflow_run(config, summary, parent)  # started: every way out ends it
            result = trained_result(config) if config.resume else None
            if result is None:
                try:
                    with mlflow_run.system_metrics():
                        result, fault = fit_run(config, location, init=init, tracking_uri=uri,
                                                mlflow_run_id=mlflow_run.run_id)
                except Exception as err:
                    if signals.received():  # a stop signal came while it trained: what fit() raised follows
                        raise KeyboardInterrupt from None
                    end_run(mlflow_run, "FAILED", {STOPPED: failure_cause(err)[:5000]})
                    raise
                stop_on_fault(result, mlflow_run, fault)
                if aborted(result, config):  # Ray Train aborted the run on Ctrl-C and fit() returned
                    raise KeyboardInterrupt
            registered, rows = finish(result, mlflow_run, config, summary)
        except TrackingOutage:
            raise  # trained; the run stays open for the command that finishes it
        except Exception:
            if mlflow_run is not None:
                end_run(mlflow_run, "FAILED")  # no way out leaves it RUNNING
            raise
        except (KeyboardInterrupt, SystemExit):  # Ctrl-C / SIGTERM / SIGHUP; Ray Train's handler may exit
            if mlflow_run is None:
                raise  # not started: nothing recorded
            raise stopped(mlflow_run, resume_command(config), checkpoint_count(location)) from None
    best = registered["metrics"]
    return {
        "run_name": location.name,
        "best_val_acc1": best["val_acc1"],
        "best_val_acc5": best["val_acc5"],
        "best_epoch": best["epoch"],
        "epochs_logged": [row["epoch"] for row in rows],
        "gmacs": best["gmacs"],
        "dense_gmacs": summary.dense_gmacs,
        "checkpoint": registered["checkpoint"],
        "storage": location.uri,
        "mlflow_tracking_uri": uri,
        "mlflow_experiment": config.experiment,
        "mlflow_run_id": mlflow_run.run_id,
        "registered_model": registered["name"],
        "registered_version": registered["version"],
        "registered_uri": registered["uri"],
        "champion": registered["champion"],
        "worker_node_ids": best["worker_node_ids"],
        "wall_time_s": round(time.monotonic() - started, 1),
    }
