"""Mask (training) and prune (inference) modes compute the same function; masks are hierarchical."""

import pytest
import timm
import torch
from tiny import TINY, tiny

import spot

NAMES = ["deit_s", "lvvit_s"]
OPTIONS = [{}, {"fuse_dropped": True}, {"head_avg": True, "attn_var": False}, {"d_remap": 0},
           {"attn_mean": False, "attn_var": False}]


def copy_weights(dst, src):
    dst.load_state_dict(src.state_dict(), strict=False)
    return dst


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("selector", ["learned", "cls_attn_avg"])
@pytest.mark.parametrize("options", OPTIONS, ids=["default", "fused", "headavg", "noremap", "nocross"])
def test_mask_mode_equals_prune_mode_for_the_same_keep_set(name, selector, options):
    model = tiny(name, selector=selector, rho=0.6, sampling="topk", **options).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        pruned, p_info = model(x, return_info=True)
        spot.set_mode(model, "mask")
        masked, m_info = model(x, return_info=True)
    for p_idx, m_idx in zip(p_info.kept_indices, m_info.kept_indices, strict=True):
        assert torch.equal(p_idx, m_idx)
    torch.testing.assert_close(masked, pruned, rtol=1e-4, atol=1e-5)
    keep = m_info.keep.bool()
    torch.testing.assert_close(m_info.tokens[keep], p_info.tokens[keep], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_rho_one_prunes_nothing_and_equals_the_dense_model(name):
    dense = tiny(name, rho=None).eval()
    full = copy_weights(tiny(name, rho=1.0), dense).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits, info = full(x, return_info=True)
        assert all(k.shape[1] == 16 for k in info.kept_indices)
        torch.testing.assert_close(logits, dense(x), rtol=1e-5, atol=1e-5)


def test_patched_deit_computes_exactly_what_timm_computes():
    reference = timm.create_model("deit_small_patch16_224", num_classes=10, **{
        k: v for k, v in TINY.items() if k != "num_classes"}).eval()
    patched = copy_weights(tiny("deit_s", rho=None), reference).eval()
    assert patched.state_dict().keys() == reference.state_dict().keys()
    assert isinstance(patched, type(reference))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(patched(x), reference(x))


def test_keep_counts_follow_rho_powers():
    assert spot.keep_counts(196, 0.7) == [137, 96, 67]
    assert spot.keep_counts(196, 0.5) == [98, 49, 24]
    assert spot.keep_counts(16, 0.6, stages=3) == [9, 5, 3]
    model = tiny(rho=0.6).eval()
    with torch.no_grad():
        _, info = model(torch.randn(2, 3, 32, 32), return_info=True)
    assert [k.shape for k in info.kept_indices] == [(2, 9), (2, 5), (2, 3)]
    assert [float(m.sum(1)[0]) for m in info.masks] == [9.0, 5.0, 3.0]


@pytest.mark.parametrize("name", NAMES)
def test_gumbel_masks_are_hierarchical_and_train_every_predictor(name):
    model = tiny(name, rho=0.7).train()
    logits, info = model(torch.randn(4, 3, 32, 32), return_info=True)
    assert len(info.masks) == 3 and info.kept_indices == []
    for earlier, later in zip(info.masks, info.masks[1:], strict=False):
        assert torch.all(later <= earlier)  # a dropped token stays dropped
        assert set(later.unique().tolist()) <= {0.0, 1.0}
    rate = sum((m.mean(1) - 0.7 ** (k + 1)).square().mean() for k, m in enumerate(info.masks))
    (logits.square().mean() + rate).backward()
    for pname, p in model.spot_predictors.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname


def test_prune_mode_really_removes_tokens():
    model = tiny(rho=0.5).eval()
    seen = []
    for blk in model.blocks:
        blk.register_forward_hook(lambda m, i, o: seen.append((o[0] if isinstance(o, tuple) else o).shape[1]))
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    assert seen == [17, 9, 5, 3]  # stages before blocks 1, 2, 3 of a 4-block model


def test_kept_indices_are_original_patch_positions_and_nested():
    model = tiny(rho=0.7).eval()
    with torch.no_grad():
        _, info = model(torch.randn(2, 3, 32, 32), return_info=True)
    for earlier, later in zip(info.kept_indices, info.kept_indices[1:], strict=False):
        for b in range(2):
            assert set(later[b].tolist()) <= set(earlier[b].tolist())
    assert all(int(k.max()) < 16 for k in info.kept_indices)


def test_cls_attn_avg_keeps_the_tokens_the_class_token_attends_to_most_over_all_layers_so_far():
    """Each stage keeps the top tokens by class-token attention averaged over heads and earlier layers."""
    model = tiny(selector="cls_attn_avg", rho=0.5).eval()
    stages = model.spot_options.stage_blocks
    rows = []  # per block: class-token attention to each present patch, mean over heads (B, n)

    def hook(module, args, out):
        x = args[0]  # the block's normed tokens
        b, t, _ = x.shape
        q, k, _ = module.qkv(x).reshape(b, t, 3, module.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        rows.append(((q * module.scale) @ k.transpose(-2, -1)).softmax(-1)[:, :, 0, 1:].mean(1))

    for blk in model.blocks:
        blk.attn.register_forward_hook(hook)
    with torch.no_grad():
        _, info = model(torch.randn(2, 3, 32, 32), return_info=True)
    present = [torch.arange(16).expand(2, -1), *info.kept_indices]  # original indices before each stage
    total = torch.zeros(2, 16, dtype=torch.float64)  # summed over layers, by original patch index
    for i in range(stages[-1]):
        total.scatter_add_(1, present[sum(i >= s for s in stages)], rows[i].double())
        if i + 1 in stages:
            k = stages.index(i + 1)
            best = total.gather(1, present[k]).topk(info.kept_indices[k].shape[1], dim=-1).indices
            assert torch.equal(info.kept_indices[k], present[k].gather(1, best).sort(-1).values)


@pytest.mark.parametrize(
    "options, kept",
    [({}, {"sum", "sum_sq"}), ({"attn_var": False}, {"sum"}),
     ({"attn_mean": False, "attn_var": False}, set()), ({"selector": "cls_attn_avg"}, {"cls_sum"})],
)
def test_attention_history_keeps_only_what_the_selector_reads(options, kept):
    model = tiny(rho=0.5, **options).eval()
    held = []  # which sums the history holds once block 0 has added its maps

    def hook(module, args, kwargs, out):
        history = kwargs["history"]
        held.append({name for name in ("sum", "sum_sq", "cls_sum") if getattr(history, name) is not None})

    model.blocks[0].register_forward_hook(hook, with_kwargs=True)
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    assert held == [kept]


@pytest.mark.parametrize(
    "options, explicit", [({}, [0, 1, 2]), ({"attn_mean": False, "attn_var": False}, [1, 2])])
def test_only_layers_whose_maps_are_read_compute_explicit_attention(options, explicit):
    model = tiny(rho=0.5, stage_blocks=(2, 3), **options).eval()
    seen = []  # blocks called with an attention history (explicit attention)
    for i, blk in enumerate(model.blocks):
        blk.register_forward_pre_hook(
            lambda module, args, kwargs, i=i: seen.extend([i] if kwargs.get("history") is not None else []),
            with_kwargs=True)
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    assert seen == explicit


def test_random_selector_needs_no_attention_maps():
    model = tiny(selector="random", rho=0.5).eval()
    with torch.no_grad():
        _, info = model(torch.randn(2, 3, 32, 32), return_info=True)
    assert [k.shape[1] for k in info.kept_indices] == [8, 4, 2]
    assert model.spot_predictors is None


def test_shared_predictor_has_one_module():
    assert len(tiny(shared_predictor=True).spot_predictors) == 1
    assert len(tiny().spot_predictors) == 3


def test_spot_config_rebuilds_the_architecture():
    model = tiny("lvvit_t", rho=0.6, fuse_dropped=True)
    rebuilt = spot.create_model(**model.spot_config)
    rebuilt.load_state_dict(model.state_dict())  # strict: same keys and shapes
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x), model.eval()(x))


@pytest.mark.parametrize("mode", ["prune", "mask"])
def test_attention_in_batch_chunks_equals_one_chunk(mode, monkeypatch):
    """Cache-sized batch chunks (CPU) change neither logits nor decisions nor gradients."""
    import spot.descriptors
    from spot.descriptors import batch_chunks

    assert batch_chunks(5, 6, 197, torch.device("cpu")) == [slice(0, 2), slice(2, 4), slice(4, 5)]  # 0.9 MB
    assert batch_chunks(5, 6, 197, torch.device("cuda")) == [slice(0, 5)]
    model = tiny("deit_s", rho=0.6, sampling="topk")
    spot.set_mode(model, mode)
    x = torch.randn(3, 3, 32, 32)

    def run():
        model.zero_grad()
        logits, info = model(x, return_info=True)
        logits.square().sum().backward()
        return logits, info.kept_indices, [p.grad.clone() for p in model.parameters() if p.grad is not None]

    whole = run()
    monkeypatch.setattr(spot.descriptors, "CPU_CHUNK_BYTES", 1)  # one sample per chunk
    chunked = run()
    torch.testing.assert_close(chunked[0], whole[0], rtol=1e-5, atol=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(chunked[1], whole[1], strict=True))
    assert len(chunked[2]) == len(whole[2]) > 0
    for a, b in zip(chunked[2], whole[2], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_torch_compile_gives_the_eager_prune_mode_and_one_chunk(monkeypatch):
    """``torch.compile`` sees the batch as one chunk and computes what the chunked eager model does."""
    import spot.descriptors
    from spot.descriptors import batch_chunks

    monkeypatch.setattr(spot.descriptors, "CPU_CHUNK_BYTES", 1)  # eager: one sample per chunk

    @torch.compile(fullgraph=True)
    def chunk_count(x):
        return x + len(batch_chunks(5, 6, 197, x.device))

    assert chunk_count(torch.zeros(1)).item() == 1.0
    model = tiny("deit_s", rho=0.6).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.inference_mode():
        eager, e_info = model(x, return_info=True)
        compiled, c_info = torch.compile(model)(x, return_info=True)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(c_info.kept_indices, e_info.kept_indices, strict=True))
