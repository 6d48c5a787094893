"""The SPOT forward over a backbone's transformer blocks, shared by every backbone.

A backbone hands over its embedded tokens ``[cls, patches]``; the engine runs ``model.blocks``,
sparsifying the input of each stage block, in one of two modes:

* ``mask`` (training): nothing is removed; a cumulative keep mask enters every later attention
  through a policy softmax, with Gumbel-Softmax straight-through masks (or deterministic top-k).
* ``prune`` (inference): the top ``int(N0 * rho**k)`` patch tokens are gathered, the rest removed.

Blocks whose attention map feeds a stage compute attention explicitly; all others run the block's
own (fused) forward, so a dense model computes exactly what the backbone computes
(see ``spot/blocks.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch
from torch import Tensor, nn

from spot.config import MODES, SpotConfig
from spot.descriptors import AttentionHistory, Describe
from spot.masking import gumbel_keep, topk_keep
from spot.pruning import fuse_tokens, gather_tokens, select_topk, with_prefix
from spot.schedule import keep_counts
from spot.selectors import relevance_features, score_tokens


@dataclass
class SpotInfo:
    """What a forward pass decided (see docs/design.md, model contract)."""

    kept_indices: list[Tensor] = field(default_factory=list)  # per stage (B, k) original patch indices
    masks: list[Tensor] = field(default_factory=list)  # per stage (B, N0) cumulative keep masks
    tokens: Tensor | None = None  # (B, N0, C) final-normed patch tokens, original order, zeros if pruned
    keep: Tensor | None = None  # (B, N0) final keep mask


class TokenState:
    """Per-forward state: which tokens are present or masked, and the attention history."""

    def __init__(self, cfg: SpotConfig, mode: str, x: Tensor, num_patches: int) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown SPOT mode {mode!r}; choose one of {MODES}")
        b = x.shape[0]
        self.cfg, self.mode, self.num_patches = cfg, mode, num_patches
        self.counts = keep_counts(num_patches, cfg.rho, cfg.num_stages) if not cfg.dense else []
        self.history = None
        if cfg.needs_attention:  # the history keeps only what the selector reads
            learned = cfg.selector == "learned"
            self.history = AttentionHistory(
                b,
                maps=learned and (cfg.attn_mean or cfg.attn_var),
                squares=learned and cfg.attn_var,
                cls_rows=not learned,
                last_cls_row=cfg.fuse_dropped,
            )
        self.info = SpotInfo()
        self.fused = False  # whether the sequence ends with a fused token
        self.last_stage = False  # whether the stage being run is the last one
        self.policy: Tensor | None = None  # mask mode: (B, T) keep policy once a stage has run
        self.replay: list[Tensor] | None = None  # prune mode: kept original indices to use per stage
        self.patch_mask = x.new_ones(b, num_patches)  # mask mode: cumulative (B, N0)
        self.orig = torch.arange(num_patches, device=x.device).expand(b, -1)  # prune mode: (B, n)

    def patches(self, x: Tensor) -> Tensor:
        return x[:, 1 : x.shape[1] - int(self.fused)]

    def stage(self, k: int, x: Tensor, predictor: nn.Module | None) -> Tensor:
        self.last_stage = k == self.cfg.num_stages - 1
        if self.mode == "mask":
            return self._mask_stage(k, x, predictor)
        return self._prune_stage(k, x, predictor)

    def describer(self, x: Tensor) -> Describe | None:
        """What the layer before a stage computes of its maps for the stage (learned selector's features)."""
        if self.cfg.selector != "learned":
            return None
        return partial(relevance_features, self.cfg, keep=self.stage_keep(), n=self.patches(x).shape[1])

    def stage_keep(self) -> Tensor | None:
        """Mask mode: ``(B, 1 + N0)`` bool of tokens kept so far, class token first; None in prune mode."""
        if self.mode != "mask":
            return None
        prev = self.patch_mask
        return torch.cat((prev.new_ones(prev.shape[0], 1), prev), dim=1) > 0.5

    def _mask_stage(self, k: int, x: Tensor, predictor: nn.Module | None) -> Tensor:
        prev = self.patch_mask
        keep = self.stage_keep()
        scores, log_probs = score_tokens(self.cfg, predictor, self.patches(x), self.history, keep)
        if log_probs is not None and self.cfg.sampling == "gumbel":
            mask = gumbel_keep(log_probs, prev, self.cfg.tau)
        else:
            mask = topk_keep(scores, prev, self.counts[k])
            self.info.kept_indices.append(mask.nonzero()[:, 1].view(mask.shape[0], -1))
        if self.cfg.fuse_dropped:
            x = self._fuse(x, dropped=prev - mask, kept_seq=None)
        self.patch_mask = mask
        self.info.masks.append(mask)
        ones = mask.new_ones(mask.shape[0], 1)
        self.policy = torch.cat((ones, mask, ones) if self.fused else (ones, mask), dim=1)
        return x

    def _prune_stage(self, k: int, x: Tensor, predictor: nn.Module | None) -> Tensor:
        scores, _ = score_tokens(self.cfg, predictor, self.patches(x), self.history, None)
        idx = select_topk(scores, self.counts[k])  # positions among present patches
        if self.replay is not None:  # another run's selection (parity checks; self.orig is ascending)
            idx = torch.searchsorted(self.orig.contiguous(), self.replay[k].to(self.orig.device))
        seq = with_prefix(idx, 1)
        if self.fused:
            seq = torch.cat((seq, seq.new_full((seq.shape[0], 1), x.shape[1] - 1)), dim=1)
        if self.cfg.fuse_dropped:
            dropped = torch.ones_like(scores).scatter(1, idx, 0.0)
            x = self._fuse(x, dropped=dropped, kept_seq=seq)
        else:
            x = gather_tokens(x, seq)
            self._gather_history(seq)
        self.orig = torch.gather(self.orig, 1, idx)
        self.info.kept_indices.append(self.orig)
        self.info.masks.append(torch.zeros_like(self.patch_mask).scatter(1, self.orig, 1.0))
        return x

    def _fuse(self, x: Tensor, dropped: Tensor, kept_seq: Tensor | None) -> Tensor:
        """Soft sparsification: tokens dropped now (and the previous fused token) -> one fused token.

        Weights: the class token's attention of the current layer, averaged over heads (EViT);
        uniform when no attention is tracked. ``kept_seq`` (prune mode) gathers the survivors.
        """
        history = self.history
        cls_attn = history.cls_row.mean(1) if history is not None else x.new_ones(x.shape[:2])  # (B, T)
        weights = torch.zeros_like(cls_attn)
        weights[:, 1 : 1 + dropped.shape[1]] = dropped
        if self.fused:
            weights[:, -1] = 1.0
        fused = fuse_tokens(x, weights * cls_attn)
        if kept_seq is not None:
            x = gather_tokens(x, kept_seq)
            self._gather_history(kept_seq)
        if self.fused:
            return torch.cat((x[:, :-1], fused), dim=1)
        self.fused = True
        if self.history is not None:
            self.history.pad_one()
        return torch.cat((x, fused), dim=1)

    def _gather_history(self, seq: Tensor) -> None:
        """Restrict the attention history to the surviving tokens, unless no later stage reads it."""
        if self.history is None:
            return
        if not self.last_stage:
            self.history.gather(seq)
        else:
            self.history.free()  # last stage: free the memory instead

    def finish(self, x_normed: Tensor) -> SpotInfo:
        """Attach the final-normed patch tokens in original order and the final keep mask."""
        patches = self.patches(x_normed)
        if self.mode == "prune" and self.info.kept_indices:
            full = patches.new_zeros(patches.shape[0], self.num_patches, patches.shape[-1])
            self.info.tokens = full.scatter(1, self.orig[..., None].expand_as(patches), patches)
        else:
            self.info.tokens = patches
        self.info.keep = self.info.masks[-1] if self.info.masks else self.patch_mask
        return self.info

    def patch_keep(self) -> Tensor | None:
        """Mask mode: (B, N0) bool of finally kept patches; None when every present patch is kept."""
        if self.mode == "mask" and self.info.masks:
            return self.patch_mask > 0.5
        return None


def run_blocks(model: nn.Module, x: Tensor, num_patches: int) -> tuple[Tensor, TokenState]:
    """Run ``model.blocks`` on tokens ``[cls, patches]`` with SPOT sparsification (prune or mask mode)."""
    cfg: SpotConfig = model.spot_options
    state = TokenState(cfg, model.spot_mode, x, num_patches)
    state.replay = getattr(model, "spot_replay", None)
    stage_of = {b: k for k, b in enumerate(cfg.stage_blocks)} if not cfg.dense else {}
    last_read = max(stage_of) - 1 if state.history is not None else -1
    for i, blk in enumerate(model.blocks):
        if i in stage_of:
            x = state.stage(stage_of[i], x, model.stage_predictor(stage_of[i]))
        before_stage = i + 1 in stage_of
        # attention maps are needed by the layer before a stage, and by every layer the history sums
        if i <= last_read and (before_stage or state.history.accumulates):
            state.history.start_layer(describe=state.describer(x) if before_stage else None)
            x = blk(x, policy=state.policy, history=state.history)
        else:
            x = blk(x, policy=state.policy)
    return x, state

