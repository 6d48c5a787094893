"""timm ``Block`` / ``Attention`` made SPOT-aware in place (class swap, as ToMe's timm patch).

The swapped classes keep every parameter and module name; called without SPOT arguments they run
timm's own (fused) forward. With ``policy`` or ``history`` they compute attention explicitly
(Eq. 1-2), optionally over kept keys only, and add the attention probabilities to ``history``.
Blocks are still called as modules, so forward hooks on blocks and attention keep working.

Explicit attention runs over batch chunks (``spot.descriptors.batch_chunks``): on CPU it then costs
little more than the fused kernel, about half of what it costs over the whole batch at once
(docs/benchmarks.md).
"""

from __future__ import annotations

import torch
from timm.models.vision_transformer import Attention, Block
from torch import Tensor, nn

from spot.descriptors import AttentionHistory, batch_chunks
from spot.masking import policy_softmax


class SpotAttention(Attention):
    bounded_mask_grad = True  # SpotConfig.mask_grad == "bounded" (spot.masking.policy_softmax)

    def forward(
        self,
        x: Tensor,
        attn_mask: Tensor | None = None,
        is_causal: bool = False,
        policy: Tensor | None = None,
        history: AttentionHistory | None = None,
    ) -> Tensor:
        if policy is None and history is None:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        b, t, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).view(b, t, 3, self.num_heads, self.head_dim)
        outs = []
        for rows in batch_chunks(b, self.num_heads, t, x.device):
            # one copy of the chunk to (3, b, H, T, d): the matmuls then read q, k, v without copies
            q, k, v = qkv[rows].permute(2, 0, 3, 1, 4).contiguous().unbind(0)
            q, k = self.q_norm(q), self.k_norm(k)
            logits = (q * self.scale) @ k.transpose(-2, -1)
            probs = logits.softmax(-1) if policy is None else policy_softmax(
                logits, policy[rows], bounded=self.bounded_mask_grad
            )
            if history is not None:
                history.add(probs, rows)
            outs.append((self.attn_drop(probs) @ v).transpose(1, 2))  # (b, T, H, d)
        out = self.norm(torch.cat(outs).reshape(b, t, self.attn_dim))
        if gate is not None:
            out = out * gate
        return self.proj_drop(self.proj(out))


class SpotBlock(Block):
    def forward(
        self,
        x: Tensor,
        attn_mask: Tensor | None = None,
        is_causal: bool = False,
        policy: Tensor | None = None,
        history: AttentionHistory | None = None,
    ) -> Tensor:
        if policy is None and history is None:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), policy=policy, history=history)))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


def make_blocks_spot_aware(blocks: nn.Sequential, mask_grad: str = "bounded") -> None:
    """Swap the classes of timm ``Block`` / ``Attention`` instances in ``blocks`` (in place, idempotent);
    ``mask_grad`` is :attr:`spot.config.SpotConfig.mask_grad`."""
    for blk in blocks:
        if not isinstance(blk, SpotBlock):
            if type(blk) is not Block or type(blk.attn) is not Attention:
                found = f"{type(blk).__name__}/{type(blk.attn).__name__}"
                raise TypeError(f"expected timm Block/Attention, got {found}")
            blk.__class__ = SpotBlock
            blk.attn.__class__ = SpotAttention
        blk.attn.bounded_mask_grad = mask_grad == "bounded"
