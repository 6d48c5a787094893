#!/usr/bin/env python
"""Selectors on the harder cluttered digits (``cluttered-digits-hard``), in one process, per seed.

    python benchmarks/hard_task.py --seeds 0 1 2 --fresh

Per seed: a dense DeiT (the digits preset's architecture, 64 patches) trained from scratch (AdamW lr 5e-4,
batch 32, a warm-up epoch, 6 epochs; ``--fresh``: new training canvases each epoch); SPOT at rho
0.7 fine-tuned from it with the library's ``spot_loss`` (the dense model is its frozen teacher; the
digits fine-tuning learning rates); the class-attention model fine-tuned from it under the same recipe
(paper Table 7); then top-1 on the val split for dense, random and class attention on the dense weights,
fine-tuned class attention, and SPOT, at rho 0.7 and 0.5, and the share of the digit's patches each
selector still holds after its last stage. No Ray, no shards: the same library code on in-memory canvases,
so that three seeds fit on a small CPU machine. Unlike ``finetune.py`` the recipe has no mixup, freezing or
frozen embeddings: label smoothing 0.1, AdamW (wd 0.05), linear warm-up (a quarter epoch when fine-tuning),
cosine, batch 64 when fine-tuning. Prints one markdown table per seed and the mean / spread over seeds.
``--jpeg 90``: the canvases as shards at that JPEG quality hold them; ``--pipeline-recipe [dense|finetune]``:
finetune.py's recipe with the hard preset, in both runs or one (docs/benchmarks.md: what made the pipeline
differ). ``--clutter-pieces`` / ``--fragment`` draw a variant of the task (more or larger clutter fragments),
normalised by its own train split's pixel mean / std (seed 0), as the built-in sizes are by theirs (options
that draw a built-in size keep its recorded statistics);
``--canvas`` draws it on a larger canvas (more tokens), ``--train-per-scan`` with more training canvases
(a larger train split). ``--rho 0.7 0.5``: both selectors fine-tuned at each rate, each rate compared with
its own models (paper Table 7).
"""

from __future__ import annotations

import argparse
import io
import math
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import spot  # noqa: E402
from pipelines.data import hard_cluttered_digits as task  # noqa: E402
from pipelines.data.cluttered_digits import digit_patches  # noqa: E402
from pipelines.data.shards import Item, encode  # noqa: E402
from pipelines.training import recipe  # noqa: E402
from pipelines.training.config import (  # noqa: E402
    BUILTIN_FINETUNE,
    RunConfig,
    default_predictor_lr,
    task_preset,
)

# the digits preset's architecture; img_size is the canvas's side
ARCH = {"patch_size": 8, "depth": 6, "embed_dim": 64, "num_heads": 4, "num_classes": 10}
RHOS = (0.7, 0.5)


def as_in_shards(pixels: np.ndarray, quality: int) -> np.ndarray:
    """A grey canvas through the shard writer's JPEG at ``quality``, decoded to RGB (H, W, 3)."""
    data, _, _ = encode(Item("canvas", 0, pixels=pixels, jpeg_quality=quality), None)
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def tensors(split: str, seed: int, drawing: task.Drawing, jpeg: int | None = None
            ) -> tuple[torch.Tensor, torch.Tensor, list[list[int]]]:
    """``split``'s canvases as normalised inputs (N, 3, H, W; grey as drawn: N, 1, H, W, which the model's
    batches expand), their labels, and the digit's patches."""
    canvases = drawing.make_canvases(split, seed)
    if jpeg:  # (N, 3, H, W), as the pipeline's loader decodes shards written at JPEG quality ``jpeg``
        pixels = np.stack([as_in_shards(c.pixels, jpeg) for c in canvases]).astype(np.float32) / 255
        x = torch.from_numpy((pixels - drawing.pixel_mean) / drawing.pixel_std).permute(0, 3, 1, 2)
    else:
        pixels = np.stack([c.pixels for c in canvases]).astype(np.float32) / 255
        x = torch.from_numpy((pixels - drawing.pixel_mean) / drawing.pixel_std)[:, None]
    y = torch.tensor([c.label for c in canvases])
    boxes = [digit_patches(c.box, ARCH["patch_size"], drawing.canvas) for c in canvases]
    return x.contiguous(), y, boxes


def rgb(batch: torch.Tensor) -> torch.Tensor:
    """A batch of :func:`tensors` as the model's 3 channels."""
    return batch.expand(-1, 3, -1, -1)


def train(model, teacher, x, y, *, epochs, lr, predictor_lr, rho, seed, batch=64, warmup=0.25, fresh=None,
          pipeline=None, part=None, min_lr=None):
    """AdamW, linear warm-up (``warmup`` epochs) + cosine per step; SPOT loss with teacher when sparse.
    ``fresh(epoch)``: the (x, y) of each epoch after the first (new canvases), else ``x, y`` every epoch.
    ``pipeline``: a RunConfig whose recipe replaces this one (finetune.py's optimizer groups, weight decay,
    schedule, freezes and batch size; the other arguments but ``epochs`` / ``rho`` / ``seed`` unused).
    ``part``: one piece of that recipe in this loop: ``"decay-groups"`` (``recipe.param_groups``: no weight
    decay on biases, norms, ``pos_embed``, ``cls_token``) or ``"schedule"`` (``recipe.WarmupCosine``: timm's
    warm-up + cosine to ``min_lr``)."""
    torch.manual_seed(seed)
    scheduler = None
    if pipeline is not None:
        batch = pipeline.batch_size
        if teacher is not None:  # finetune.py with --pretrained
            recipe.freeze_embeddings(model)
        new = {n for n, _ in model.named_parameters() if teacher is None or n.startswith("spot_predictors")}
        opt, scheduler = recipe.build_optimizer(model, pipeline, new, steps_per_epoch=len(x) // batch)
    else:
        groups = [{"params": [p for n, p in model.named_parameters() if not n.startswith("spot_predictors")],
                   "lr": lr},
                  {"params": [p for n, p in model.named_parameters() if n.startswith("spot_predictors")],
                   "lr": predictor_lr}]
        if part == "decay-groups":  # the recipe's groups, every parameter fresh (nothing held frozen)
            groups = recipe.param_groups(model, lr=lr, predictor_lr=predictor_lr, weight_decay=0.05,
                                         fresh={n for n, _ in model.named_parameters()})
        opt = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=0.05)
        if part == "schedule":
            scheduler = recipe.WarmupCosine(opt, total_steps=epochs * (len(x) // batch),
                                            warmup_steps=int(warmup * (len(x) // batch)), min_lr=min_lr,
                                            freeze_steps=0)
    steps = epochs * (len(x) // batch)
    warm = max(1, int(warmup * (len(x) // batch)))
    base = [g["lr"] for g in opt.param_groups]
    lambdas = {"rate": 2.0, "kl": 0.5 if teacher is not None else 0.0, "token": 0.0}
    step = 0
    model.train()
    for epoch in range(epochs):
        began = time.monotonic()
        if fresh is not None and epoch > 0:
            x, y = fresh(epoch)
        order = torch.randperm(len(x))
        for i in range(0, len(x) - batch + 1, batch):
            idx = order[i : i + batch]
            cosine = 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))
            scale = step / warm if step < warm else cosine
            for g, b in zip(opt.param_groups, base, strict=True) if scheduler is None else ():
                g["lr"] = b * max(scale, 1e-3)
            logits, info = model(rgb(x[idx]), return_info=True)
            t_logits = None
            if teacher is not None:
                with torch.no_grad():
                    t_logits = teacher(rgb(x[idx]))
            loss, _ = spot.spot_loss(logits, y[idx], info, rho=rho or 1.0, lambdas=lambdas,
                                     teacher_logits=t_logits, label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if scheduler is not None:
                scheduler.step_update(step)
            if step % 100 == 0:
                print(f"    step {step}: loss {loss.item():.3f}", file=sys.stderr, flush=True)
        print(f"  epoch {epoch}: loss {loss.item():.3f} ({time.monotonic() - began:.0f} s)", file=sys.stderr,
              flush=True)
    return model.eval()


def at(model, rho, selector):
    out = spot.create_model(**{**model.spot_config, "rho": rho, "selector": selector})
    out.load_state_dict(model.state_dict(), strict=selector != "learned" or model.spot_predictors is not None)
    return out.eval()


@torch.inference_mode()
def evaluate(model, x, y, boxes, seed=0):
    """(top-1, share of the digit's patches kept after the last stage)."""
    torch.manual_seed(seed)
    correct, held, total = 0, 0, 0
    for i in range(0, len(x), 256):
        logits, info = model(rgb(x[i : i + 256]), return_info=True)
        correct += int((logits.argmax(-1) == y[i : i + 256]).sum())
        if info.kept_indices:
            for kept, box in zip(info.kept_indices[-1].tolist(), boxes[i : i + 256], strict=True):
                held += len(set(kept) & set(box))
                total += len(box)
    return correct / len(x), (held / total if total else 1.0)


def builtin_or_variant(asked: task.Drawing) -> task.Drawing:
    """The built-in drawing ``asked`` is (its recorded pixel statistics), else a variant normalised by its own
    train split's (seed 0), as the built-in ones are by theirs."""
    for builtin in task.SOURCES.values():
        if replace(asked, pixel_mean=builtin.pixel_mean, pixel_std=builtin.pixel_std) == builtin:
            return builtin
    mean, std = asked.pixel_stats("train")
    drawing = replace(asked, pixel_mean=mean, pixel_std=std)
    print(f"  variant {drawing}", file=sys.stderr, flush=True)
    return drawing


def run_seed(seed: int, args) -> dict[str, float]:
    started = time.monotonic()
    drawing = builtin_or_variant(replace(task.TASK, canvas=args.canvas, clutter_pieces=args.clutter_pieces,
                                         fragment=args.fragment, train_per_scan=args.train_per_scan))
    xt, yt, _ = tensors("train", seed, drawing, args.jpeg)
    xv, yv, boxes = tensors("val", seed, drawing, args.jpeg)
    torch.manual_seed(seed)
    arch = {**ARCH, "img_size": drawing.canvas}
    dense = spot.create_model("deit_t", rho=None, **arch)
    fresh = None
    if args.fresh:  # new training canvases each dense epoch (seeds apart from each other's)
        fresh = lambda epoch: tensors("train", 1000 * (seed + 1) + epoch, drawing, args.jpeg)[:2]  # noqa: E731
    preset = None
    if args.pipeline_recipe or args.dense_part:  # the hard preset, as finetune.py / demo.py resolve it
        source = next((name for name, builtin in task.SOURCES.items() if builtin == drawing),
                      "cluttered-digits-hard")  # a variant: the 64 px preset's recipe
        preset = RunConfig(**{**task_preset(source), "img_size": drawing.canvas, "rho": None,
                              "epochs": args.dense_epochs})
    train(dense, None, xt, yt, epochs=args.dense_epochs, lr=args.dense_lr, predictor_lr=args.dense_lr,
          rho=None, seed=seed, batch=args.dense_batch, warmup=args.dense_warmup, fresh=fresh,
          pipeline=preset if args.pipeline_recipe in ("both", "dense") else None, part=args.dense_part,
          min_lr=preset.min_lr if preset else None)
    teacher = at(dense, None, "learned")
    rows = {}
    rows["dense"] = evaluate(dense, xv, yv, boxes)
    for rho in RHOS:
        for selector in ("random", "cls_attn_avg"):
            rows[f"{selector} (training-free) rho {rho}"] = evaluate(at(dense, rho, selector), xv, yv, boxes)
    for name, (acc, _) in rows.items():  # before the fine-tuning, in case a run is cut short
        print(f"  {name}: {100 * acc:.2f}", file=sys.stderr, flush=True)
    finetuned = {}  # (selector, rho fine-tuned at) -> model
    for tuned_rho in args.rho:
        for selector in ("cls_attn_avg", "learned"):
            torch.manual_seed(seed)
            model = spot.create_model("deit_t", rho=tuned_rho, selector=selector, **arch)
            missing = model.load_state_dict(dense.state_dict(), strict=False).missing_keys
            assert all(k.startswith("spot_predictors.") for k in missing), missing
            tuned = None
            if args.pipeline_recipe in ("both", "finetune"):
                tuned = replace(preset, **{**BUILTIN_FINETUNE[source], "rho": tuned_rho,
                                           "epochs": args.spot_epochs})
                tuned.predictor_lr = default_predictor_lr(tuned.lr)  # as resolve_config derives it
            finetuned[selector, tuned_rho] = train(
                model, teacher, xt, yt, epochs=args.spot_epochs, lr=args.lr, predictor_lr=args.predictor_lr,
                rho=tuned_rho, seed=seed, pipeline=tuned)
    for rho in RHOS:  # one fine-tuning rate: its models at every rho; several: each rho with its own
        tuned_rho = args.rho[0] if len(args.rho) == 1 else rho
        for selector, name in (("cls_attn_avg", "cls_attn_avg"), ("learned", "SPOT")):
            rows[f"{name} (fine-tuned at {tuned_rho}) rho {rho}"] = evaluate(
                at(finetuned[selector, tuned_rho], rho, selector), xv, yv, boxes)
    print(f"\nseed {seed} ({time.monotonic() - started:.0f} s)\n")
    print("| row | top-1 | digit patches kept |\n|---|---|---|")
    for name, (acc, held) in rows.items():
        print(f"| {name} | {100 * acc:.2f} | {held:.2f} |", flush=True)
    return {name: acc for name, (acc, _) in rows.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--dense-epochs", type=int, default=6)
    parser.add_argument("--dense-lr", type=float, default=5e-4)
    parser.add_argument("--dense-batch", type=int, default=32)
    parser.add_argument("--dense-warmup", type=float, default=1.0, help="warm-up epochs of the dense run")
    parser.add_argument("--fresh", action="store_true", help="new training canvases each dense epoch")
    parser.add_argument("--jpeg", type=int, metavar="QUALITY",
                        help="train and validate on the canvases through the shard writer's JPEG at QUALITY "
                             "(90: as the hard shards held them before 100)")
    parser.add_argument("--pipeline-recipe", nargs="?", const="both", choices=("both", "dense", "finetune"),
                        help="train with finetune.py's recipe and the hard source's preset (optimizer "
                             "groups, weight decay, schedule, frozen embeddings, batch 32), not this loop's, "
                             "in both the dense and the fine-tuning runs or one of them")
    parser.add_argument("--dense-part", choices=("decay-groups", "schedule"),
                        help="one piece of finetune.py's recipe in this loop's dense run: its weight decay "
                             "groups or its warm-up + cosine schedule (with --pipeline-recipe finetune: the "
                             "fine-tuning runs take the whole recipe)")
    parser.add_argument("--spot-epochs", type=int, default=2)
    parser.add_argument("--rho", type=float, nargs="+", default=[0.7],
                        help="rho SPOT and class attention are fine-tuned at; several: each compared rho "
                             f"({' '.join(map(str, RHOS))}) with the models fine-tuned at it (paper Table 7)")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--predictor-lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clutter-pieces", type=int, default=task.TASK.clutter_pieces,
                        help="clutter fragments per canvas (a variant of the task)")
    parser.add_argument("--fragment", type=int, default=task.TASK.fragment,
                        help="side of a clutter fragment in scan pixels, 1-8 (a variant of the task)")
    parser.add_argument("--train-per-scan", type=int, default=task.TASK.train_per_scan,
                        help="training canvases per scan of the train split's 1437 (a variant of the task: "
                             "more distinct training canvases)")
    parser.add_argument("--canvas", type=int, default=task.TASK.canvas,
                        help="side of the canvas in px, a multiple of the 8 px patch (a variant of the task: "
                             "96 is 144 tokens)")
    args = parser.parse_args(argv)
    if args.dense_part and args.pipeline_recipe in ("both", "dense"):
        parser.error(f"--dense-part {args.dense_part} is a piece of the dense recipe: not with "
                     f"--pipeline-recipe {args.pipeline_recipe}, which applies all of it")
    if len(args.rho) > 1 and sorted(args.rho) != sorted(RHOS):
        compared = " ".join(map(str, RHOS))
        parser.error(f"--rho: several fine-tuning rates must be the compared ones, {compared}; "
                     f"not {' '.join(map(str, args.rho))}")
    if args.canvas % ARCH["patch_size"] or args.canvas < task.DIGIT_SIDE:
        parser.error(f"--canvas must be a multiple of {ARCH['patch_size']} px of at least {task.DIGIT_SIDE}, "
                     f"not {args.canvas}")
    if args.train_per_scan < 1:
        parser.error(f"--train-per-scan must be at least 1, not {args.train_per_scan}")
    if not 1 <= args.fragment <= 8 or args.clutter_pieces < 0:
        parser.error(f"--fragment must be 1-8 and --clutter-pieces >= 0, not {args.fragment}, "
                     f"{args.clutter_pieces}")
    torch.set_num_threads(args.threads)
    per_seed = [run_seed(s, args) for s in args.seeds]
    print(f"\nmean and spread (max - min) over seeds {args.seeds}\n")
    print("| row | top-1 mean | spread |\n|---|---|---|")
    for name in per_seed[0]:
        values = [100 * r[name] for r in per_seed]
        print(f"| {name} | {statistics.fmean(values):.2f} | {max(values) - min(values):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
