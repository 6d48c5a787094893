"""The learned selector can follow its keep-rate target: Gumbel gradients alive on peaked attention.

A trained ViT attends sharply. With descriptors relative to uniform attention (``descriptor_scale="count"``,
the default before issue 13), the variances of such maps enter the relevance MLP at up to n^4; its keep
probabilities start saturated, the straight-through Gumbel gradients vanish, and the train-mode keep rate
stays far from rho^k (docs/benchmarks.md, issue 13). These tests build peaked attention on a tiny model
and check the default (the paper's raw statistics); ``"count"`` shows the old failure. On the same model,
DynamicViT's masked softmax (``mask_grad="dynamicvit"``) hands the predictors cross-entropy gradients that
swamp the rate loss; the bounded default does not.
"""

import torch

import spot

ARCH = {"num_classes": 4, "img_size": 64, "patch_size": 8, "depth": 4, "embed_dim": 32, "num_heads": 2}


def sharp_model(rho: float = 0.7, **options) -> torch.nn.Module:
    """A tiny DeiT (64 patches) with large query/key weights, so that its attention maps are peaked."""
    torch.manual_seed(0)
    model = spot.create_model("deit_t", rho=rho, **ARCH, **options)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight[: 2 * ARCH["embed_dim"]].normal_(0.0, 0.5)
    return model


def images(count: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def keep_probabilities(model: torch.nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """The keep probability of every patch token at each stage, from the predictors' log-probabilities."""
    seen: list[torch.Tensor] = []
    hooks = [p.register_forward_hook(lambda _m, _i, out: seen.append(out[..., 0].exp()))
             for p in model.spot_predictors]
    with torch.no_grad():
        model.train()(images)
    for hook in hooks:
        hook.remove()
    return seen


def test_attention_is_peaked_in_the_test_model():
    model = sharp_model().eval()
    attn = {}
    block = model.blocks[2].attn
    hook = block.register_forward_hook(lambda m, i, o: attn.setdefault("x", i[0]))
    with torch.no_grad():
        model(images(8))
    hook.remove()
    x = attn["x"]
    q, k, _ = block.qkv(x).reshape(*x.shape[:2], 3, 2, 16).permute(2, 0, 3, 1, 4)
    probs = (q @ k.transpose(-2, -1) * block.scale).softmax(-1)
    assert probs.amax(-1).mean() > 0.3  # far from uniform attention (1/65)


def saturated_share(model: torch.nn.Module) -> float:
    probs = torch.cat([p.flatten() for p in keep_probabilities(model, images(16))])
    return ((probs < 0.02) | (probs > 0.98)).float().mean().item()


def test_untrained_keep_probabilities_are_not_saturated():
    assert saturated_share(sharp_model()) < 0.01
    assert saturated_share(sharp_model(descriptor_scale="count")) > 0.1  # the old default


def test_keep_rate_health_warns_when_the_rate_is_stuck():
    from pipelines.training.trainer import epoch_line, keep_rate_warning

    base = {
        "epoch": 0,
        "train_total": 0.5,
        "val_acc1": 0.9,
        "val_acc5": 1.0,
        "gmacs": 0.1,
        "epoch_time_s": 9.0,
    }
    healthy = {
        "train_kept_s1": 0.68,
        "train_kept_s2": 0.5,
        "train_keep_gap_s1": -0.02,
        "train_keep_gap_s2": 0.01,
    }
    stuck = {"train_kept_s1": 1.0, "train_kept_s2": 0.5, "train_keep_gap_s1": 0.3, "train_keep_gap_s2": 0.01}
    assert keep_rate_warning(base | healthy) is None
    assert "train kept 0.68/0.50" in epoch_line(base | healthy)
    warning = keep_rate_warning(base | stuck)
    assert "stage 1 1.00 (+0.30)" in warning and "stage 2" not in warning
    assert epoch_line(base | stuck).splitlines()[1] == warning


def predictor_gradient_norms(model: torch.nn.Module, seed: int) -> tuple[float, float]:
    """Norms of the relevance modules' gradients from cross-entropy and from the rate loss (l1 = 2)."""
    from spot.losses import classification_loss, rate_loss

    torch.manual_seed(seed)
    labels = torch.randint(0, ARCH["num_classes"], (16,))
    logits, info = model.train()(images(16, seed), return_info=True)
    params = list(model.spot_predictors.parameters())
    norms = []
    for loss in (classification_loss(logits, labels), 2.0 * rate_loss(info.masks, 0.7)):
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        norms.append(torch.stack([g.norm() for g in grads if g is not None]).norm().item())
    return norms[0], norms[1]


def test_rate_loss_is_not_swamped_by_the_masked_attention_gradient():
    """On peaked attention, DynamicViT's masked softmax gives the predictors cross-entropy gradients
    hundreds of times the rate loss's (its 1 / eps in rows whose kept keys hold almost no mass), so l1
    has no say and the keep rate drifts to 1; the bounded form (default) keeps them comparable."""
    for seed in range(3):
        ce, rate = predictor_gradient_norms(sharp_model(), seed)
        assert ce < 10 * rate
        ce, rate = predictor_gradient_norms(sharp_model(mask_grad="dynamicvit"), seed)
        assert ce > 100 * rate
