"""GMACs (the paper's "GFLOPs") of every backbone, dense and with SPOT at several retention rates.

    python benchmarks/gmacs_table.py [--img-size 224]

Prints a Markdown table: dense GMACs, SPOT GMACs per rho, and the relevance modules' share.
"""

from __future__ import annotations

import argparse

import spot

RHOS = (0.5, 0.6, 0.7, 0.8, 0.9)


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--img-size", type=int, default=224)
    args = p.parse_args(argv)
    header = ["backbone", "dense"] + [f"rho {r}" for r in RHOS] + ["predictors at rho 0.7", "share of dense"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for name in spot.BACKBONES:
        dense = spot.gmacs(spot.create_model(name, rho=None, img_size=args.img_size), args.img_size)
        model = spot.create_model(name, rho=0.7, img_size=args.img_size)
        cells = [spot.flops.macs(model, args.img_size, rho=r) / 1e9 for r in RHOS]
        share = spot.predictor_gmacs(model, args.img_size)
        row = [name, f"{dense:.2f}"] + [f"{c:.2f}" for c in cells] + [f"{share:.3f}", f"{share / dense:.1%}"]
        lines.append("| " + " | ".join(row) + " |")
    table = "\n".join(lines)
    print(table)
    return table


if __name__ == "__main__":
    main()
