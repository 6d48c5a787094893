"""The fine-tuning recipe: paper defaults, optimizer groups, warm-up + cosine schedule, mixup / cutmix.

SPOT (Sec. 6.2) fine-tunes with AdamW, lr 1e-3 for the backbone and 1e-2 for the relevance modules, global
batch 512, 80 epochs; the rest follows DynamicViT, whose setup SPOT adopts: linear warm-up then cosine decay
to ``min_lr``, weight decay 0.05 (none on biases, norms and embeddings), the pretrained backbone frozen for
the first epochs while the new modules warm up, ``cls_token`` / ``pos_embed`` frozen throughout, mixup 0.8,
cutmix 1.0, label smoothing 0.1, RandAugment, random resized crops (8-100 % of the area), horizontal flips.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Protocol

import torch
from timm.data import Mixup
from timm.optim import param_groups_weight_decay
from timm.scheduler import CosineLRScheduler
from torch import nn

from spot.config import PREDICTOR_PREFIX

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


class RecipeOptions(Protocol):
    """The options the recipe reads, by attribute (a :class:`~pipelines.training.config.RunConfig`)."""

    lr: float
    predictor_lr: float
    min_lr: float
    weight_decay: float
    epochs: int
    warmup_epochs: float
    freeze_epochs: int
    mixup: float
    cutmix: float
    label_smoothing: float


def freeze_embeddings(model: nn.Module) -> list[str]:
    """Stop training ``cls_token`` and ``pos_embed`` (DynamicViT, when fine-tuning); returns their names."""
    frozen = [n for n, p in model.named_parameters() if n in FROZEN_WHEN_PRETRAINED]
    for name in frozen:
        model.get_parameter(name).requires_grad_(False)
    return frozen


def param_groups(
    model: nn.Module, *, lr: float, predictor_lr: float, weight_decay: float, fresh: Collection[str]
) -> list[dict]:
    """AdamW groups: predictors at ``predictor_lr``, the rest at ``lr``; weight decay as timm decides it
    (``param_groups_weight_decay``: none on biases, norms and the model's ``no_weight_decay()`` names such
    as ``pos_embed`` / ``cls_token``).

    ``fresh`` names parameters that did not come from the pretrained checkpoint (predictors, a re-initialised
    head): they train from the first step. Every other group has ``"pretrained": True`` and is held at lr 0
    during the freeze epochs (see :class:`WarmupCosine`). Parameters without ``requires_grad`` are left out.
    """
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
    decided = param_groups_weight_decay(model, weight_decay, no_weight_decay_list=skip)
    no_decay_ids = {id(p) for group in decided if group["weight_decay"] == 0 for p in group["params"]}
    buckets: dict[tuple[bool, bool, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        predictor = name.startswith(PREDICTOR_PREFIX)
        no_decay = id(param) in no_decay_ids
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


class WarmupCosine(CosineLRScheduler):
    """timm's per-step schedule (linear warm-up from 0, then cosine to ``min_lr``), with the groups marked
    ``"pretrained"`` held at lr 0 for the first ``freeze_steps`` updates.

    Call ``step_update(n)`` after the ``n``-th optimizer step: the groups then hold the lr of update ``n + 1``
    (so the first update already has a non-zero warm-up lr).
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, *, total_steps: int, warmup_steps: int, min_lr: float,
        freeze_steps: int,
    ) -> None:
        self.freeze_steps = freeze_steps
        self.frozen = [bool(group.get("pretrained")) for group in optimizer.param_groups]
        super().__init__(
            optimizer, t_initial=max(total_steps - warmup_steps, 2), lr_min=min_lr, warmup_t=warmup_steps,
            warmup_lr_init=0.0, warmup_prefix=True, t_in_epochs=False,
        )
        self.step_update(0)

    def _get_lr(self, t: int) -> list[float]:
        lrs = super()._get_lr(t + 1)
        frozen = t < self.freeze_steps
        return [0.0 if frozen and held else lr for lr, held in zip(lrs, self.frozen, strict=True)]


def build_optimizer(
    model: nn.Module, options: RecipeOptions, fresh: Collection[str], *, steps_per_epoch: int
) -> tuple[torch.optim.AdamW, WarmupCosine]:
    """AdamW over :func:`param_groups` and its per-step scheduler (``scheduler.step_update(n)`` after step n).

    The freeze applies to pretrained groups only, and only when the model has something fresh to warm up.
    """
    groups = param_groups(
        model,
        lr=options.lr,
        predictor_lr=options.predictor_lr,
        weight_decay=options.weight_decay,
        fresh=fresh,
    )
    optimizer = torch.optim.AdamW(groups)
    steps = steps_per_epoch
    scheduler = WarmupCosine(
        optimizer,
        total_steps=options.epochs * steps,
        warmup_steps=int(options.warmup_epochs * steps),
        min_lr=options.min_lr,
        freeze_steps=(options.freeze_epochs if fresh else 0) * steps,
    )
    return optimizer, scheduler


def build_mixup(options: RecipeOptions, num_classes: int) -> Mixup | None:
    """timm ``Mixup`` (soft targets, label smoothing included) or None when mixup and cutmix are off."""
    if options.mixup <= 0 and options.cutmix <= 0:
        return None
    return Mixup(
        mixup_alpha=options.mixup,
        cutmix_alpha=options.cutmix,
        label_smoothing=options.label_smoothing,
        num_classes=num_classes,
    )
