"""How a stage scores patch tokens: the learned SPOT module or a non-learned baseline (Table 7)."""

from __future__ import annotations

import torch
from torch import Tensor

from spot.config import SpotConfig
from spot.descriptors import AttentionHistory, attention_descriptors
from spot.relevance import TokenRelevance

DEGREE = (1.0, 1.0, 1.0, 1.0, 2.0, 2.0)  # of each descriptor in the map: cls/means 1, variances 2


def statistic_columns(cfg: SpotConfig) -> list[int]:
    """Which of a map's six descriptors ``[cls_out, cls_in, row_mean, col_mean, row_var, col_var]`` the
    relevance module reads: Table 2's rows remove all means or all variances."""
    return [0, 1] + [2, 3] * cfg.descriptor_means + [4, 5] * cfg.descriptor_variances


def relevance_features(
    cfg: SpotConfig,
    attn: Tensor,
    s1: Tensor | None,
    s2: Tensor | None,
    layers: int,
    rows: slice = slice(None),
    *,
    keep: Tensor | None,
    n: int,
) -> Tensor:
    """Descriptors [D^A, D^M, D^Sigma] per patch token of one batch chunk as ``(b, N, F)`` (Eq. 9-10).

    ``attn`` is the chunk's attention map of the layer right before the stage, ``s1`` / ``s2`` the
    history's sums of A and A^2 over the ``layers`` layers so far (that one included; None when the
    options read no mean or variance), all over tokens ``[cls, N patches, (fused)]``; only
    ``[cls, patches]`` are read. ``keep`` is the whole batch's ``(B, N+1)`` bool mask of kept tokens
    in mask mode (rows ``rows`` apply), None in prune mode.

    With ``descriptor_scale="none"`` (default, the paper) the statistics are the raw ones of attention
    probabilities. ``"count"`` reads them relative to uniform attention instead (A and M times the kept
    patch count n, Sigma times n^2): on a trained model's peaked maps that gives inputs up to n^4
    (variances of Sigma), which saturate the keep probabilities and stall the Gumbel gradients
    (docs/design.md). Mask and prune modes see the same n, so either keeps their features equal.

    Descriptors are homogeneous (cls/mean entries of degree 1, variances of degree 2 in the map), so
    M = S1 / L and Sigma = (S2 - S1^2 / L) / L enter through S1, S2 - S1^2 / L and a scale factor c:
    D(c * X) = D(X) * [c, c, c, c, c^2, c^2], which saves full passes over the maps.
    """
    window = (slice(None), slice(None), slice(0, n + 1), slice(0, n + 1))
    keep = None if keep is None else keep[rows]
    count = keep[:, 1:].sum(-1) if keep is not None else attn.new_full(attn.shape[:1], n)
    scale = count.to(attn.dtype).clamp_min(1.0)[:, None, None, None]
    if cfg.descriptor_scale == "none":
        scale = torch.ones_like(scale)  # the paper's raw probabilities
    maps = [(attn[window], scale)]
    if cfg.attn_mean:
        maps.append((s1[window], scale / layers))
    if cfg.attn_var:
        spread = torch.addcmul(s2[window], s1[window], s1[window], value=-1.0 / layers)  # L * Sigma
        maps.append((spread, scale.square() / layers))
    degree = scale.new_tensor(DEGREE)
    columns = statistic_columns(cfg)
    desc = torch.cat([attention_descriptors(m, keep) * c**degree for m, c in maps], dim=-1)  # (b, H, N, F/H)
    if len(columns) < len(DEGREE):  # Table 2's rows: drop the means or the variances of every map
        desc = desc[..., [6 * i + j for i in range(len(maps)) for j in columns]]
    if cfg.head_avg:
        return desc.mean(1)
    return desc.permute(0, 2, 1, 3).flatten(2)


def score_tokens(
    cfg: SpotConfig,
    predictor: TokenRelevance | None,
    patches: Tensor,
    history: AttentionHistory | None,
    keep: Tensor | None,
) -> tuple[Tensor, Tensor | None]:
    """Relevance scores ``(B, N)`` of the patch tokens ``(B, N, C)``, and the keep/drop log-probs if learned.

    ``keep`` is the ``(B, N+1)`` bool mask of kept tokens (class token first) in mask mode, None when
    every present token is kept (prune mode). The learned selector reads ``history.features``, which
    ``relevance_features`` gave in the layer before the stage.
    """
    n = patches.shape[1]
    if cfg.selector == "random":
        return torch.rand(patches.shape[:2], device=patches.device), None
    if cfg.selector == "cls_attn_avg":
        # class-token attention averaged over heads and over all layers so far
        return history.cls_sum[:, :, 1 : n + 1].mean(1), None
    log_probs = predictor(patches, history.features, None if keep is None else keep[:, 1:])
    return log_probs[..., 0], log_probs


def num_descriptors(cfg: SpotConfig, num_heads: int) -> int:
    maps = 1 + int(cfg.attn_mean) + int(cfg.attn_var)
    return len(statistic_columns(cfg)) * maps * (1 if cfg.head_avg else num_heads)
