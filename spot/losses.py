"""SPOT training objective (paper Eq. 11-15).

``L = L_cls + l1 * L_rate + l2 * L_pred + l3 * L_token``, with DynamicViT's conventions where the
paper leaves them open: the rate loss uses per-sample kept fractions of the cumulative masks, the KL
is ``KL(teacher || student)`` at temperature 1 with ``batchmean``, and the teacher inputs are
treated as constants (detached).
"""

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

_LAMBDA_KEYS = ("rate", "kl", "token")


class LossInfo(Protocol):
    """What :func:`spot_loss` reads from a model's ``info`` (see docs/design.md, model contract)."""

    masks: list[Tensor]
    tokens: Tensor
    keep: Tensor


def default_lambdas(backbone: str) -> dict[str, float]:
    """Paper weights of Eq. 15: l1 = 2 (rate), l2 = 0.5 (KL), l3 = 0 for DeiT and 10 for LV-ViT."""
    if backbone.startswith("deit_"):
        return {"rate": 2.0, "kl": 0.5, "token": 0.0}
    if backbone.startswith("lvvit_"):
        return {"rate": 2.0, "kl": 0.5, "token": 10.0}
    raise ValueError(
        f"no default loss weights for backbone {backbone!r}: expected a 'deit_*' or 'lvvit_*' name"
    )


def classification_loss(logits: Tensor, target: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Cross-entropy task loss (Eq. 11), computed in float32.

    ``target`` is either int64 class ids ``(B,)`` or soft targets ``(B, C)`` (mixup / cutmix).
    ``label_smoothing`` is applied to both forms; timm's ``Mixup`` already smooths its soft targets,
    so pass 0 with those.
    """
    if target.ndim == 1 and not target.is_floating_point():
        return F.cross_entropy(logits.float(), target, label_smoothing=label_smoothing)
    if target.ndim == 2 and target.is_floating_point() and target.shape == logits.shape:
        return F.cross_entropy(logits.float(), target.float(), label_smoothing=label_smoothing)
    raise ValueError(
        f"target must be int class ids of shape (B,) or float soft targets of the logits' shape "
        f"{tuple(logits.shape)}; got dtype {target.dtype} and shape {tuple(target.shape)}"
    )


def rate_loss(masks: list[Tensor], rho: float) -> Tensor:
    """Sparsity rate deviation (Eq. 12): mean over samples and stages of ``(kept_k - rho**k)**2``.

    ``masks[k - 1]`` is the ``(B, N0)`` cumulative keep mask of stage k; the kept fraction of a sample is
    its mask's mean over patches, so straight-through gradients reach the masks.
    """
    if not masks:
        raise ValueError("rate_loss needs at least one stage mask (Eq. 12 averages over K >= 1 stages)")
    if not 0.0 < rho <= 1.0:
        raise ValueError(f"rho must be in (0, 1], got {rho}")
    deviations = [(mask.float().mean(dim=1) - rho**k) ** 2 for k, mask in enumerate(masks, start=1)]
    return torch.stack(deviations).mean()


def kl_loss(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Prediction similarity (Eq. 13): ``KL(teacher || student)``, T = 1, batchmean, in float32."""
    return F.kl_div(
        F.log_softmax(student_logits.float(), dim=-1),
        F.log_softmax(teacher_logits.detach().float(), dim=-1),
        reduction="batchmean",
        log_target=True,
    )


def token_cosine_loss(student_tokens: Tensor, teacher_tokens: Tensor, keep: Tensor) -> Tensor:
    """Token similarity (Eq. 14): ``1 - cos(t'_m, t_m)`` averaged over the tokens kept at the end.

    Eq. 14 averages over an index m of "retained tokens"; like DynamicViT's token distillation we read
    m as running over every kept token of the batch (all ``B * N0`` positions pooled), so each kept token
    weighs the same whatever its sample's kept count. ``keep`` ``(B, N0)`` selects tokens (float masks
    by ``> 0.5``; no gradient flows through it). Returns 0, still attached to the student graph, when no
    token is kept.
    """
    if student_tokens.shape != teacher_tokens.shape or student_tokens.shape[:2] != keep.shape:
        raise ValueError(
            f"expected tokens (B, N0, C) of equal shape and keep (B, N0); got student "
            f"{tuple(student_tokens.shape)}, teacher {tuple(teacher_tokens.shape)}, keep {tuple(keep.shape)}"
        )
    selected = keep if keep.dtype == torch.bool else keep > 0.5
    if not selected.any():
        return student_tokens.float().sum() * 0.0
    cos = F.cosine_similarity(
        student_tokens[selected].float(), teacher_tokens[selected].detach().float(), dim=-1
    )
    return (1.0 - cos).mean()


def spot_loss(
    logits: Tensor,
    target: Tensor,
    info: LossInfo,
    *,
    rho: float,
    lambdas: dict[str, float],
    teacher_logits: Tensor | None = None,
    teacher_tokens: Tensor | None = None,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, dict[str, float]]:
    """Total SPOT loss (Eq. 15): ``CE + l1 * rate + l2 * KL + l3 * token``.

    ``lambdas`` holds exactly the keys ``rate``, ``kl``, ``token`` (see :func:`default_lambdas`). A term
    whose teacher input is missing counts as 0 and must then have weight 0; a dense model (no masks)
    has rate 0. Returns the total and its parts (``ce``, ``rate``, ``kl``, ``token``, ``total``) as
    python floats for logging.
    """
    if sorted(lambdas) != sorted(_LAMBDA_KEYS):
        raise ValueError(f"lambdas must have exactly the keys {_LAMBDA_KEYS}, got {tuple(lambdas)}")
    if any(weight < 0 for weight in lambdas.values()):
        raise ValueError(f"loss weights must be >= 0, got {lambdas}")
    if lambdas["kl"] > 0 and teacher_logits is None:
        raise ValueError(f"lambdas['kl'] = {lambdas['kl']} > 0 needs teacher_logits (Eq. 13)")
    if lambdas["token"] > 0 and teacher_tokens is None:
        raise ValueError(f"lambdas['token'] = {lambdas['token']} > 0 needs teacher_tokens (Eq. 14)")

    zero = logits.new_zeros((), dtype=torch.float32)
    parts = {
        "ce": classification_loss(logits, target, label_smoothing),
        "rate": zero,
        "kl": zero,
        "token": zero,
    }
    if info.masks:
        parts["rate"] = rate_loss(info.masks, rho)
    if teacher_logits is not None:
        parts["kl"] = kl_loss(logits, teacher_logits)
    if teacher_tokens is not None:
        parts["token"] = token_cosine_loss(info.tokens, teacher_tokens, info.keep)
    total = parts["ce"] + sum(lambdas[name] * parts[name] for name in _LAMBDA_KEYS)
    logged = {name: value.item() for name, value in parts.items()}
    logged["total"] = total.item()
    return total, logged
