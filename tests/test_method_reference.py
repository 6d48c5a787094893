"""Tests that would catch a wrong method (issue 26, item 6).

1. Training samples its Gumbel masks from the same channel of the relevance module's log-probabilities
   that inference ranks tokens by (channel 0 = keep): a swapped channel in either place fails.
2. What the learned selector reads after pruning equals an independent float64 rebuild of the paper's
   descriptors (Eq. 3-9) from the attention maps of every layer, recomputed from each block's input and
   restricted, through ``kept_indices``, to the tokens still kept (M and Sigma: mean and population
   variance over the layers so far).
"""

import pytest
import torch
from tiny import tiny

import spot


def _confident_first_stage(model, keep_set: list[int], num_patches: int) -> None:
    """The first stage's relevance module answers keep (channel 0) with certainty for ``keep_set``, drop
    for the rest: a forward hook replaces its output by these log-probabilities."""
    logit = torch.full((num_patches,), -30.0)
    logit[keep_set] = 30.0
    log_probs = torch.stack((logit, -logit), -1).log_softmax(-1)  # (N, 2), channel 0 = keep

    def hook(_module, _inputs, output):
        return log_probs.expand_as(output).clone().requires_grad_(output.requires_grad)

    model.spot_predictors[0].register_forward_hook(hook)


@pytest.mark.parametrize("name", ["deit_s", "lvvit_s"])
def test_training_masks_and_inference_ranking_read_the_same_keep_channel(name):
    torch.manual_seed(0)
    model = tiny(name, rho=0.5)
    n = model.num_patches
    k = spot.keep_counts(n, 0.5, 3)[0]
    keep_set = sorted(torch.randperm(n)[:k].tolist())
    _confident_first_stage(model, keep_set, n)
    x = torch.randn(4, 3, 32, 32)
    expected = torch.zeros(4, n)
    expected[:, keep_set] = 1.0
    model.train()  # Gumbel-Softmax masks: with +-30 logits the noise cannot flip a decision
    _, info = model(x, return_info=True)
    assert torch.equal(info.masks[0].detach(), expected)
    model.eval()  # top-k of the keep score
    with torch.no_grad():
        _, info = model(x, return_info=True)
    assert info.kept_indices[0].tolist() == [keep_set] * 4


def _reference_attention(attn_module, x: torch.Tensor) -> torch.Tensor:
    """Softmax(q k^T / sqrt(d)) of one block in float64 from its (normed) input ``x`` (B, T, C) (Eq. 1)."""
    b, t, c = x.shape
    h = attn_module.num_heads
    w = attn_module.qkv.weight.double()
    bias = None if attn_module.qkv.bias is None else attn_module.qkv.bias.double()
    qkv = torch.nn.functional.linear(x.double(), w, bias).view(b, t, 3, h, c // h).permute(2, 0, 3, 1, 4)
    q, k = qkv[0], qkv[1]
    return ((q @ k.transpose(-2, -1)) * (c // h) ** -0.5).softmax(-1)  # (B, H, T, T)


def _stats(mat: torch.Tensor) -> torch.Tensor:
    """The six descriptors of one map ``(1+n, 1+n)`` per patch token, Eq. 3-8: (n, 6)."""
    p = mat[1:, 1:]
    return torch.stack((mat[0, 1:], mat[1:, 0], p.mean(1), p.mean(0), p.var(1, unbiased=False),
                        p.var(0, unbiased=False)), -1)


def _reference_features(maps: list[torch.Tensor], present: list[list[int]], kept: list[int]) -> torch.Tensor:
    """[D^A, D^M, D^Sigma] per head of the tokens ``kept`` (original patch indices) from the maps of every
    layer so far; ``present[l]`` are the patches (ascending) that layer l's map ``(H, T, T)`` covers."""
    restricted = []
    for attn, tokens in zip(maps, present, strict=True):
        pos = [0] + [1 + tokens.index(t) for t in kept]  # cls first, then the kept tokens in order
        restricted.append(attn[:, pos][:, :, pos])
    stack = torch.stack(restricted)  # (L, H, 1+n, 1+n)
    mean, var = stack.mean(0), stack.var(0, unbiased=False)
    heads = [torch.cat([_stats(m[h]) for m in (stack[-1], mean, var)], -1) for h in range(stack.shape[1])]
    return torch.cat(heads, -1)  # (n, H * 18): head-major, then [A, M, Sigma], then the six statistics


@pytest.mark.parametrize("stage_blocks", [(1, 2, 3), (2, 4, 5)])
def test_learned_selector_reads_a_float64_rebuild_of_its_descriptors_after_pruning(stage_blocks):
    torch.manual_seed(0)
    model = tiny("deit_s", rho=0.7, depth=6, stage_blocks=stage_blocks).eval()
    with torch.no_grad():  # peaked attention, so that the statistics differ from token to token
        for blk in model.blocks:
            blk.attn.qkv.weight[: 2 * model.embed_dim].normal_(0.0, 0.5)
    inputs, features = {}, {}
    for i, blk in enumerate(model.blocks):
        blk.attn.register_forward_hook(lambda m, a, o, i=i: inputs.__setitem__(i, a[0].detach()))
    for k, pred in enumerate(model.spot_predictors):
        pred.register_forward_pre_hook(lambda m, a, k=k: features.__setitem__(k, a[1].detach()))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        _, info = model(x, return_info=True)
    n0 = model.num_patches
    for b in range(x.shape[0]):
        present_sets = [list(range(n0))] + [kept[b].tolist() for kept in info.kept_indices]
        present = [present_sets[sum(layer >= s for s in stage_blocks)] for layer in range(len(model.blocks))]
        for k, block in enumerate(stage_blocks):
            maps = [_reference_attention(model.blocks[layer].attn, inputs[layer][b : b + 1])[0]
                    for layer in range(block)]
            want = _reference_features(maps, present[:block], present_sets[k])
            got = features[k][b].double()
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    # the check has teeth: the variance over layers is not zero after the first stage
    assert features[len(stage_blocks) - 1][..., 12:18].abs().max() > 1e-4


def test_reference_features_catch_a_mean_over_dropped_tokens():
    """The rebuild differs when the mean runs over every token instead of the kept ones (what a wrong
    gather would give)."""
    torch.manual_seed(1)
    maps = [torch.rand(2, 9, 9).softmax(-1).double() for _ in range(3)]
    present = [list(range(8))] * 3
    kept = [0, 2, 5, 7]
    right = _reference_features(maps, present, kept)
    wrong = _reference_features(maps, present, list(range(8)))[kept]
    assert not torch.allclose(right, wrong)
