#!/usr/bin/env python
"""Accuracy against GMACs for each token selector over rho (paper Fig. 4), from one dense model.

    python benchmarks/selector_accuracy.py --dense models:/spot-deit_t-dense/1 --spot models:/spot-deit_t/1 \
        --data data/cluttered-digits --out docs/img/selectors.png

``random`` and ``cls_attn_avg`` run on the dense weights; the SPOT model (fine-tuned at one rho) is
evaluated at every rho with its own weights. Prints a markdown table and writes the plot.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import mlflow
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines.evaluation import compare  # noqa: E402
from pipelines.tracking.registry import load_model  # noqa: E402
from pipelines.tracking.uri import move_credentials_to_env, resolve_tracking_uri  # noqa: E402

RHOS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    dense = next(r for r in results if r["rho"] is None)
    for selector in dict.fromkeys(r["selector"] for r in results if r["rho"] is not None):
        rows = sorted((r for r in results if r["selector"] == selector), key=lambda r: r["gmacs"])
        ax.plot([r["gmacs"] for r in rows], [100 * r["top1"] for r in rows], "o-", label=selector)
    ax.axhline(100 * dense["top1"], color="grey", ls="--", label=f"dense ({dense['gmacs']:.3f} GMACs)")
    ax.set_xlabel("GMACs per image")
    ax.set_ylabel("top-1 (%)")
    ax.set_title("rho from 0.3 to 0.9")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dense", required=True, help="the dense model (checkpoint dir or models:/ URI)")
    parser.add_argument("--spot", help="a SPOT model fine-tuned from it")
    parser.add_argument("--data", required=True, help="shard directory (its val split is read)")
    parser.add_argument("--rho", type=float, nargs="+", default=list(RHOS), help="retention rates")
    parser.add_argument("--out", type=Path, default=Path("selectors.png"), help="where the plot goes")
    parser.add_argument("--mlflow-uri", help="tracking URI of models:/ URIs (default: ./mlflow.db)")
    args = parser.parse_args(argv)
    mlflow.set_tracking_uri(resolve_tracking_uri(move_credentials_to_env(args.mlflow_uri), Path.cwd()))
    dense = load_model(args.dense)
    sparse = load_model(args.spot) if args.spot else None
    rows = compare.comparison_models(dense, args.rho, dense_weights=args.dense,
                                     spot_models=[(sparse, args.spot)] if sparse else [])
    results = compare.compare(rows, args.data, batch_size=64, throughput_batch=64, device=torch.device("cpu"))
    print(compare.format_comparison(results))
    plot(results, args.out)
    print(f"plot: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
