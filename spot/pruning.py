"""Inference-time sparsification: dropped tokens are removed (paper Sec. 3.2, inference)."""

from __future__ import annotations

import torch
from torch import Tensor


def select_topk(scores: Tensor, k: int) -> Tensor:
    """Positions ``(B, k)`` of the k best patch tokens by score ``(B, N)``, in ascending position order.

    Sorting the k positions keeps the surviving tokens in their spatial order (cheap: k log k).
    """
    return scores.topk(k, dim=-1, sorted=False).indices.sort(dim=-1).values


def gather_tokens(x: Tensor, index: Tensor) -> Tensor:
    """Rows ``index`` ((B, k) long) of ``x`` ((B, T, C)) -> ``(B, k, C)``."""
    return torch.gather(x, 1, index[..., None].expand(-1, -1, x.shape[-1]))


def with_prefix(index: Tensor, num_prefix: int) -> Tensor:
    """Shift patch positions past the prefix tokens and prepend the prefix positions."""
    prefix = torch.arange(num_prefix, device=index.device).expand(index.shape[0], num_prefix)
    return torch.cat((prefix, index + num_prefix), dim=1)


def fuse_tokens(x: Tensor, weights: Tensor) -> Tensor:
    """One token from ``x`` ((B, T, C)) as the ``weights``-weighted ((B, T), zero = excluded) average.

    EViT-style soft sparsification: the dropped tokens live on as a single fused token.
    """
    w = weights / weights.sum(-1, keepdim=True).clamp_min(1e-12)
    return torch.einsum("bt,btc->bc", w.to(x.dtype), x)[:, None, :]
