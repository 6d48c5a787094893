"""Attention descriptors (Eq. 3-9) against a naive float64 reference written from the equations."""

from functools import partial

import pytest
import torch

from spot import attention_descriptors


def naive_descriptors(attn: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """Loop-level Eq. 3-9 over kept tokens: plain sums divided by the kept count (population variance)."""
    b, h, t, _ = attn.shape
    out = torch.zeros(b, h, t - 1, 6, dtype=torch.float64)
    for bi in range(b):
        kept = [i for i in range(1, t) if keep is None or keep[bi, i]]
        n = len(kept)
        for hi in range(h):
            a = attn[bi, hi].double()
            for tok in kept:
                row = [a[tok, j].item() for j in kept]
                col = [a[i, tok].item() for i in kept]
                rm, cm = sum(row) / n, sum(col) / n
                rv = sum((v - rm) ** 2 for v in row) / n
                cv = sum((v - cm) ** 2 for v in col) / n
                out[bi, hi, tok - 1] = torch.tensor([a[0, tok], a[tok, 0], rm, cm, rv, cv])
    return out


def random_attention(b=2, h=3, t=9, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, h, t, t, generator=g, dtype=torch.float64).mul(2).softmax(-1)


def test_descriptors_match_equations_without_mask():
    attn = random_attention()
    got = attention_descriptors(attn)
    assert got.shape == (2, 3, 8, 6)
    torch.testing.assert_close(got, naive_descriptors(attn, None), rtol=1e-12, atol=1e-12)


def test_descriptors_use_kept_tokens_only():
    attn = random_attention(seed=1)
    keep = torch.ones(2, 9, dtype=torch.bool)
    keep[0, [2, 5, 7]] = False
    keep[1, [1, 8]] = False
    got = attention_descriptors(attn, keep)
    torch.testing.assert_close(got, naive_descriptors(attn, keep), rtol=1e-12, atol=1e-12)
    assert got[0, :, [1, 4, 6]].abs().sum() == 0  # dropped tokens carry no descriptor


def test_descriptors_ignore_dropped_rows_and_columns():
    attn = random_attention(seed=2)
    keep = torch.ones(2, 9, dtype=torch.bool)
    keep[:, 4] = False
    changed = attn.clone()
    changed[:, :, 4, 1:] = 0.5  # a dropped token's row and column hold anything
    changed[:, :, 1:, 4] = 0.25
    torch.testing.assert_close(attention_descriptors(changed, keep), attention_descriptors(attn, keep))


@pytest.mark.parametrize("scale", ["none", "count"])
def test_relevance_features_read_mean_and_variance_over_layers(scale):
    """[D^A, D^M, D^Sigma] (Eq. 9-10) from the history equal descriptors of explicit M and Sigma, raw
    (the paper) or relative to uniform attention (times n, n^2)."""
    from spot.config import SpotConfig
    from spot.descriptors import AttentionHistory
    from spot.selectors import relevance_features

    maps = [random_attention(seed=s).float() for s in range(3)]
    keep = torch.ones(2, 9, dtype=torch.bool)
    keep[1, [3, 6]] = False
    history = AttentionHistory(batch=2)
    describe = partial(relevance_features, SpotConfig(descriptor_scale=scale), keep=keep, n=8)
    for i, m in enumerate(maps):  # each layer added in two batch chunks, as explicit attention does on CPU
        history.start_layer(describe=describe if i == len(maps) - 1 else None)
        history.add(m[:1], slice(0, 1))
        history.add(m[1:], slice(1, 2))
    got = history.features

    stacked = torch.stack([m.double() for m in maps])
    mean, var = stacked.mean(0), stacked.var(0, correction=0)
    n = keep[:, 1:].sum(-1).double()[:, None, None, None]
    if scale == "none":
        n = torch.ones_like(n)
    relative = torch.tensor([1.0, 1, 1, 1, 2, 2], dtype=torch.float64)  # degree of each descriptor
    expected = torch.cat(
        [naive_descriptors(maps[-1], keep) * n**relative,
         naive_descriptors(mean, keep) * n**relative,
         naive_descriptors(var, keep) * (n * n) ** relative],
        dim=-1,
    )  # (B, H, N, 18) -> per token, heads major
    expected = expected.permute(0, 2, 1, 3).reshape(2, 8, -1)
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-6)


def test_history_gather_in_chunks_keeps_exactly_the_kept_rows_and_columns(monkeypatch):
    """Pruning compacts S1 / S2 over their own storage chunk by chunk (and gathers the class-row sums):
    the result is plain indexing."""
    import spot.descriptors
    from spot.descriptors import AttentionHistory

    monkeypatch.setattr(spot.descriptors, "CPU_CHUNK_BYTES", 1)  # one sample per chunk
    maps = [random_attention(b=5, h=2, t=9, seed=s).float() for s in range(2)]
    history = AttentionHistory(batch=5, cls_rows=True)
    for m in maps:
        history.start_layer()
        for i in range(5):
            history.add(m[i : i + 1], slice(i, i + 1))
    s1, s2 = history.sum.clone(), history.sum_sq.clone()
    torch.testing.assert_close(history.cls_sum, s1[:, :, 0], rtol=0, atol=0)
    g = torch.Generator().manual_seed(3)
    index = torch.stack([torch.randperm(8, generator=g)[:5].sort().values + 1 for _ in range(5)])
    index = torch.cat((torch.zeros(5, 1, dtype=torch.long), index), dim=1)  # class token first
    history.gather(index)
    for b in range(5):
        sel = index[b]
        torch.testing.assert_close(history.sum[b], s1[b][:, sel][:, :, sel], rtol=0, atol=0)
        torch.testing.assert_close(history.sum_sq[b], s2[b][:, sel][:, :, sel], rtol=0, atol=0)
        torch.testing.assert_close(history.cls_sum[b], s1[b][:, 0, sel], rtol=0, atol=0)
    torch.testing.assert_close(s1, maps[0] + maps[1])  # the layers' sums, before the gather


@pytest.mark.parametrize(
    "options, columns",
    [({"descriptor_means": False}, [0, 1, 4, 5]), ({"descriptor_variances": False}, [0, 1, 2, 3]),
     ({"descriptor_means": False, "attn_var": False}, [0, 1, 4, 5])],
)
def test_table_2_rows_drop_the_means_or_variances_of_every_map(options, columns):
    """Table 2's rows remove mu-hat (row / column means) or sigma-hat^2 (variances) of A, M and Sigma alike;
    the cross-layer switches remove whole maps."""
    from spot.config import SpotConfig
    from spot.descriptors import AttentionHistory
    from spot.selectors import num_descriptors, relevance_features

    maps = [random_attention(seed=s).float() for s in range(3)]

    def features(cfg):
        history = AttentionHistory(batch=2)
        for i, m in enumerate(maps):
            describe = partial(relevance_features, cfg, keep=None, n=8) if i == len(maps) - 1 else None
            history.start_layer(describe=describe)
            history.add(m)
        return history.features.view(2, 8, 3, -1)  # (B, N, heads, maps * statistics)

    full = features(SpotConfig())
    cfg = SpotConfig(**options)
    got = features(cfg)
    kept_maps = [0] + [1] * cfg.attn_mean + [2] * cfg.attn_var
    want = full[..., [6 * m + c for m in kept_maps for c in columns]]
    assert got.shape[-1] * 3 == num_descriptors(cfg, 3)
    torch.testing.assert_close(got, want)
