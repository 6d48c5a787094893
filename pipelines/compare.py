#!/usr/bin/env python
"""Token selectors compared (paper Table 7): random, class attention (training-free and fine-tuned), SPOT.

    python pipelines/compare.py --dense models:/spot-deit_t-dense/1 --spot models:/spot-deit_t/1 \
        --heuristic models:/spot-deit_t-cls-attn/1 --rho 0.7 0.5

What each row is: :mod:`pipelines.evaluation.compare`.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script from a checkout: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines.evaluation import compare
from pipelines.evaluation.options import add_evaluation_options, evaluation_inputs
from pipelines.tracking.registry import load_model
from pipelines.utils.cli import Parser, bad_input
from pipelines.utils.errors import TrackingError


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dense", required=True, help="the dense model: checkpoint dir or models:/ URI")
    parser.add_argument("--spot", help="a SPOT model fine-tuned from it (checkpoint dir or models:/ URI)")
    parser.add_argument("--heuristic", help="the class-attention model fine-tuned from the same dense model "
                        "under the same recipe (finetune.py --selector cls_attn_avg; paper Table 7)")
    parser.add_argument("--rho", type=float, nargs="+", default=[0.7, 0.5], help="retention rates [0.7 0.5]")
    add_evaluation_options(parser, experiment="spot-compare")
    args = parser.parse_args(argv)
    try:
        data, uri, device = evaluation_inputs(
            args, {"--dense": args.dense, "--spot": args.spot, "--heuristic": args.heuristic})
        dense, sparse = load_model(args.dense), (load_model(args.spot) if args.spot else None)
        heuristic = load_model(args.heuristic) if args.heuristic else None
        if heuristic is not None and heuristic.spot_options.selector != "cls_attn_avg":
            raise ValueError(f"--heuristic {args.heuristic}: a {heuristic.spot_options.selector!r} model, "
                             "not one fine-tuned with --selector cls_attn_avg")
        rows = compare.comparison_models(dense, sparse, args.rho, dense_weights=args.dense,
                                         spot_weights=args.spot, heuristic=heuristic,
                                         heuristic_weights=args.heuristic)
        results = compare.compare(rows, data, batch_size=args.batch_size, throughput_batch=64, device=device)
        table = compare.format_comparison(results)
        print(table)
        if args.mlflow:
            figures = compare.mask_figures(rows, data, Path("compare-token-masks"))
            given = {"dense": args.dense, "spot": args.spot, "heuristic": args.heuristic}
            run_id = compare.log_comparison(results, table, figures, tracking_uri=uri,
                                            experiment=args.experiment, data=data,
                                            models={role: model for role, model in given.items() if model})
            print(f"logged to MLflow run {run_id} (experiment {args.experiment!r}, {uri})")
    except (ValueError, FileNotFoundError, TrackingError) as err:
        return bad_input("compare", err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
