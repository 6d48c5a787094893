"""The token relevance module: token features + attention descriptors -> keep/drop (paper Eq. 10)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def masked_mean(x: Tensor, keep: Tensor | None) -> Tensor:
    """Mean of ``x`` ((B, N, C)) over tokens, kept tokens only when ``keep`` ((B, N)) is given."""
    if keep is None:
        return x.mean(1, keepdim=True)
    w = keep.to(x.dtype)[..., None]
    return (x * w).sum(1, keepdim=True) / w.sum(1, keepdim=True).clamp_min(1.0)


class TokenRelevance(nn.Module):
    """Predicts keep/drop log-probabilities per patch token from D = [z_global, z_local, D^A, D^M, D^Sigma].

    Token part (Appendix 6.1, as DynamicViT): LayerNorm -> Linear(C, d_remap) -> GELU, split into a
    per-token half (z_local) and a half averaged over kept tokens (z_global). The descriptors are
    concatenated and an MLP with hidden widths E/2 and E/4 maps the E features to two logits.
    With ``d_remap = 0`` only the attention descriptors are used (paper Fig. 5).
    """

    def __init__(self, dim: int, num_descriptors: int, d_remap: int) -> None:
        super().__init__()
        if d_remap == 0 and num_descriptors == 0:
            raise ValueError("relevance module needs token features (d_remap > 0) or attention descriptors")
        self.remap = (
            nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, d_remap), nn.GELU()) if d_remap else None
        )
        width = d_remap + num_descriptors
        self.mlp = nn.Sequential(
            nn.Linear(width, width // 2),
            nn.GELU(),
            nn.Linear(width // 2, width // 4),
            nn.GELU(),
            nn.Linear(width // 4, 2),
            nn.LogSoftmax(dim=-1),
        )

    def forward(self, tokens: Tensor, descriptors: Tensor | None, keep: Tensor | None = None) -> Tensor:
        """``tokens`` (B, N, C), ``descriptors`` (B, N, D) or None, ``keep`` (B, N) -> (B, N, 2) log-probs."""
        parts = []
        if self.remap is not None:
            z = self.remap(tokens)
            z_local, z_global = z.chunk(2, dim=-1)
            parts += [masked_mean(z_global, keep).expand_as(z_global), z_local]
        if descriptors is not None:
            parts.append(descriptors.to(tokens.dtype))
        return self.mlp(torch.cat(parts, dim=-1))
