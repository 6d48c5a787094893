#!/usr/bin/env python
"""Token selectors compared (paper Table 7): random, class attention (training-free and fine-tuned), SPOT.

    python pipelines/compare.py --dense models:/spot-deit_t-dense/1 --spot models:/spot-deit_t/1 \
        --heuristic models:/spot-deit_t-cls-attn/1 --rho 0.7 0.5

Several --spot / --heuristic models, one per rho each was fine-tuned at: each --rho is compared with its own.

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
    several = {"nargs": "+", "action": "extend", "default": []}  # --spot A B and --spot A --spot B alike
    parser.add_argument("--spot", **several, help="SPOT models fine-tuned from it (checkpoint dirs or "
                        "models:/ URIs; several: one per rho they were fine-tuned at)")
    parser.add_argument("--heuristic", **several, help="class-attention models fine-tuned from the same "
                        "dense model under the same recipe (finetune.py --selector cls_attn_avg; paper "
                        "Table 7), as --spot")
    parser.add_argument("--rho", type=float, nargs="+", default=[0.7, 0.5], help="retention rates [0.7 0.5]")
    add_evaluation_options(parser, experiment="spot-compare")
    args = parser.parse_args(argv)
    try:
        compare.check_rates(args.rho)  # before any data or model is loaded
        names = {"dense": [args.dense], "spot": args.spot, "heuristic": args.heuristic}
        data, uri, device = evaluation_inputs(
            args, [(f"--{role}", name) for role, given in names.items() for name in given])
        models = {role: [(load_model(name), name) for name in given] for role, given in names.items()}
        for model, name in models["heuristic"]:
            if model.spot_options.selector != "cls_attn_avg":
                raise ValueError(f"--heuristic {name}: a {model.spot_options.selector!r} model, "
                                 "not one fine-tuned with --selector cls_attn_avg")
        [(dense, _)] = models["dense"]
        rows = compare.comparison_models(dense, args.rho, dense_weights=args.dense,
                                         spot_models=models["spot"], heuristic_models=models["heuristic"])
        results = compare.compare(rows, data, batch_size=args.batch_size, throughput_batch=64, device=device)
        table = compare.format_comparison(results)
        print(table)
        if args.mlflow:
            figures = compare.mask_figures(rows, data, Path("compare-token-masks"))
            run_id = compare.log_comparison(results, table, figures, tracking_uri=uri,
                                            experiment=args.experiment, data=data,
                                            models=compare.model_roles(models))
            print(f"logged to MLflow run {run_id} (experiment {args.experiment!r}, {uri})")
    except (ValueError, FileNotFoundError, TrackingError) as err:
        return bad_input("compare", err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
