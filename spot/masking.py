"""Training-time sparsification: tokens are masked, not removed (paper Sec. 3.2, training)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def policy_softmax(logits: Tensor, policy: Tensor, eps: float = 1e-6, bounded: bool = True) -> Tensor:
    """Softmax over kept keys only, multiplicative so a straight-through mask keeps its gradient.

    Args:
        logits: ``(B, H, T, T)`` attention logits.
        policy: ``(B, T)`` keep policy in {0, 1} (1 for the class token), straight-through in training.
        eps: small constant that keeps rows of fully dropped queries finite.
        bounded: shift each row by its largest *kept* logit and cap dropped keys' weights at that one's
            (the default). DynamicViT's form (``bounded=False``) shifts by the row's maximum over all
            keys: where the kept keys hold less than ~eps of a row's mass its rows drift toward uniform
            and the policy gradient of a dropped key reaches ``1 / eps``; on peaked attention that
            swamps the rate loss (Eq. 12) and the keep rate cannot follow rho^k. Bounded, the policy
            gradient of a dropped key is at most ``|v_j - out_i|`` (docs/design.md, deviations).

    Each token may still attend to itself, so a dropped token's row is never empty; kept queries see
    exactly the renormalised softmax over kept keys (what pruning computes). Computed in float32.
    """
    dtype = logits.dtype
    t = logits.shape[-1]
    keys = policy[:, None, None, :].float()
    eye = torch.eye(t, device=logits.device, dtype=torch.float32)
    allowed = keys + (1.0 - keys) * eye  # (B, 1, T, T)
    logits = logits.float()
    if bounded:  # the forward only reads allowed entries, so the cap changes gradients alone
        shift = logits.masked_fill(allowed.detach() <= 0.5, float("-inf")).amax(-1, keepdim=True)
        weights = (logits - shift).clamp(max=0.0).exp() * allowed
    else:
        weights = (logits - logits.amax(-1, keepdim=True)).exp() * allowed
    return ((weights + eps / t) / (weights.sum(-1, keepdim=True) + eps)).to(dtype)


def gumbel_keep(log_probs: Tensor, prev_mask: Tensor, tau: float = 1.0) -> Tensor:
    """Hard straight-through keep mask from keep/drop log-probabilities, hierarchical.

    Args:
        log_probs: ``(B, N, 2)`` log-probabilities, channel 0 = keep.
        prev_mask: ``(B, N)`` cumulative mask of the previous stage (ones before the first).

    Returns:
        ``(B, N)`` mask in {0, 1} whose gradient flows into ``log_probs`` (Gumbel-Softmax, hard=True);
        a token dropped earlier stays dropped.
    """
    hard = F.gumbel_softmax(log_probs.float(), tau=tau, hard=True)[..., 0]
    return hard * prev_mask


def topk_keep(scores: Tensor, prev_mask: Tensor, k: int) -> Tensor:
    """Deterministic mask of the ``k`` best-scoring tokens among those still kept: what pruning keeps."""
    masked = scores.float().masked_fill(prev_mask <= 0.5, float("-inf"))
    idx = masked.topk(k, dim=-1).indices
    return torch.zeros_like(prev_mask).scatter(-1, idx, 1.0)
