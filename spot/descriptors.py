"""Attention statistics the relevance module reads (paper Eq. 3-9) and their history over layers.

Every statistic is taken over KEPT tokens only, so that a token gets the same features in training
(dropped tokens still present, masked) as at inference (dropped tokens removed).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def attention_descriptors(attn: Tensor, keep: Tensor | None = None) -> Tensor:
    """Per-head token descriptors D^A of one attention map (Eq. 3-9).

    Args:
        attn: ``(B, H, N+1, N+1)`` attention probabilities, row = query, index 0 = class token.
        keep: optional ``(B, N+1)`` bool mask of kept tokens; means and (population) variances of the
            patch-patch sub-matrix are then taken over kept rows / columns only, and dropped tokens'
            descriptors are zero.

    Returns:
        ``(B, H, N, 6)``: ``[cls_out, cls_in, row_mean, col_mean, row_var, col_var]`` per patch token.
    """
    cls_out = attn[..., 0, 1:]  # Eq. 3: class token attends to t
    cls_in = attn[..., 1:, 0]  # Eq. 4: t attends to the class token
    patches = attn[..., 1:, 1:]
    if keep is None:
        count = float(patches.shape[-1])
    else:
        kept = keep[:, 1:].to(attn.dtype)  # (B, N)
        count = kept.sum(-1).clamp_min(1.0)[:, None, None]  # (B, 1, 1)
        patches = patches * kept[:, None, :, None] * kept[:, None, None, :]  # dropped rows/cols -> 0
    # sums of P and P^2 over rows and columns: one pass each, far cheaper than var_mean on strided data
    squares = patches * patches
    row_mean = patches.sum(-1) / count  # Eq. 5
    col_mean = patches.sum(-2) / count  # Eq. 6
    row_var = (squares.sum(-1) / count - row_mean.square()).clamp_min(0.0)  # Eq. 7 (squared)
    col_var = (squares.sum(-2) / count - col_mean.square()).clamp_min(0.0)  # Eq. 8 (squared)
    out = torch.stack((cls_out, cls_in, row_mean, col_mean, row_var, col_var), dim=-1)
    return out if keep is None else out * kept[:, None, :, None]


class AttentionHistory:
    """Running element-wise mean M and variance Sigma of the attention maps of all layers so far.

    Keeps the sums S1 of A and S2 of A^2 (both ``(B, H, T, T)``) over the L layers so far, from which
    M = S1 / L and Sigma = S2 / L - M^2 (population variance over layers). When tokens are pruned,
    the sums are gathered to the kept tokens, so M and Sigma always cover the tokens still present.
    """

    def __init__(self, track_var: bool) -> None:
        self.track_var = track_var
        self.layers = 0
        self.sum: Tensor | None = None
        self.sum_sq: Tensor | None = None
        self.last: Tensor | None = None

    def add(self, attn: Tensor) -> None:
        attn = attn.detach()  # statistics are inputs of the predictor, not a path into the backbone
        self.last = attn
        self.layers += 1
        if self.sum is None:
            self.sum = attn.clone()
            self.sum_sq = attn.square() if self.track_var else None
            return
        self.sum.add_(attn)
        if self.track_var:
            self.sum_sq.addcmul_(attn, attn)

    def gather(self, index: Tensor) -> None:
        """Keep only tokens ``index`` ((B, T') long, prefix included) on both token axes."""
        self.sum = _gather_square(self.sum, index)
        if self.sum_sq is not None:
            self.sum_sq = _gather_square(self.sum_sq, index)
        self.last = None

    def pad_one(self) -> None:
        """Add a token slot (all-zero history) at the end, for a newly appended fused token."""
        self.sum = F.pad(self.sum, (0, 1, 0, 1))
        if self.sum_sq is not None:
            self.sum_sq = F.pad(self.sum_sq, (0, 1, 0, 1))


def _gather_square(mat: Tensor, index: Tensor) -> Tensor:
    b, h, _, t = mat.shape
    k = index.shape[1]
    rows = torch.gather(mat, 2, index[:, None, :, None].expand(b, h, k, t))
    return torch.gather(rows, 3, index[:, None, None, :].expand(b, h, k, k))
