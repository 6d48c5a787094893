"""After the sweep: one row per trial (from Tune's ``ResultGrid.get_dataframe``), the ranking, the Pareto
front, the tables and plot logged to the sweep's MLflow run, the winner registered."""

from __future__ import annotations

import csv
import io
import math
import tempfile
import time
from pathlib import Path

from ray.train import Result

from pipelines.tracking.registry import data_tags, register_best
from pipelines.training.config import GivenOptions
from pipelines.utils.errors import first_line
from pipelines.utils.table import cell, markdown_table
from tuning import pareto, space
from tuning.trial import TIME_ATTR, parent_run, train_location

TOP = 10
RESULT_KEYS = ("trial_id", "status", "epochs", "val_acc1", "val_acc5", "best_epoch", "gmacs", "feasible",
               "pareto", "best", *space.SEARCHABLE, "mlflow_run_id")
CONSOLE_KEYS = ("trial_id", "status", "epochs", "val_acc1", "gmacs", "feasible", "pareto", *space.SEARCHABLE)


def given_to_trials(setup: dict) -> GivenOptions:
    """The options every trial of the sweep ``setup`` was given (its searched values aside)."""
    return GivenOptions.from_mapping(setup["options"])


def trial_rows(grid, setup: dict) -> list[dict]:
    """One row per trial: its best epoch by validation top-1, epochs run, status, searched values."""
    best = {r["trial_id"]: r for r in grid.get_dataframe("val_acc1", "max").to_dict("records")}
    last = {r["trial_id"]: r for r in grid.get_dataframe().to_dict("records")}
    options = given_to_trials(setup)
    fixed = {k: getattr(options, k) for k in space.SEARCHABLE}
    rows = []
    for result in grid:
        trial_id = Path(result.path).name  # trial_dirname: the trial id
        row = {"trial_id": trial_id, **fixed, **result.config}
        top = best.get(trial_id, {})
        if math.isnan(top.get("val_acc1", math.nan)):
            error = first_line(result.error) if result.error else ""
            rows.append(row | {"status": "error", "epochs": 0, "feasible": False, "val_acc1": math.nan,
                               "gmacs": math.nan, "error": error})
            continue
        done = int(last[trial_id][TIME_ATTR])
        status = "error" if result.error else ("completed" if done >= setup["epochs"] else "stopped early")
        rows.append(row | {
            "status": status, "epochs": done, "best_epoch": int(top["epoch"]), "gmacs": float(top["gmacs"]),
            "val_acc1": float(top["val_acc1"]), "val_acc5": float(top["val_acc5"]),
            "feasible": bool(top["feasible"]), "mlflow_run_id": top["mlflow_run_id"],
        })
    return rows


def _rank(row: dict) -> tuple:
    """Sort key, best last: feasible first, then validation top-1, then fewer GMACs."""
    if math.isnan(row["val_acc1"]):
        return (False, -math.inf, -math.inf)
    return (row["feasible"], row["val_acc1"], -row["gmacs"])


def mark_rows(rows: list[dict]) -> list[dict]:
    """The result rows best first, each marked ``pareto`` (on the front of the completed trials) and
    ``best`` (the first row, if it is feasible and has a checkpoint: the one to register)."""
    rows = sorted(rows, key=_rank, reverse=True)
    contenders = [r for r in rows if r["status"] == pareto.FRONT_STATUS]
    front = pareto.pareto_front([r["gmacs"] for r in contenders], [r["val_acc1"] for r in contenders])
    on_front = {contenders[i]["trial_id"] for i in front}
    for i, row in enumerate(rows):
        row["pareto"] = row["trial_id"] in on_front
        row["best"] = i == 0 and row["feasible"] and "mlflow_run_id" in row
    return rows


def results_csv(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=[*RESULT_KEYS, "error"], extrasaction="ignore")
    writer.writeheader()
    writer.writerows({k: cell(v) for k, v in row.items()} for row in rows)
    return out.getvalue()


def register_winner(rows: list[dict], setup: dict) -> dict | None:
    """Register the best feasible trial's best checkpoint (the fine-tuning job's registration)."""
    best = next((r for r in rows if r["best"]), None)
    if best is None:
        return None
    train_run = Result.from_path(train_location(setup, best["trial_id"]).uri)
    options = given_to_trials(setup)
    data = data_tags(options.data, options.img_size)
    registered = register_best(train_run, run_id=best["mlflow_run_id"], name=setup["register_as"], data=data)
    return registered | {"trial_id": best["trial_id"]}


def summarize(grid, setup: dict, started: float) -> dict:
    """Table, plot, registration, the sweep's run closed; returns the RESULT_JSON dict."""
    parent = parent_run(setup)
    rows = mark_rows(trial_rows(grid, setup))
    registered = register_winner(rows, setup)
    budget = setup["budget"]
    with tempfile.TemporaryDirectory() as tmp:
        title = f"{setup['name']}: {len(rows)} trials" + (f", budget {budget:g} GMACs" if budget is not None
                                                          else "")
        measured = [r for r in rows if not math.isnan(r["val_acc1"])]
        dense = setup.get("dense_gmacs", setup.get("dense_gflops"))  # the key of sweeps recorded before
        plot = pareto.plot_pareto(measured, Path(tmp) / "pareto.png", budget=budget, dense_gmacs=dense,
                                  title=title)
        parent.log_artifact(str(plot))
    parent.log_text(results_csv(rows), "sweep_results.csv")
    parent.log_text(markdown_table(rows, RESULT_KEYS), "sweep_results.md")
    counts = {status: sum(r["status"] == status for r in rows) for status in ("completed", "stopped early",
                                                                               "error")}
    wall = round(time.monotonic() - started, 1)
    metrics = {"trials_completed": counts["completed"], "trials_stopped_early": counts["stopped early"],
               "trials_failed": counts["error"],
               "trials_infeasible": sum(not r["feasible"] for r in rows if r["status"] != "error"),
               "wall_time_s": wall}
    best = next((r for r in rows if r["best"]), None)
    if best is not None:
        metrics |= {"best_val_acc1": best["val_acc1"], "best_gmacs": best["gmacs"]}
    parent.log_metrics(metrics)
    if registered is not None:
        parent.set_tags({"best_trial": best["trial_id"], "registered_model": registered["name"],
                         "registered_version": registered["version"], "champion": registered["champion"]})
    parent.end("FINISHED" if best is not None else "FAILED")
    within = f" within {budget:g} GMACs" if budget is not None else ""
    print(f"\ntop {min(TOP, len(rows))} of {len(rows)} trials (objective: validation top-1{within}):")
    print(markdown_table(rows[:TOP], CONSOLE_KEYS), flush=True)
    return {
        "sweep": setup["name"],
        "path": f"{setup['storage']}/{setup['name']}",
        "trials": len(rows),
        **{k.replace(" ", "_"): v for k, v in counts.items()},
        "best_trial": None if best is None else best["trial_id"],
        "best_val_acc1": None if best is None else best["val_acc1"],
        "best_gmacs": None if best is None else best["gmacs"],
        "pareto_trials": [r["trial_id"] for r in rows if r["pareto"]],
        "registered_model": None if registered is None else registered["name"],
        "registered_version": None if registered is None else registered["version"],
        "champion": None if registered is None else registered["champion"],
        "mlflow_tracking_uri": setup["tracking_uri"],
        "mlflow_experiment": setup["experiment"],
        "mlflow_run_id": setup["parent_run_id"],
        "wall_time_s": wall,
    }
