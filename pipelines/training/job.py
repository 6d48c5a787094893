"""A fine-tuning run end to end, as a library call: MLflow run, Ray Train fit, evaluation table, registry.

``run(resolve_config({...}))`` is what ``python pipelines/finetune.py`` and the demo do; the sweep's trials
use the same pieces (:func:`pipelines.training.weights.prepare_init`,
:func:`pipelines.training.trainer.build_trainer`,
:func:`pipelines.tracking.registry.register_best`).
"""

from __future__ import annotations

import logging
import shlex
import time
from pathlib import Path

from pipelines.storage.checkpoints import checkpoint_uri
from pipelines.storage.run_record import FAULT_RECORD, STOPPED, delete_record, read_record, write_record
from pipelines.tracking import pending_reports, store
from pipelines.tracking.mlflow_run import MlflowRun
from pipelines.tracking.report_callback import MlflowReportCallback
from pipelines.training.config import RunConfig
from pipelines.training.ray_session import ray_session
from pipelines.training.weights import ModelSummary, prepare_init
from pipelines.utils.errors import (
    Interrupted,
    TrackingError,
    TrackingOutage,
    TrainingError,
    check,
    first_line,
)
from pipelines.utils.table import markdown_table

log = logging.getLogger(__name__)
EPOCH_COLUMNS = ("epoch", "val_acc1", "val_acc5", "val_total", "train_total", "gmacs")


def run_params(config: RunConfig, summary: ModelSummary) -> dict:
    """The MLflow params of a training run: its training options and the model they give."""
    return config.training_options() | {
        "num_classes": config.num_classes,
        "world_size": config.num_workers,
        "params": summary.params,
        "gmacs": round(summary.gmacs, 6),
    }


def open_mlflow_run(config: RunConfig, summary: ModelSummary) -> MlflowRun:
    """Create the run's MLflow run (params, resolved config, run record), or reopen it on ``--resume``."""
    uri, name, storage = config.mlflow_uri, config.run_name, config.storage
    record = read_record(storage, name)
    if config.resume:
        run = MlflowRun.reopen(uri, record["mlflow_run_id"])
    else:
        check(record is None, f"run {name!r} already exists in {storage}: pass --resume to continue it or "
              "choose another --run-name")
        artifacts = store.local_artifact_root(uri, Path.cwd())
        run = MlflowRun.create(uri, config.experiment, name, artifact_location=artifacts)
        record = {"config": config.to_dict(), "mlflow_run_id": run.run_id, "tracking_uri": uri}
        write_record(storage, name, record)
        run.log_params(run_params(config, summary) | store.versions())
        run.log_dict(config.to_dict(), "config/resolved_config.json")
    run.set_tags(store.system_info() | {
        "storage": f"{storage}/{name}", "address": config.address or "local",
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


def end_run(mlflow_run: MlflowRun, status: str, tags: dict | None = None) -> None:
    """Mark a run that did not finish ``status`` (with ``tags``); if MLflow cannot be reached, say so and
    go on: the error the user must see is the run's, not the tracking server's."""
    from mlflow.exceptions import MlflowException

    try:
        if tags:
            mlflow_run.set_tags(tags)
        mlflow_run.end(status)
    except MlflowException as err:
        log.warning("MLflow run %s could not be marked %s (%s); it shows RUNNING until a --resume",
                    mlflow_run.run_id, status, first_line(err))


def stop_on_fault(result, mlflow_run: MlflowRun, storage: str, name: str) -> None:
    """If the workers stopped for good (a NaN / inf loss, a bad sample): mark the MLflow run FAILED and raise
    ``TrainingError`` naming what and where, and the last good checkpoint (kept; nothing is registered)."""
    fault = read_record(storage, name, FAULT_RECORD)
    if fault is None:
        return
    fault = fault["error"]
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
    return "python pipelines/finetune.py " + " ".join(shlex.quote(a) for a in args)


def trained_result(config: RunConfig):
    """The Ray Train ``Result`` of ``config``'s run if every epoch of it was trained (a ``--resume`` that only
    finishes it in MLflow), else None."""
    from ray.train import Result

    try:
        result = Result.from_path(f"{config.storage}/{config.run_name}")
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
    from mlflow.exceptions import MlflowException

    from pipelines.tracking.registry import register_best

    storage, name = config.storage, config.run_name
    try:
        store.wait_until_reachable(config.mlflow_uri, config.mlflow_wait)
        pending_reports.send_pending(mlflow_run.client, mlflow_run.run_id, storage, name)
        registered = register_best(result, run_id=mlflow_run.run_id, name=config.register_as)
        rows = mlflow_run.metric_history(list(EPOCH_COLUMNS[1:]))
        mlflow_run.log_text(evaluation_table(rows, registered["metrics"], summary), "evaluation.md")
        mlflow_run.end("FINISHED")
    except (TrackingError, pending_reports.NotSent, MlflowException) as err:
        waiting = len(pending_reports.pending(storage, name))
        raise TrackingOutage(
            f"training finished (checkpoints in {storage}/{name}) but MLflow {config.mlflow_uri} failed: "
            f"{first_line(err)}. {waiting} epoch(s) of metrics wait in {storage}/{name}/"
            f"{pending_reports.PENDING_RECORD} and the run is not FINISHED. When the server answers, send "
            f"them, register the best checkpoint (once) and end the run with:\n  {resume_command(config)}"
        ) from None
    return registered, rows


def run(config: RunConfig) -> dict:
    """Train ``config`` (from :func:`pipelines.training.config.resolve_config`) on Ray, track it in MLflow,
    register the best model. Returns the ``RESULT_JSON`` dict.

    Before any worker starts, raises ``TrackingError`` if MLflow is not usable and ``ConfigError`` for a bad
    ``--pretrained``, ``--address`` or run name; raises ``ray.train.TrainingFailedError`` if training fails
    for good and ``TrainingError`` on a NaN / inf loss (the MLflow run is then FAILED, nothing registered);
    on Ctrl-C the MLflow run is KILLED and :class:`~pipelines.utils.errors.Interrupted` says how to resume; if
    MLflow goes away during training, no epoch is lost (:func:`finish`). ``--resume`` of a run whose
    training is complete only finishes it in MLflow.
    """
    import mlflow
    from ray.train import TrainingFailedError

    from pipelines.training.trainer import build_trainer

    started = time.monotonic()
    uri, name, storage = config.mlflow_uri, config.run_name, config.storage
    store.quiet_mlflow(config.verbose)
    store.check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    init, summary = prepare_init(config)
    need = config.num_workers * config.cpus_per_worker
    with ray_session(config.address, need_cpus=need, verbose=config.verbose):
        mlflow_run = open_mlflow_run(config, summary)
        result = trained_result(config) if config.resume else None
        if result is None:
            callbacks = [MlflowReportCallback(uri, mlflow_run.run_id, storage=storage, name=name)]
            trainer = build_trainer(config, name=name, storage=storage, init=init, callbacks=callbacks)
            delete_record(storage, name, FAULT_RECORD)  # a fault of an earlier attempt (before --resume)
            try:
                result = trainer.fit()
            except TrainingFailedError:
                end_run(mlflow_run, "FAILED")
                raise
            except (KeyboardInterrupt, SystemExit):  # Ctrl-C; Ray Train's own SIGINT handler exits the driver
                end_run(mlflow_run, "KILLED")
                raise Interrupted(resume_command(config)) from None
            stop_on_fault(result, mlflow_run, storage, name)
            if aborted(result, config):  # Ray Train aborted the run on Ctrl-C and fit() returned
                end_run(mlflow_run, "KILLED")
                raise Interrupted(resume_command(config))
        registered, rows = finish(result, mlflow_run, config, summary)
    best = registered["metrics"]
    return {
        "run_name": name,
        "best_val_acc1": best["val_acc1"],
        "best_val_acc5": best["val_acc5"],
        "best_epoch": best["epoch"],
        "epochs_logged": [row["epoch"] for row in rows],
        "gmacs": best["gmacs"],
        "dense_gmacs": summary.dense_gmacs,
        "checkpoint": registered["checkpoint"],
        "storage": f"{storage}/{name}",
        "mlflow_tracking_uri": uri,
        "mlflow_experiment": config.experiment,
        "mlflow_run_id": mlflow_run.run_id,
        "registered_model": registered["name"],
        "registered_version": registered["version"],
        "champion": registered["champion"],
        "worker_node_ids": best["worker_node_ids"],
        "wall_time_s": round(time.monotonic() - started, 1),
    }
