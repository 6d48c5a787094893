"""ONNX Runtime against eager PyTorch for full-size models: kept indices and logits, per selector and batch.

    python benchmarks/onnx_parity.py --backbone deit_s lvvit_s --rho 0.7 --batches 1 7 64

Each model (random weights from timm's initialisation, seeded; ``--pretrained`` for a checkpoint) is
exported with ``spot.export.export_onnx`` and run in ONNX Runtime on seeded random images. Prints one row
per (backbone, selector, batch): images whose kept set differs at any stage, and the logits' max-abs error
where the selections agree. The ``random`` selector draws in the runtime: its row compares the logits
with eager keeping the tokens the runtime kept.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

import spot
from spot.config import SELECTORS
from spot.export import check_onnx, export_onnx


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", nargs="+", default=["deit_s", "lvvit_s"], choices=spot.BACKBONES)
    p.add_argument("--selector", nargs="+", default=list(SELECTORS), choices=SELECTORS)
    p.add_argument("--rho", type=float, default=0.7)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 7, 64])
    p.add_argument("--pretrained", default=None, help="a checkpoint for the backbone (one backbone only)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    rows = []
    print(f"{'backbone':>8} {'selector':>12} {'batch':>5} {'export_s':>8} {'indices':>9} {'differ':>6} "
          f"{'logits max-abs':>14}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.backbone:
            for selector in args.selector:
                torch.manual_seed(args.seed)
                model = spot.create_model(name, rho=args.rho, selector=selector, pretrained=args.pretrained)
                start = time.perf_counter()
                exported = export_onnx(model.eval(), Path(tmp) / f"{name}-{selector}.onnx")
                export_s = time.perf_counter() - start
                reports = check_onnx(model, exported.path, tuple(args.batches), seed=args.seed)
                for batch, r in reports.items():
                    rows.append({"backbone": name, "selector": selector, "batch": batch, **r})
                    print(
                        f"{name:>8} {selector:>12} {batch:>5} {export_s:>8.1f} {r['indices']:>9} "
                        f"{r['mismatched_images']:>6} {r['logits_max_abs']:>14.2e}",
                        flush=True,
                    )
                exported.path.unlink()
    return rows


if __name__ == "__main__":
    main()
