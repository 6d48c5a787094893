"""The evaluate command's library half: one table row per model (accuracy, GMACs, parameters,
throughput), the table, and its MLflow run."""

from __future__ import annotations

from pathlib import Path

import torch

from pipelines.evaluation.metrics import images_per_s_cell, measure_throughputs, model_row
from pipelines.tracking.mlflow_run import log_results
from pipelines.tracking.registry import load_model
from pipelines.utils.table import markdown_table

COLUMNS = ("model", "top-1", "top-5", "GMACs", "params (M)", "images/s")


def evaluate(
    models: list[tuple[str, str]], data: str | Path, *, batch_size: int, throughput_batch: int,
    device: torch.device,
) -> list[dict]:
    """One table row per ``(label, uri)``: accuracy, GMACs and parameters per model, then throughput of all
    of them in one timing phase (interleaved, so that the rows' images/s are measured side by side)."""
    loaded = [(label, uri, load_model(uri)) for label, uri in models]
    rows = []
    for label, uri, model in loaded:
        row = {"model": label, "uri": str(uri), "rho": model.spot_config["rho"]}
        row.update(model_row(model, data, batch_size=batch_size, device=device))
        row["params_m"] = sum(p.numel() for p in model.parameters()) / 1e6
        rows.append(row)
    timings = measure_throughputs([model for *_, model in loaded], batch_size=throughput_batch, device=device)
    for row, timing in zip(rows, timings, strict=True):
        row.update(timing)
    return rows


def _cells(row: dict) -> dict:
    return dict(zip(COLUMNS, [row["model"], f"{100 * row['top1']:.2f}", f"{100 * row['top5']:.2f}",
                              f"{row['gmacs']:.4g}", f"{row['params_m']:.3f}", images_per_s_cell(row)],
                    strict=True))


def format_table(rows: list[dict]) -> str:
    """Markdown table of :func:`evaluate` rows; with two rows, a last line compares the first to the
    second (the throughput ratio only when neither row's timing is noisy)."""
    table = markdown_table([_cells(r) for r in rows], COLUMNS).rstrip("\n")
    if len(rows) == 2:
        a, b = rows
        speed = ("throughput not compared (noisy timing)" if a["noisy"] or b["noisy"]
                 else f"{a['images_per_s'] / b['images_per_s']:.2f}x throughput")
        table += (
            f"\n\n{a['model']} vs {b['model']}: top-1 {100 * (a['top1'] - b['top1']):+.2f} points, "
            f"{b['gmacs'] / a['gmacs']:.2f}x fewer GMACs, {speed}"
        )
    return table


def log_to_mlflow(rows: list[dict], table: str, *, tracking_uri: str, experiment: str, data: str) -> str:
    """Log the rows as one MLflow run: metrics prefixed by the row's label (images/s only where not noisy),
    the table as an artifact, the val split as its dataset, the evaluated models with their versions and
    source runs; returns its id."""
    return log_results(
        tracking_uri, experiment, "evaluate",
        params={"data": data},
        metrics={f"{r['model']}_{k}": r[k] for r in rows for k in ("top1", "top5", "gmacs", "images_per_s")
                 if k != "images_per_s" or not r["noisy"]},  # a noisy timing is no measurement
        text=("evaluation.md", table + "\n"), data=data, models={r["model"]: r["uri"] for r in rows},
        description=(f"{' and '.join(r['uri'] for r in rows)} evaluated on the val split of {data}; the "
                     "table is the artifact evaluation.md"),
    )
