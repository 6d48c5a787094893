#!/usr/bin/env python
"""Evaluate a SPOT model (and optionally a dense baseline): top-1 / top-5, GMACs, throughput, as a table.

    python pipelines/evaluate.py --model models:/spot-deit_t@champion \
        --baseline models:/spot-deit_t-dense@champion
    python pipelines/evaluate.py --model ray_results/<run>/checkpoint_<time> --data /data/shards --mlflow

Models: a checkpoint directory of pipelines/finetune.py, a local MLflow model directory, or an MLflow model
URI.Accuracy is exact over the whole val split (prune mode, ``model.eval()``); throughput is images/s of the
model's forward on one batch of random images in this process (after warm-up), on the GPU if there is one.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

import spot
from pipelines.data.loader import PAD_LABEL, make_loader
from pipelines.data.manifest import DataError, read_manifest
from pipelines.utils.table import markdown_table
from spot.flops import gmacs

COLUMNS = ("model", "top-1", "top-5", "GMACs", "params (M)", "images/s")


@torch.inference_mode()
def evaluate_model(model: nn.Module, data: str | Path, *, batch_size: int, device: torch.device) -> dict:
    """Exact top-1 / top-5 of ``model`` (eval mode) over the val split of ``data``."""
    config = model.spot_config
    img_size = config.get("img_size", 224)
    manifest = read_manifest(data)
    if manifest.num_classes != config["num_classes"]:
        raise DataError(
            f"{manifest.root}: {manifest.num_classes} classes, the model predicts {config['num_classes']}"
        )
    loader = make_loader(data, "val", batch_size=batch_size, img_size=img_size, train=False, device=device,
                         **spot.input_normalization(model))
    model = model.eval().to(device)
    seen = top1 = top5 = 0
    for images, labels in loader:
        valid = labels != PAD_LABEL
        top = model(images[valid]).topk(min(5, config["num_classes"]), dim=1).indices
        hits = top == labels[valid, None]
        seen += int(valid.sum())
        top1 += int(hits[:, 0].sum())
        top5 += int(hits.any(dim=1).sum())
    return {"top1": top1 / seen, "top5": top5 / seen, "samples": seen}


@torch.inference_mode()
def measure_throughput(
    model: nn.Module, *, batch_size: int, device: torch.device, warmup: int = 3, min_time_s: float = 2.0
) -> float:
    """Images/s of ``model``'s forward on a random batch, timed over at least ``min_time_s``."""
    img_size = model.spot_config.get("img_size", 224)
    model = model.eval().to(device)
    images = torch.randn(batch_size, 3, img_size, img_size, device=device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        model(images)
    sync()
    runs, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < min_time_s or runs < 3:
        model(images)
        sync()
        runs += 1
    return runs * batch_size / elapsed


def evaluate(
    uri: str, data: str | Path, *, batch_size: int, throughput_batch: int, device: torch.device, label: str
) -> dict:
    """One table row for the model at ``uri``: accuracy, GMACs, parameters, throughput."""
    from pipelines.tracking.registry import load_model

    model = load_model(uri)
    row = {"model": label, "uri": str(uri), "rho": model.spot_config["rho"]}
    row.update(evaluate_model(model, data, batch_size=batch_size, device=device))
    row["gmacs"] = gmacs(model, model.spot_config.get("img_size", 224))
    row["params_m"] = sum(p.numel() for p in model.parameters()) / 1e6
    row["images_per_s"] = measure_throughput(model, batch_size=throughput_batch, device=device)
    return row


def _cells(row: dict) -> dict:
    return dict(zip(COLUMNS, [row["model"], f"{100 * row['top1']:.2f}", f"{100 * row['top5']:.2f}",
                              f"{row['gmacs']:.4g}", f"{row['params_m']:.3f}", f"{row['images_per_s']:.0f}"],
                    strict=True))


def format_table(rows: list[dict]) -> str:
    """Markdown table of :func:`evaluate` rows; with two rows, a last line compares the first to the
    second."""
    table = markdown_table([_cells(r) for r in rows], COLUMNS).rstrip("\n")
    if len(rows) == 2:
        a, b = rows
        table += (
            f"\n\n{a['model']} vs {b['model']}: top-1 {100 * (a['top1'] - b['top1']):+.2f} points, "
            f"{b['gmacs'] / a['gmacs']:.2f}x fewer GMACs, {a['images_per_s'] / b['images_per_s']:.2f}x "
            "throughput"
        )
    return table


def log_to_mlflow(rows: list[dict], table: str, *, tracking_uri: str, experiment: str, data: str) -> str:
    """Log the rows as one MLflow run (metrics prefixed by the row's label, table as artifact); returns
    its id."""
    from pipelines.tracking.mlflow_run import log_results

    return log_results(
        tracking_uri, experiment, "evaluate",
        params={"data": data} | {f"{r['model']}_uri": r["uri"] for r in rows},
        metrics={f"{r['model']}_{k}": r[k] for r in rows for k in ("top1", "top5", "gmacs", "images_per_s")},
        text=("evaluation.md", table + "\n"),
    )


def build_parser() -> argparse.ArgumentParser:
    from pipelines.utils.cli import add_evaluation_options

    parser = argparse.ArgumentParser(
        prog="evaluate",
        description=__doc__.split("\n\n")[0],
        epilog="examples:\n" + __doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model", required=True, help="checkpoint dir, MLflow model dir, or models:/NAME@ALIAS"
    )
    parser.add_argument("--baseline", help="a second model shown side by side (e.g. the dense backbone)")
    parser.add_argument(
        "--throughput-batch", type=int, default=64, help="batch size of the throughput timing [default: 64]"
    )
    add_evaluation_options(parser, experiment="spot-evaluate")
    return parser


def main(argv: list[str] | None = None) -> int:
    from pipelines.utils.cli import bad_input, evaluation_inputs
    from pipelines.utils.errors import TrackingError

    args = build_parser().parse_args(argv)
    try:
        data, uri, device = evaluation_inputs(args)
        pairs = [("model", args.model)] + ([("baseline", args.baseline)] if args.baseline else [])
        rows = [
            evaluate(m, data, batch_size=args.batch_size, throughput_batch=args.throughput_batch,
                     device=device, label=label)
            for label, m in pairs
        ]
        table = format_table(rows)
        print(table)
        if args.mlflow:
            run_id = log_to_mlflow(rows, table, tracking_uri=uri, experiment=args.experiment, data=data)
            print(f"logged to MLflow run {run_id} (experiment {args.experiment!r}, {uri})")
    except (ValueError, FileNotFoundError, TrackingError) as err:
        return bad_input("evaluate", err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
