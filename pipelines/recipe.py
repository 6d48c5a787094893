"""The fine-tuning recipe: paper defaults, optimizer groups, warm-up + cosine schedule, mixup / cutmix.

SPOT (Sec. 6.2) fine-tunes with AdamW, lr 1e-3 for the backbone and 1e-2 for the relevance modules, global
batch 512, 80 epochs; the rest follows DynamicViT, whose setup SPOT adopts: linear warm-up then cosine decay
to ``min_lr``, weight decay 0.05 (none on biases, norms and embeddings), the pretrained backbone frozen for
the first epochs while the new modules warm up, ``cls_token`` / ``pos_embed`` frozen throughout, mixup 0.8,
cutmix 1.0, label smoothing 0.1, RandAugment, random resized crops (8-100 % of the area), horizontal flips.
"""

from __future__ import annotations

import math
from collections.abc import Collection

import torch
from timm.data import Mixup
from torch import nn

PAPER_RECIPE: dict = {
    "epochs": 80,
    "batch_size": 512,
    "lr": 1e-3,
    "predictor_lr_scale": 10.0,  # predictor lr = 10 x lr unless given
    "min_lr": 1e-6,
    "weight_decay": 0.05,
    "warmup_epochs": 5,
    "freeze_epochs": 5,
    "mixup": 0.8,
    "cutmix": 1.0,
    "label_smoothing": 0.1,
    "randaugment": True,
    "crop_scale": 0.08,  # RandomResizedCrop area (0.08, 1)
    "hflip": 0.5,
}
FROZEN_WHEN_PRETRAINED = ("cls_token", "pos_embed")
PREDICTOR_PREFIX = "spot_predictors."


def freeze_embeddings(model: nn.Module) -> list[str]:
    """Stop training ``cls_token`` and ``pos_embed`` (DynamicViT, when fine-tuning); returns their names."""
    frozen = [n for n, p in model.named_parameters() if n in FROZEN_WHEN_PRETRAINED]
    for name in frozen:
        model.get_parameter(name).requires_grad_(False)
    return frozen


def param_groups(
    model: nn.Module, *, lr: float, predictor_lr: float, weight_decay: float, fresh: Collection[str]
) -> list[dict]:
    """AdamW groups: predictors at ``predictor_lr``; the rest at ``lr``, with no decay on 1-d parameters.

    ``fresh`` names parameters that did not come from the pretrained checkpoint (predictors, a re-initialised
    head): they train from the first step. Every other group has ``"pretrained": True`` and is held at lr 0
    during the freeze epochs (see :func:`lr_factor`). Parameters without ``requires_grad`` are left out.
    """
    buckets: dict[tuple[bool, bool, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        predictor = name.startswith(PREDICTOR_PREFIX)
        no_decay = param.ndim <= 1 or name.endswith(".bias")
        buckets.setdefault((predictor, no_decay, name not in fresh), []).append(param)
    return [
        {
            "params": params,
            "lr": predictor_lr if predictor else lr,
            "weight_decay": 0.0 if no_decay else weight_decay,
            "pretrained": pretrained,
            "name": f"{'predictor' if predictor else 'backbone'}{'_no_decay' if no_decay else ''}"
            f"{'' if pretrained else '_fresh'}",
        }
        for (predictor, no_decay, pretrained), params in sorted(buckets.items())
    ]


def lr_factor(
    step: int,
    *,
    steps_per_epoch: int,
    epochs: int,
    warmup_epochs: float,
    min_ratio: float,
    frozen_epochs: int,
) -> float:
    """Multiplier of a group's base lr at optimizer ``step``: 0 while frozen, linear warm-up, then cosine.

    The cosine runs from the end of warm-up to the last step and ends at ``min_ratio`` (min_lr / base lr).
    """
    if step < frozen_epochs * steps_per_epoch:
        return 0.0
    warmup = int(warmup_epochs * steps_per_epoch)
    if step < warmup:
        return (step + 1) / warmup
    total = max(epochs * steps_per_epoch - warmup, 1)
    progress = min((step - warmup) / total, 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(
    model: nn.Module, config: dict, fresh: Collection[str]
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over :func:`param_groups` and its per-step scheduler (call ``scheduler.step()`` every step).

    ``config`` keys: ``lr``, ``predictor_lr``, ``weight_decay``, ``min_lr``, ``epochs``, ``warmup_epochs``,
    ``freeze_epochs``, ``steps_per_epoch``. The freeze applies to pretrained groups only, and only when the
    model has something fresh to warm up.
    """
    groups = param_groups(
        model,
        lr=config["lr"],
        predictor_lr=config["predictor_lr"],
        weight_decay=config["weight_decay"],
        fresh=fresh,
    )
    optimizer = torch.optim.AdamW(groups)
    freeze = config["freeze_epochs"] if fresh else 0

    def factor_for(group: dict):
        def factor(step: int) -> float:
            return lr_factor(
                step,
                steps_per_epoch=config["steps_per_epoch"],
                epochs=config["epochs"],
                warmup_epochs=config["warmup_epochs"],
                min_ratio=min(config["min_lr"] / group["lr"], 1.0) if group["lr"] > 0 else 0.0,
                frozen_epochs=freeze if group["pretrained"] else 0,
            )

        return factor

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, [factor_for(g) for g in optimizer.param_groups])
    return optimizer, scheduler


def build_mixup(config: dict, num_classes: int) -> Mixup | None:
    """timm ``Mixup`` (soft targets, label smoothing included) or None when mixup and cutmix are off."""
    if config["mixup"] <= 0 and config["cutmix"] <= 0:
        return None
    return Mixup(
        mixup_alpha=config["mixup"],
        cutmix_alpha=config["cutmix"],
        label_smoothing=config["label_smoothing"],
        num_classes=num_classes,
    )
