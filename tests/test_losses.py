"""SPOT losses (Eq. 11-15) against naive float64 references written from the paper's equations."""

import math
from types import SimpleNamespace

import pytest
import torch

from spot.losses import (
    classification_loss,
    default_lambdas,
    kl_loss,
    rate_loss,
    spot_loss,
    token_cosine_loss,
)


def _softmax(row: list[float]) -> list[float]:
    top = max(row)
    exps = [math.exp(v - top) for v in row]
    return [e / sum(exps) for e in exps]


def _ref_cross_entropy(logits: torch.Tensor, soft_targets: torch.Tensor) -> float:
    """Eq. 11: mean over samples of -sum_c y_c log p_c."""
    total = 0.0
    for row, target in zip(logits.tolist(), soft_targets.tolist(), strict=True):
        probs = _softmax(row)
        total -= sum(t * math.log(p) for t, p in zip(target, probs, strict=True))
    return total / len(logits)


def _ref_kl(student: torch.Tensor, teacher: torch.Tensor) -> float:
    """Eq. 13: sum_c y'_c log(y'_c / y_c), averaged over samples."""
    total = 0.0
    for s_row, t_row in zip(student.tolist(), teacher.tolist(), strict=True):
        p_s, p_t = _softmax(s_row), _softmax(t_row)
        total += sum(t * math.log(t / s) for t, s in zip(p_t, p_s, strict=True))
    return total / len(student)


def _ref_cosine_loss(student: torch.Tensor, teacher: torch.Tensor, keep: torch.Tensor) -> float:
    """Eq. 14 over every kept token of the batch (pooled)."""
    terms = []
    for b in range(keep.shape[0]):
        for n in range(keep.shape[1]):
            if keep[b, n]:
                s, t = student[b, n].tolist(), teacher[b, n].tolist()
                dot = sum(x * y for x, y in zip(s, t, strict=True))
                norms = math.sqrt(sum(x * x for x in s)) * math.sqrt(sum(y * y for y in t))
                terms.append(1.0 - dot / norms)
    return sum(terms) / len(terms)


def _masks_with_counts(counts: list[list[int]], num_patches: int) -> list[torch.Tensor]:
    """Per-stage (B, N0) masks whose sample b keeps the first counts[k][b] patches."""
    return [
        torch.stack([(torch.arange(num_patches) < c).float() for c in stage_counts])
        for stage_counts in counts
    ]


# --- default_lambdas ---------------------------------------------------------------------------


def test_default_lambdas_paper_values():
    assert default_lambdas("deit_small_patch16_224") == {"rate": 2.0, "kl": 0.5, "token": 0.0}
    assert default_lambdas("lvvit_s") == {"rate": 2.0, "kl": 0.5, "token": 10.0}


def test_default_lambdas_unknown_backbone():
    with pytest.raises(ValueError, match="vit_base"):
        default_lambdas("vit_base_patch16_224")


# --- Eq. 11 --------------------------------------------------------------------------------------


def test_classification_loss_hard_targets_match_reference():
    torch.manual_seed(0)
    logits = torch.randn(4, 5)
    target = torch.tensor([0, 3, 4, 1])
    one_hot = torch.eye(5)[target]
    assert classification_loss(logits, target).item() == pytest.approx(
        _ref_cross_entropy(logits, one_hot), rel=1e-5
    )


def test_classification_loss_soft_targets_match_reference():
    torch.manual_seed(1)
    logits = torch.randn(3, 4)
    soft = torch.tensor([[0.7, 0.3, 0.0, 0.0], [0.0, 0.0, 0.2, 0.8], [0.25, 0.25, 0.25, 0.25]])
    assert classification_loss(logits, soft).item() == pytest.approx(
        _ref_cross_entropy(logits, soft), rel=1e-5
    )


def test_classification_loss_label_smoothing_mixes_in_uniform():
    torch.manual_seed(2)
    logits = torch.randn(3, 4)
    target = torch.tensor([1, 0, 2])
    eps = 0.1
    smoothed = torch.eye(4)[target] * (1 - eps) + eps / 4
    loss = classification_loss(logits, target, label_smoothing=eps)
    assert loss.item() == pytest.approx(_ref_cross_entropy(logits, smoothed), rel=1e-5)


def test_classification_loss_rejects_bad_target():
    with pytest.raises(ValueError, match="soft targets"):
        classification_loss(torch.randn(2, 3), torch.tensor([0.0, 1.0]))


# --- Eq. 12 --------------------------------------------------------------------------------------


def test_rate_loss_hand_computed():
    # 10 patches, 2 samples, rho 0.7 -> targets 0.7, 0.49, 0.343.
    masks = _masks_with_counts([[7, 8], [5, 4], [3, 3]], num_patches=10)
    deviations = [0.0, 0.1, 0.01, 0.09, 0.043, 0.043]
    expected = sum(d * d for d in deviations) / 6  # = 0.021898 / 6
    assert expected == pytest.approx(0.021898 / 6, rel=1e-9)
    assert rate_loss(masks, rho=0.7).item() == pytest.approx(expected, rel=1e-5)


def test_rate_loss_zero_on_target():
    masks = _masks_with_counts([[50, 50], [25, 25]], num_patches=100)
    assert rate_loss(masks, rho=0.5).item() == pytest.approx(0.0, abs=1e-7)


def test_rate_loss_gradient_reaches_masks():
    masks = [m.requires_grad_() for m in _masks_with_counts([[8, 6]], num_patches=10)]
    rate_loss(masks, rho=0.7).backward()
    # d/dm of mean_b (mean_n m_bn - 0.7)^2 = 2 (frac_b - 0.7) / (B * N0)
    assert torch.allclose(masks[0].grad[0], torch.full((10,), 2 * 0.1 / 20))
    assert torch.allclose(masks[0].grad[1], torch.full((10,), 2 * -0.1 / 20))


def test_rate_loss_rejects_empty_and_bad_rho():
    with pytest.raises(ValueError, match="at least one"):
        rate_loss([], rho=0.7)
    with pytest.raises(ValueError, match="rho"):
        rate_loss(_masks_with_counts([[1]], num_patches=2), rho=1.5)


# --- Eq. 13 --------------------------------------------------------------------------------------


def test_kl_zero_for_identical_logits():
    logits = torch.randn(4, 6)
    assert kl_loss(logits, logits.clone()).item() == pytest.approx(0.0, abs=1e-6)


def test_kl_matches_reference_and_direction():
    student = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    teacher = torch.tensor([[0.0, 1.0, 0.0], [1.0, -2.0, 0.0]])
    value = kl_loss(student, teacher).item()
    assert value > 0
    assert value == pytest.approx(_ref_kl(student, teacher), rel=1e-5)
    # KL is asymmetric: the reversed direction is a different number.
    assert value != pytest.approx(_ref_kl(teacher, student), rel=1e-3)


def test_kl_float32_for_half_inputs_and_teacher_detached():
    student = torch.randn(2, 5, dtype=torch.bfloat16, requires_grad=True)
    teacher = torch.randn(2, 5, dtype=torch.bfloat16, requires_grad=True)
    loss = kl_loss(student, teacher)
    assert loss.dtype == torch.float32
    loss.backward()
    assert student.grad is not None and teacher.grad is None


# --- Eq. 14 --------------------------------------------------------------------------------------


def test_token_cosine_matches_reference_pooled_over_kept_tokens():
    torch.manual_seed(3)
    student, teacher = torch.randn(2, 5, 4), torch.randn(2, 5, 4)
    # Unequal kept counts (3 and 1), so pooled and per-sample averaging differ.
    keep = torch.tensor([[1.0, 0.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0, 0.0]])
    expected = _ref_cosine_loss(student, teacher, keep.bool())
    per_sample = (
        _ref_cosine_loss(student[:1], teacher[:1], keep[:1].bool())
        + _ref_cosine_loss(student[1:], teacher[1:], keep[1:].bool())
    ) / 2
    assert expected != pytest.approx(per_sample, rel=1e-3)
    assert token_cosine_loss(student, teacher, keep).item() == pytest.approx(expected, rel=1e-5)
    assert token_cosine_loss(student, teacher, keep.bool()).item() == pytest.approx(expected, rel=1e-5)


def test_token_cosine_ignores_dropped_tokens():
    torch.manual_seed(4)
    student, teacher = torch.randn(2, 4, 3), torch.randn(2, 4, 3)
    keep = torch.tensor([[True, False, True, True], [True, True, False, False]])
    before = token_cosine_loss(student, teacher, keep)
    student[0, 1] = torch.randn(3) * 100
    teacher[1, 3] = -teacher[1, 3]
    assert token_cosine_loss(student, teacher, keep).item() == pytest.approx(before.item(), rel=1e-6)


def test_token_cosine_zero_for_aligned_and_two_for_opposite():
    tokens = torch.randn(1, 3, 4)
    keep = torch.ones(1, 3)
    assert token_cosine_loss(tokens * 3.0, tokens, keep).item() == pytest.approx(0.0, abs=1e-6)
    assert token_cosine_loss(-tokens, tokens, keep).item() == pytest.approx(2.0, abs=1e-6)


def test_token_cosine_no_kept_token_is_zero_with_graph():
    student = torch.randn(2, 3, 4, requires_grad=True)
    loss = token_cosine_loss(student, torch.randn(2, 3, 4), torch.zeros(2, 3))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(student.grad, torch.zeros_like(student))


def test_token_cosine_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="keep"):
        token_cosine_loss(torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.ones(2, 4))


# --- Eq. 15 --------------------------------------------------------------------------------------


def _sparse_case():
    torch.manual_seed(5)
    logits = torch.randn(2, 4, requires_grad=True)
    target = torch.tensor([1, 3])
    masks = _masks_with_counts([[3, 2]], num_patches=4)
    info = SimpleNamespace(masks=masks, tokens=torch.randn(2, 4, 3), keep=masks[-1])
    return logits, target, info, torch.randn(2, 4), torch.randn(2, 4, 3)


def test_spot_loss_weights_the_parts():
    logits, target, info, t_logits, t_tokens = _sparse_case()
    lambdas = {"rate": 2.0, "kl": 0.5, "token": 10.0}
    total, parts = spot_loss(
        logits, target, info, rho=0.5, lambdas=lambdas, teacher_logits=t_logits, teacher_tokens=t_tokens
    )
    ce = _ref_cross_entropy(logits.detach(), torch.eye(4)[target])
    rate = ((0.75 - 0.5) ** 2 + (0.5 - 0.5) ** 2) / 2
    kl = _ref_kl(logits.detach(), t_logits)
    token = _ref_cosine_loss(info.tokens, t_tokens, info.keep.bool())
    assert parts["ce"] == pytest.approx(ce, rel=1e-5)
    assert parts["rate"] == pytest.approx(rate, rel=1e-6)
    assert parts["kl"] == pytest.approx(kl, rel=1e-5)
    assert parts["token"] == pytest.approx(token, rel=1e-5)
    assert parts["total"] == pytest.approx(ce + 2.0 * rate + 0.5 * kl + 10.0 * token, rel=1e-5)
    assert total.item() == pytest.approx(parts["total"], rel=1e-6)
    assert all(isinstance(v, float) for v in parts.values())
    total.backward()
    assert logits.grad is not None


def test_spot_loss_zero_weight_terms_do_not_count_and_need_no_teacher():
    logits, target, info, _, _ = _sparse_case()
    total, parts = spot_loss(logits, target, info, rho=0.5, lambdas={"rate": 0.0, "kl": 0.0, "token": 0.0})
    assert parts["rate"] > 0
    assert parts["kl"] == 0.0 and parts["token"] == 0.0
    assert total.item() == pytest.approx(parts["ce"], rel=1e-6)


def test_spot_loss_dense_model_has_zero_rate():
    logits, target, info, t_logits, _ = _sparse_case()
    dense = SimpleNamespace(masks=[], tokens=info.tokens, keep=torch.ones(2, 4))
    total, parts = spot_loss(
        logits, target, dense, rho=0.7, lambdas=default_lambdas("deit_tiny"), teacher_logits=t_logits
    )
    assert parts["rate"] == 0.0
    assert parts["total"] == pytest.approx(parts["ce"] + 0.5 * parts["kl"], rel=1e-6)


@pytest.mark.parametrize(
    ("lambdas", "teacher", "message"),
    [
        ({"rate": 2.0, "kl": 0.5, "token": 0.0}, {}, "teacher_logits"),
        ({"rate": 2.0, "kl": 0.0, "token": 10.0}, {}, "teacher_tokens"),
        ({"rate": 2.0, "kl": 0.5}, {"teacher_logits": torch.zeros(2, 4)}, "exactly the keys"),
        ({"rate": -1.0, "kl": 0.0, "token": 0.0}, {}, ">= 0"),
    ],
)
def test_spot_loss_clear_errors(lambdas, teacher, message):
    logits, target, info, _, _ = _sparse_case()
    with pytest.raises(ValueError, match=message):
        spot_loss(logits, target, info, rho=0.5, lambdas=lambdas, **teacher)
