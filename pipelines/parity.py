#!/usr/bin/env python
"""Check any runtime's outputs of an exported SPOT model against the eager PyTorch model.

    # 1. seeded images to feed the runtime (float32 .npy, (B, 3, S, S), normalised like training)
    python pipelines/parity.py --model models:/spot-lvvit_s@champion --write-images images.npy --batch 7
    # 2. run them in the runtime (TensorRT, ORT with another provider, ...) and save every output by name
    #    (logits, kept_0, kept_1, kept_2) with numpy.savez("outputs.npz", logits=..., kept_0=..., ...)
    # 3. compare: the same kept tokens per stage and per image, logits within 1e-4
    python pipelines/parity.py --model models:/spot-lvvit_s@champion --images images.npy --outputs outputs.npz
    # or let this script run an ONNX file in ONNX Runtime (CPU) at several batch sizes
    python pipelines/parity.py --model models:/spot-lvvit_s@champion --onnx model.onnx --batch 1 7 64

Exits 0 when every check holds, 1 otherwise, printing per batch: how many images differ in their kept
tokens (per stage), the logits' max-abs error where the tokens agree, and any invalid selection (wrong
count, duplicates, out of range, a token kept after an earlier stage dropped it). For the ``random``
selector the runtime draws its own scores, so its indices are checked for validity and its logits against
eager keeping the same tokens.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script from a checkout: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
from mlflow.exceptions import MlflowException

from pipelines.tracking.registry import load_model
from pipelines.utils.cli import Parser, bad_input
from pipelines.utils.errors import TrackingError
from spot.export import LOGITS_ATOL, check_onnx, check_outputs


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="parity", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint dir or MLflow model URI of the exported model")
    p.add_argument("--write-images", help="write seeded random images (.npy) and exit")
    p.add_argument("--images", help="the images (.npy) the runtime was given")
    p.add_argument("--outputs", help="the runtime's outputs (.npz, arrays named like the ONNX outputs)")
    p.add_argument("--onnx", help="an ONNX file to run in ONNX Runtime (CPU) instead")
    p.add_argument("--batch", type=int, nargs="+", default=[7])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--atol", type=float, default=LOGITS_ATOL)
    args = p.parse_args(argv)
    try:
        model = load_model(args.model)
    except (FileNotFoundError, ValueError, TrackingError, MlflowException) as err:
        return bad_input("parity", err)
    side = int(model.patch_embed.img_size[0])
    if args.write_images:
        rng = np.random.default_rng(args.seed)
        np.save(args.write_images, rng.standard_normal((args.batch[0], 3, side, side), dtype=np.float32))
        return 0
    if args.onnx:
        reports = check_onnx(model, args.onnx, tuple(args.batch), seed=args.seed)
    elif args.images and args.outputs:
        images = np.load(args.images)
        with np.load(args.outputs) as data:
            got = {name: data[name] for name in data.files}
        reports = {images.shape[0]: check_outputs(model, images, got, args.atol)}
    else:
        p.error("give --write-images, --onnx, or --images with --outputs")
    for batch, r in reports.items():
        status = "ok" if r["ok"] else "FAILED"
        print(f"batch {batch}: {status}: {json.dumps({k: v for k, v in r.items() if k != 'ok'})}")
    return 0 if all(r["ok"] for r in reports.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
