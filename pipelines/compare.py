#!/usr/bin/env python
"""Token selectors compared on the same weights (paper Table 7): random, class attention, learned SPOT.

    python pipelines/compare.py --dense models:/spot-deit_t-dense/1 --spot models:/spot-deit_t/1 --rho 0.7 0.5

From the dense model, ``random`` and ``cls_attn_avg`` (training-free) are evaluated at each rho on the dense
weights; the SPOT model (fine-tuned from the dense one) is evaluated at each rho with its own weights. Every
row reads the whole val split in prune mode; GMACs are ``spot.gmacs``; images/s are measured in this process.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script from a checkout: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines.evaluation import compare  # noqa: E402
from pipelines.evaluation.options import add_evaluation_options, evaluation_inputs  # noqa: E402
from pipelines.tracking.registry import load_model  # noqa: E402
from pipelines.utils.cli import bad_input  # noqa: E402
from pipelines.utils.errors import TrackingError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dense", required=True, help="the dense model: checkpoint dir or models:/ URI")
    parser.add_argument("--spot", help="a SPOT model fine-tuned from it (checkpoint dir or models:/ URI)")
    parser.add_argument("--rho", type=float, nargs="+", default=[0.7, 0.5], help="retention rates [0.7 0.5]")
    add_evaluation_options(parser, experiment="spot-compare")
    args = parser.parse_args(argv)
    try:
        data, uri, device = evaluation_inputs(args)
        dense, sparse = load_model(args.dense), (load_model(args.spot) if args.spot else None)
        rows = compare.comparison_models(dense, sparse, args.rho, dense_weights=args.dense,
                                         spot_weights=args.spot)
        results = compare.compare(rows, data, batch_size=args.batch_size, throughput_batch=64, device=device)
        table = compare.format_comparison(results)
        print(table)
        if args.mlflow:
            figures = compare.mask_figures(rows, data, Path("compare-token-masks"))
            run_id = compare.log_comparison(results, table, figures, tracking_uri=uri,
                                            experiment=args.experiment, data=data)
            print(f"logged to MLflow run {run_id} (experiment {args.experiment!r}, {uri})")
    except (ValueError, FileNotFoundError, TrackingError) as err:
        return bad_input("compare", err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
