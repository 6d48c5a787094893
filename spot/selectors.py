"""How a stage scores patch tokens: the learned SPOT module or a non-learned baseline (Table 7)."""

from __future__ import annotations

import torch
from torch import Tensor

from spot.config import SpotConfig
from spot.descriptors import AttentionHistory, attention_descriptors, batch_chunks
from spot.relevance import TokenRelevance

DEGREE = (1.0, 1.0, 1.0, 1.0, 2.0, 2.0)  # of each descriptor in the map: cls/means 1, variances 2


def relevance_features(
    cfg: SpotConfig, history: AttentionHistory, keep: Tensor | None, n: int, rows: slice = slice(None)
) -> Tensor:
    """Descriptors [D^A, D^M, D^Sigma] per patch token of batch rows ``rows`` as ``(b, N, F)`` (Eq. 9-10).

    ``history`` holds the maps over tokens ``[cls, N patches, (fused)]``; only ``[cls, patches]`` are read.
    Raw statistics of attention probabilities are of order 1/N and their variances 1/N^2; the module
    reads them relative to uniform attention (A and M times the kept patch count n, Sigma times n^2),
    so features do not shrink with the token count. Mask and prune modes see the same n, so this
    keeps their features equal.

    Descriptors are homogeneous (cls/mean entries of degree 1, variances of degree 2 in the map), so
    M = S1 / L and Sigma = (L * S2 - S1^2) / L^2 enter through their sums and a scale factor c:
    D(c * X) = D(X) * [c, c, c, c, c^2, c^2], which saves full passes over the maps.
    """
    window = (rows, slice(None), slice(0, n + 1), slice(0, n + 1))
    s1 = history.sum[window]
    keep = _rows(keep, rows)
    count = keep[:, 1:].sum(-1) if keep is not None else s1.new_full(s1.shape[:1], n)
    scale = count.to(s1.dtype).clamp_min(1.0)[:, None, None, None]
    layers = history.layers
    maps = [(history.last[window], scale)]
    if cfg.attn_mean:
        maps.append((s1, scale / layers))
    if cfg.attn_var:
        spread = torch.addcmul(history.sum_sq[window] * layers, s1, s1, value=-1.0)
        maps.append((spread, scale.square() / layers**2))
    degree = scale.new_tensor(DEGREE)
    desc = torch.cat([attention_descriptors(m, keep) * c**degree for m, c in maps], dim=-1)  # (b, H, N, F/H)
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
    every present token is kept (prune mode).
    """
    n = patches.shape[1]
    if cfg.selector == "random":
        return torch.rand(patches.shape[:2], device=patches.device), None
    if cfg.selector == "cls_attn_avg":
        # class-token attention averaged over heads and over all layers so far
        return history.sum[:, :, 0, 1 : n + 1].mean(1), None
    # features and predictor per batch chunk: cache-sized on CPU, the whole batch on GPU
    chunks = batch_chunks(patches.shape[0], history.sum.shape[1], n + 1, patches.device)
    token_keep = None if keep is None else keep[:, 1:]
    log_probs = torch.cat([
        predictor(patches[rows], relevance_features(cfg, history, keep, n, rows), _rows(token_keep, rows))
        for rows in chunks
    ])
    return log_probs[..., 0], log_probs


def _rows(x: Tensor | None, rows: slice) -> Tensor | None:
    return None if x is None else x[rows]


def num_descriptors(cfg: SpotConfig, num_heads: int) -> int:
    maps = 1 + int(cfg.attn_mean) + int(cfg.attn_var)
    return 6 * maps * (1 if cfg.head_avg else num_heads)
