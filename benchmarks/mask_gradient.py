#!/usr/bin/env python
"""SPOT fine-tuned from one dense cluttered-digits model with each form of the masked-attention gradient.

    python benchmarks/mask_gradient.py --dense models:/spot-deit_t-dense/1 --steps 200

In one process, for ``mask_grad`` in ("bounded", "dynamicvit") (``spot.masking.policy_softmax``): the same
SPOT model (predictors from the same seed) is fine-tuned for ``--steps`` steps with the project's optimiser
(``pipelines.training.recipe.build_optimizer``), ``spot_loss`` and the dense model as frozen teacher, on the
train
shards through the DALI loader. Reported per form: the train-mode keep rate per stage against rho^k (mean
of the last 50 steps), the share of the cross-entropy gradient in the predictors against the rate loss's
at the start, and in prune mode on the val canvases (``pipelines.data.cluttered_digits``, not JPEG-coded):
top-1 at rho 0.7 and 0.5 and the share of the digit's patches still present after each stage.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import spot  # noqa: E402
from pipelines.data.cluttered_digits import digit_patches, make_canvases  # noqa: E402
from pipelines.data.loader import make_loader  # noqa: E402
from pipelines.tracking.registry import load_model  # noqa: E402
from pipelines.tracking.uri import move_credentials_to_env, resolve_tracking_uri  # noqa: E402
from pipelines.training.recipe import build_optimizer, freeze_embeddings  # noqa: E402
from spot.losses import classification_loss, rate_loss, spot_loss  # noqa: E402

FORMS = ("bounded", "dynamicvit")
RECIPE = {"lr": 1e-4, "predictor_lr": 1e-3, "weight_decay": 0.05, "min_lr": 1e-6, "epochs": 1,
          "warmup_epochs": 0.1, "freeze_epochs": 0}  # the demo's SPOT fine-tuning
LAMBDAS = {"rate": 2.0, "kl": 0.5, "token": 0.0}


def val_canvases(normalization: dict) -> tuple[torch.Tensor, torch.Tensor, list]:
    canvases = make_canvases("val")
    pixels = torch.from_numpy(np.stack([c.pixels for c in canvases])).float()[:, None] / 255
    mean, std = (torch.tensor(normalization[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    images = (pixels.expand(-1, 3, -1, -1) - mean) / std
    return images, torch.tensor([c.label for c in canvases]), [c.box for c in canvases]


@torch.no_grad()
def prune_mode(model: torch.nn.Module, rho: float, val: tuple) -> dict:
    """Top-1 and the digit's patches left after each stage, at ``rho``, in prune mode."""
    images, labels, boxes = val
    sparse = spot.create_model(**{**model.spot_config, "rho": rho})
    sparse.load_state_dict(model.state_dict())
    sparse.eval()
    patch = sparse.patch_embed.patch_size[0]
    hits, left = 0, None
    for start in range(0, len(labels), 200):
        logits, info = sparse(images[start : start + 200], return_info=True)
        hits += int((logits.argmax(1) == labels[start : start + 200]).sum())
        for i, box in enumerate(boxes[start : start + 200]):
            digit = set(digit_patches(box, patch))
            share = [len(digit & set(kept[i].tolist())) / len(digit) for kept in info.kept_indices]
            left = share if left is None else [a + b for a, b in zip(left, share, strict=True)]
    return {"top1": 100 * hits / len(labels), "digit_left": [v / len(labels) for v in left]}


def gradient_ratio(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, rho: float) -> float:
    """|grad CE| / |grad l1 * rate| in the predictors, one training-mode batch."""
    logits, info = model(images, return_info=True)
    params = list(model.spot_predictors.parameters())
    norms = []
    for loss in (classification_loss(logits, labels), LAMBDAS["rate"] * rate_loss(info.masks, rho)):
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        norms.append(torch.stack([g.norm() for g in grads if g is not None]).norm().item())
    return norms[0] / norms[1]


def finetune(dense: torch.nn.Module, form: str, args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    model = spot.create_model(**{**dense.spot_config, "rho": args.rho, "mask_grad": form})
    fresh = [n for n, _ in model.named_parameters() if n.startswith("spot_predictors.")]
    model.load_state_dict(dense.state_dict(), strict=False)
    freeze_embeddings(model)
    normalization = spot.input_normalization(dense)
    size = dense.spot_config["img_size"]
    loader = make_loader(args.data, "train", batch_size=args.batch_size, img_size=size, train=True,
                         crop_scale=1.0, hflip=0.0, seed=args.seed, **normalization)
    optimizer, scheduler = build_optimizer(model, SimpleNamespace(**RECIPE), fresh,
                                           steps_per_epoch=args.steps)
    model.train()
    kept, step, ratio, began = [], 0, None, time.perf_counter()
    while step < args.steps:
        for images, labels in loader:
            if ratio is None:
                ratio = gradient_ratio(model, images, labels, args.rho)
            logits, info = model(images, return_info=True)
            with torch.no_grad():
                teacher = dense(images)
            loss, _ = spot_loss(logits, labels, info, rho=args.rho, lambdas=LAMBDAS, teacher_logits=teacher,
                                label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            scheduler.step_update(step)
            kept.append([float(m.detach().mean()) for m in info.masks])
            if step == args.steps:
                break
    last = torch.tensor(kept[-50:]).mean(0).tolist()
    model.eval()
    val = val_canvases(normalization)
    return {"form": form, "train_kept": last, "grad_ratio": ratio, "seconds": time.perf_counter() - began,
            **{rho: prune_mode(model, rho, val) for rho in (0.7, 0.5)}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dense", required=True, help="dense cluttered-digits model (models:/ URI or run)")
    parser.add_argument("--data", default="data/cluttered-digits", help="cluttered-digits shard directory")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rho", type=float, default=0.7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mlflow-uri", help="tracking URI of models:/ URIs (default: ./mlflow.db)")
    args = parser.parse_args(argv)
    mlflow.set_tracking_uri(resolve_tracking_uri(move_credentials_to_env(args.mlflow_uri), Path.cwd()))
    dense = load_model(args.dense).eval()
    val = val_canvases(spot.input_normalization(dense))
    with torch.no_grad():
        hits = sum(int((dense(val[0][i : i + 200]).argmax(1) == val[1][i : i + 200]).sum())
                   for i in range(0, len(val[1]), 200))
    print(f"dense: top-1 {100 * hits / len(val[1]):.2f} % on {len(val[1])} val canvases")
    targets = "/".join(f"{args.rho**k:.2f}" for k in (1, 2, 3))
    print(f"\n| mask_grad | CE / rate gradient (start) | train kept (target {targets}) | top-1 rho 0.7 | "
          "digit left s1/s2/s3, rho 0.7 | top-1 rho 0.5 | digit left, rho 0.5 | s |")
    print("| --- | ---: | --- | ---: | --- | ---: | --- | ---: |")
    for form in FORMS:
        r = finetune(dense, form, args)
        fmt = lambda values: "/".join(f"{v:.2f}" for v in values)  # noqa: E731
        print(f"| {form} | {r['grad_ratio']:.3g} | {fmt(r['train_kept'])} | {r[0.7]['top1']:.2f} | "
              f"{fmt(r[0.7]['digit_left'])} | {r[0.5]['top1']:.2f} | {fmt(r[0.5]['digit_left'])} | "
              f"{r['seconds']:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
