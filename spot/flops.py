"""Inference cost of a SPOT model in prune mode, in GMACs (the paper's "GFLOPs", as DeiT/DynamicViT).

Counted: every matrix multiply that runs at inference: patch embedding (or LV-ViT's conv stem),
qkv / projection / MLP linears and the two attention matmuls of each block (``2 * T^2 * C``) at the
block's real token count T, the relevance modules, token fusion if enabled, the classifier (and
LV-ViT's auxiliary head over the kept tokens). Not counted, by the same convention: norms, softmax,
activations, the element-wise attention statistics and gathers.
"""

from __future__ import annotations

from torch import nn

from spot.config import SpotConfig
from spot.schedule import keep_counts


def _linear_macs(module: nn.Module) -> int:
    """MACs per token of all ``nn.Linear`` layers in ``module``."""
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


def _conv_macs(conv: nn.Conv2d, size: tuple[int, int]) -> tuple[int, tuple[int, int]]:
    """MACs of a conv on a ``size`` input, and its output size."""
    h, w = (
        (s + 2 * p - d * (k - 1) - 1) // st + 1
        for s, p, d, k, st in zip(
            size, conv.padding, conv.dilation, conv.kernel_size, conv.stride, strict=True
        )
    )
    per_output = conv.in_channels // conv.groups * conv.kernel_size[0] * conv.kernel_size[1]
    return h * w * conv.out_channels * per_output, (h, w)


def _embed_macs(patch_embed: nn.Module, img_size: int) -> int:
    size, total = (img_size, img_size), 0
    for conv in (m for m in patch_embed.modules() if isinstance(m, nn.Conv2d)):
        macs, size = _conv_macs(conv, size)
        total += macs
    return total


def tokens_per_block(cfg: SpotConfig, depth: int, num_patches: int) -> list[int]:
    """Tokens (class token, patches, fused token) each block runs on in prune mode."""
    tokens, out = 1 + num_patches, []
    counts = keep_counts(num_patches, cfg.rho, cfg.num_stages) if not cfg.dense else []
    stage_of = {b: k for k, b in enumerate(cfg.stage_blocks)} if counts else {}
    for i in range(depth):
        if i in stage_of:
            tokens = 1 + counts[stage_of[i]] + int(cfg.fuse_dropped)
        out.append(tokens)
    return out


def macs(model: nn.Module, img_size: int = 224, rho: float | None = ...) -> int:
    """MACs of one image through ``model`` in prune mode; ``rho`` overrides the model's retention."""
    model = getattr(model, "module", model)
    cfg: SpotConfig = model.spot_options
    if rho is not ...:
        cfg = SpotConfig(**{**cfg.to_dict(), "rho": rho})
    patch = model.patch_embed.patch_size[0]
    if img_size % patch:
        raise ValueError(f"img_size {img_size} is not a multiple of the patch size {patch}")
    n0 = (img_size // patch) ** 2
    tokens = tokens_per_block(cfg, len(model.blocks), n0)
    total = _embed_macs(model.patch_embed, img_size)
    for t, blk in zip(tokens, model.blocks, strict=True):
        attn_width = blk.attn.qkv.out_features // 3
        total += t * (_linear_macs(blk.attn) + _linear_macs(blk.mlp)) + 2 * t * t * attn_width
    present = [n0] + keep_counts(n0, cfg.rho, cfg.num_stages)[:-1] if not cfg.dense else []
    for k, n in enumerate(present):
        if model.spot_predictors is not None:
            total += n * _linear_macs(model.stage_predictor(k))
        if cfg.fuse_dropped:  # weighted sum of the tokens present before the stage
            total += tokens[cfg.stage_blocks[k] - 1] * model.embed_dim
    total += _linear_macs(model.head)
    if hasattr(model, "aux_head"):
        total += (tokens[-1] - 1 - int(cfg.fuse_dropped and not cfg.dense)) * _linear_macs(model.aux_head)
    return total


def gmacs(model: nn.Module, img_size: int = 224) -> float:
    """GMACs of one ``img_size`` image in prune mode (what the paper reports as GFLOPs)."""
    return macs(model, img_size) / 1e9


def predictor_gmacs(model: nn.Module, img_size: int = 224) -> float:
    """The relevance modules' share of :func:`gmacs`."""
    model = getattr(model, "module", model)
    if model.spot_predictors is None:
        return 0.0
    stripped = macs(model, img_size)
    predictors, model.spot_predictors = model.spot_predictors, None
    try:
        return (stripped - macs(model, img_size)) / 1e9
    finally:
        model.spot_predictors = predictors


def rho_for_budget(model: nn.Module, budget_gmacs: float, img_size: int = 224, tol: float = 1e-4) -> float:
    """The largest retention rate rho in (0, 1] whose model costs at most ``budget_gmacs``.

    Cost is non-decreasing in rho (keep counts ``int(N0 * rho**k)``), so a bisection finds it.
    """
    budget = budget_gmacs * 1e9
    if macs(model, img_size, rho=1.0) <= budget:
        return 1.0
    lo, hi = tol, 1.0
    if macs(model, img_size, rho=lo) > budget:
        floor = macs(model, img_size, rho=lo) / 1e9
        raise ValueError(f"a budget of {budget_gmacs} GMACs is below the cheapest SPOT model ({floor:.3f})")
    while hi - lo > tol:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if macs(model, img_size, rho=mid) <= budget else (lo, mid)
    return lo
