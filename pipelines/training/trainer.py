"""The Ray Train ``TorchTrainer`` of a run configuration, and the one console line per epoch it prints.

Used by the fine-tuning job (:mod:`pipelines.training.job`) and by every trial of the sweep
(:mod:`tuning.trial`): same worker loop, data loader, checkpoints and fault tolerance.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from functools import partial

import ray
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, ScalingConfig, UserCallback
from ray.train import RunConfig as TrainRunConfig
from ray.train.torch import TorchTrainer

from pipelines.storage.checkpoints import SCORE
from pipelines.storage.location import RunLocation
from pipelines.storage.run_record import FAULT_RECORD, STOPPED, delete_record, read_record
from pipelines.tracking.report_callback import MlflowReportCallback
from pipelines.training.config import RunConfig
from pipelines.training.worker import RUN_VALUES, WorkerJob, train_loop_per_worker
from pipelines.utils import signals
from pipelines.utils.errors import first_line

CONTROLLER_FAILURE_LIMIT = 3  # attempts of the Train controller to start a run (e.g. no resources)
KEEP_GAP_WARNING = 0.1  # train-mode keep rate this far from rho^k: the rate is not being learned


def keep_rate_warning(metrics: dict) -> str | None:
    """A warning when an epoch's train-mode keep rate of some stage is off its target rho^k, else None."""
    gaps = {key.rsplit("_s", 1)[1]: gap for key, gap in metrics.items() if key.startswith("train_keep_gap_s")}
    off = {stage: gap for stage, gap in gaps.items() if abs(gap) > KEEP_GAP_WARNING}
    if not off:
        return None
    stages = ", ".join(f"stage {s} {metrics[f'train_kept_s{s}']:.2f} ({gap:+.2f})" for s, gap in off.items())
    return (f"warning: train-mode keep rate off its target rho^k: {stages}; a rate stuck near 1.0 or 0.0 "
            "means the relevance module is not learning (docs/pipeline.md, keep-rate health)")


def epoch_line(metrics: dict) -> str:
    """The console line of one epoch's report (and the keep-rate warning, if any, on a second line)."""
    line = (
        f"epoch {metrics['epoch'] + 1}: train loss {metrics['train_total']:.4f}, val top-1 "
        f"{metrics['val_acc1']:.4f} top-5 {metrics['val_acc5']:.4f}, {metrics['gmacs']:.4g} GMACs, "
        f"{metrics['epoch_time_s']:.1f} s"
    )
    kept = [metrics[k] for k in sorted(metrics) if k.startswith("train_kept_s")]
    if kept:
        line += ", train kept " + "/".join(f"{v:.2f}" for v in kept)
    warning = keep_rate_warning(metrics)
    return line if warning is None else f"{line}\n{warning}"


class ProgressCallback(UserCallback):
    """Prints one line per epoch and per worker failure (runs on the Ray Train controller)."""

    def __init__(self, label: str = "") -> None:
        self.label = f"{label}: " if label else ""

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        if STOPPED in metrics[0]:
            print(f"{self.label}{metrics[0][STOPPED]}: stopping", flush=True)
            return
        print(f"{self.label}{epoch_line(metrics[0])}", flush=True)

    def after_exception(self, run_context, worker_exceptions: dict) -> None:
        for rank, error in sorted(worker_exceptions.items()):
            print(f"{self.label}worker rank {rank} failed: {first_line(error)}; restarting from the latest "
                  "checkpoint", flush=True)


def failure_cause(err: BaseException) -> str:
    """One line saying why a Ray Train run failed for good: each failed worker's rank and first error line
    (Ray's own message says only "Training failed due to worker errors:"), or the controller's error."""
    failures = getattr(err, "worker_failures", None)
    if failures:
        return "; ".join(f"worker rank {rank}: {type(error).__name__}: {first_line(error)}"
                         for rank, error in sorted(failures.items()))
    cause = getattr(err, "controller_failure", None)
    return first_line(cause if cause is not None else err)


def build_trainer(
    config: RunConfig,
    location: RunLocation,
    *,
    init: dict,
    callbacks: Sequence[UserCallback] = (),
    progress: bool = True,
):
    """The ``TorchTrainer`` of a resolved ``config`` (Ray must be initialised).

    ``location`` is the Ray run's storage and name (the same again = resume from its latest checkpoint);
    ``init`` is :func:`pipelines.training.weights.prepare_init`'s payload; ``callbacks`` are Ray Train user
    callbacks
    (e.g. :class:`pipelines.tracking.report_callback.MlflowReportCallback`, Tune's ``TuneReportCallback``);
    ``progress`` prints one line per epoch (:class:`ProgressCallback`).
    """
    gpus = config.gpus_per_worker
    if gpus is None:
        gpus = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
    resources = {"CPU": config.cpus_per_worker, **({"GPU": gpus} if gpus else {})}
    job = WorkerJob(config=replace(config), location=location, init_weights=ray.put(init))
    return TorchTrainer(
        partial(train_loop_per_worker, job),  # Ray pickles the bound job to every worker
        scaling_config=ScalingConfig(
            num_workers=config.num_workers,
            use_gpu=bool(gpus),
            resources_per_worker=resources,
            placement_strategy=config.placement_strategy,
        ),
        run_config=TrainRunConfig(
            name=location.name,
            storage_path=location.storage,
            failure_config=FailureConfig(
                max_failures=config.max_failures, controller_failure_limit=CONTROLLER_FAILURE_LIMIT
            ),
            checkpoint_config=CheckpointConfig(
                num_to_keep=config.keep_checkpoints,
                checkpoint_score_attribute=SCORE,
                checkpoint_score_order="max",
            ),
            callbacks=[*([ProgressCallback()] if progress else []), *callbacks],
            logging_config=LoggingConfig(log_level="INFO" if config.verbose else "WARNING"),
        ),
    )


def fit_run(
    config: RunConfig,
    location: RunLocation,
    *,
    init: dict,
    tracking_uri: str,
    mlflow_run_id: str,
    callbacks: Sequence[UserCallback] = (),
    progress: bool = True,
):
    """Fit ``config``'s run at ``location``, each epoch logged to MLflow run ``mlflow_run_id`` (plus
    ``callbacks``): ``(result, fault)``, ``fault`` the message of the run's fault record if the workers
    stopped for good (a NaN / inf loss, a bad sample), else None. An earlier attempt's fault record is
    cleared first (a ``--resume``, a retried trial)."""
    logging = MlflowReportCallback(tracking_uri, mlflow_run_id, location, run_values=RUN_VALUES)
    trainer = build_trainer(config, location, init=init, callbacks=[logging, *callbacks], progress=progress)
    delete_record(location, FAULT_RECORD)
    with signals.sigint_restored():  # fit() leaves Ray Train's handler (abort this run's controller) behind
        result = trainer.fit()
    fault = read_record(location, FAULT_RECORD)
    return result, None if fault is None else fault["error"]
