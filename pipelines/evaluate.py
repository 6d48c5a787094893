#!/usr/bin/env python
"""Evaluate a SPOT model (and optionally a dense baseline): top-1 / top-5, GMACs, throughput, as a table.

    python pipelines/evaluate.py --model models:/spot-deit_t@champion \
        --baseline models:/spot-deit_t-dense@champion
    python pipelines/evaluate.py --model ray_results/<run>/checkpoint_<time> --data /data/shards --mlflow

Models: a checkpoint directory of pipelines/finetune.py, a local MLflow model directory, or an MLflow model
URI. Accuracy is exact over the whole val split (prune mode, ``model.eval()``). Throughput is images/s of the
models' forward on a batch of random images, timed after the accuracy passes with the models interleaved
(median of repeats; "noisy" when they spread too wide), on the GPU if there is one.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script from a checkout: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines.evaluation.evaluate import evaluate, format_table, log_to_mlflow
from pipelines.evaluation.options import add_evaluation_options, evaluation_inputs
from pipelines.utils.cli import Parser, bad_input
from pipelines.utils.errors import TrackingError


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
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
    args = build_parser().parse_args(argv)
    try:
        data, uri, device = evaluation_inputs(args, [("--model", args.model), ("--baseline", args.baseline)])
        pairs = [("model", args.model)] + ([("baseline", args.baseline)] if args.baseline else [])
        rows = evaluate(pairs, data, batch_size=args.batch_size, throughput_batch=args.throughput_batch,
                        device=device)
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
