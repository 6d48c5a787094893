"""One trial of the sweep: a Tune function that fits the fine-tuning job's ``TorchTrainer``, its reports to
Tune, and its MLflow run (a child of the sweep's run), closed by the driver with the trial's outcome."""

from __future__ import annotations

import math

import mlflow
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from pipelines.storage.location import RunLocation
from pipelines.storage.run_record import FAULT_RECORD, STOPPED, read_record, write_record
from pipelines.tracking import store
from pipelines.tracking.datasets import log_shard_inputs
from pipelines.tracking.mlflow_run import MlflowRun
from pipelines.tracking.pending_reports import PENDING_RECORD, NotSent, send_pending
from pipelines.training.config import resolve_config
from pipelines.training.job import run_params
from pipelines.training.trainer import fit_run
from pipelines.training.weights import prepare_init
from tuning import space

METRIC = "objective"
TIME_ATTR = "epochs_done"
TRIAL_TAG = "sweep_trial_id"
STATUS_TAG = "trial_status"


def train_name(trial_id: str) -> str:
    """The Ray Train run name of a trial (= resume key: a retried trial continues its run)."""
    return f"train-{trial_id}"


def train_location(setup: dict, trial_id: str) -> RunLocation:
    """Where the Ray Train run of trial ``trial_id`` keeps its checkpoints and records."""
    return RunLocation(setup["train_storage"], train_name(trial_id))


def trial_dirname(trial) -> str:
    """A trial's Tune directory: its id."""
    return trial.trial_id


def parent_run(setup: dict) -> MlflowRun:
    return MlflowRun(setup["tracking_uri"], setup["parent_run_id"])


class TrialStopped(RuntimeError):
    """A trial whose workers stopped for good (a NaN / inf loss, a bad sample); the sweep goes on."""


class TrialReport(TuneReportCallback):
    """Forwards each epoch's report to Tune with what the sweep needs (runs on the Train controller).

    Adds ``objective`` (validation top-1; minus 1 over the GMACs budget, so any infeasible trial ranks below
    every feasible one), ``feasible``, ``epochs_done`` (ASHA's time axis, survives restarts) and the trial's
    MLflow run id.
    """

    def __init__(self, budget: float | None, mlflow_run_id: str) -> None:
        super().__init__()
        self.budget = budget
        self.mlflow_run_id = mlflow_run_id

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        report = {k: v for k, v in metrics[0].items() if not isinstance(v, list)}  # node ids: not for Tune
        if STOPPED in report:  # the workers stopped for good (NaN / inf loss, bad sample): run_trial fails it
            return
        feasible = space.is_feasible(report["gmacs"], self.budget)
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
    trial_id = tune.get_context().get_trial_id()
    location = train_location(setup, trial_id)
    earlier = read_record(location, FAULT_RECORD)
    if earlier is not None and earlier.get("launch") == setup["launch"]:
        # Tune's retry (meant for a lost trial driver) of a trial that stopped for good in this launch of the
        # sweep would stop the same way; a --resume (another launch) runs it again, its data perhaps mended
        raise TrialStopped(f"trial {trial_id}: {earlier['error']} (in its first attempt; not run again); the "
                           f"last good checkpoint is kept in {location.uri}")
    # Tune's sample is a dict: typed once here (resolve_config rejects an unknown option by name)
    config = resolve_config({**setup["options"], **params, "run_name": location.name,
                             "storage": location.storage})
    mlflow.set_tracking_uri(setup["tracking_uri"])  # --pretrained models:/...
    store.quiet_mlflow(config.verbose)
    init, summary = prepare_init(config)
    parent = parent_run(setup)
    child = parent.find_child(TRIAL_TAG, trial_id)
    if child is None:
        child = MlflowRun.create(setup["tracking_uri"], setup["experiment"], location.name, parent=parent,
                                 tags={TRIAL_TAG: trial_id, STATUS_TAG: "running"})
        child.log_params(run_params(config, summary))
        log_shard_inputs(child.client, child.run_id, config.data, ("train", "val"))
    else:
        child = MlflowRun.reopen(child.uri, child.run_id)
    _, fault = fit_run(config, location, init=init, tracking_uri=setup["tracking_uri"],
                       mlflow_run_id=child.run_id, callbacks=[TrialReport(setup["budget"], child.run_id)],
                       progress=config.verbose)
    if fault is not None:  # nothing went to Tune, so the trial is still alive to fail
        record = {**read_record(location, FAULT_RECORD), "launch": setup["launch"]}
        write_record(location, record, FAULT_RECORD)
        raise TrialStopped(f"trial {trial_id}: {fault}; the last good checkpoint is kept in {location.uri}")


def close_interrupted(setup: dict) -> int:
    """End the MLflow runs of the trials an interrupted sweep left running KILLED (``trial_status``
    ``interrupted``; a ``--resume`` reopens and continues each); how many there were."""
    children = parent_run(setup).running_children()
    for child in children:
        child.set_tags({STATUS_TAG: "interrupted"})
        child.end("KILLED")
    return len(children)


class TrialRuns(tune.Callback):
    """Closes each trial's MLflow run with its outcome and prints one line (runs in the sweep's driver)."""

    def __init__(self, setup: dict) -> None:
        self.sweep = {k: setup[k] for k in ("tracking_uri", "parent_run_id", "epochs", "train_storage")}

    def _close(self, trial, status: str, outcome: str, feasible) -> None:
        child = parent_run(self.sweep).find_child(TRIAL_TAG, trial.trial_id)
        if child is None:  # failed before its run existed
            return
        location = train_location(self.sweep, trial.trial_id)
        try:  # epochs the trial's controller could not send (MLflow was down)
            send_pending(child.client, child.run_id, location)
        except NotSent as err:
            print(f"trial {trial.trial_id}: MLflow failed ({err}); {len(err.entries)} epoch(s) of metrics "
                  f"wait in {location.file(PENDING_RECORD)}", flush=True)
        child.set_tags({STATUS_TAG: outcome} | ({} if feasible is None else {"feasible": feasible}))
        child.end(status)

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        result = trial.last_result or {}
        done, epochs = result.get(TIME_ATTR, 0), self.sweep["epochs"]
        outcome = "completed" if done >= epochs else "stopped early"
        self._close(trial, "FINISHED" if done >= epochs else "KILLED", outcome, result.get("feasible"))
        over = "" if result.get("feasible", True) else ", over the GMACs budget"
        acc, gmacs = result.get("val_acc1", math.nan), result.get("gmacs", math.nan)
        print(f"trial {trial.trial_id}: {outcome} after {done}/{epochs} epochs, val top-1 {acc:.4f}, "
              f"{gmacs:.4g} GMACs{over}", flush=True)

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self._close(trial, "FAILED", "error", (trial.last_result or {}).get("feasible"))
        print(f"trial {trial.trial_id}: failed, see {trial.error_file}", flush=True)
