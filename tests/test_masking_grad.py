"""spot.masking.policy_softmax: the bounded straight-through form computes the softmax over kept keys,
with the policy gradient of a dropped key bounded (DynamicViT's form: up to 1 / eps)."""

import torch

from spot.masking import policy_softmax


def peaked_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two rows of five keys; key 3 is dropped and holds a logit far above every kept one."""
    torch.manual_seed(0)
    logits = torch.randn(1, 1, 5, 5)
    logits[..., 3] += 40.0
    policy = torch.tensor([[1.0, 1.0, 1.0, 0.0, 1.0]], requires_grad=True)
    values = torch.randn(1, 1, 5, 2)
    return logits, policy, values


def test_forward_is_the_softmax_over_kept_keys():
    logits, policy, _ = peaked_case()
    kept = [0, 1, 2, 4]
    probs = policy_softmax(logits, policy)
    for query in kept:  # kept queries: exactly the softmax over kept keys, as pruning computes it
        expected = torch.zeros(5)
        expected[kept] = logits[0, 0, query, kept].softmax(-1)
        torch.testing.assert_close(probs[0, 0, query], expected, atol=1e-6, rtol=0)
    # DynamicViT's form agrees unless the kept keys hold less than ~eps of a row's mass, as here, where
    # its rows drift toward uniform
    assert (policy_softmax(logits, policy, bounded=False)[0, 0, 0] - probs[0, 0, 0]).abs().max() > 0.1
    moderate = torch.randn(2, 3, 7, 7)
    some = (torch.rand(2, 7) > 0.4).float()
    some[:, 0] = 1.0
    torch.testing.assert_close(policy_softmax(moderate, some), policy_softmax(moderate, some, bounded=False),
                               atol=1e-5, rtol=0)


def test_policy_gradient_of_a_dominant_dropped_key_is_bounded():
    grads = {}
    for bounded in (True, False):
        logits, policy, values = peaked_case()
        out = policy_softmax(logits, policy, bounded=bounded) @ values
        out[0, 0, 0].sum().backward()
        grads[bounded] = policy.grad[0, 3].abs().item()
    assert grads[True] <= (values[0, 0].abs().sum(-1).max() * 2).item()  # at most |v_j - out_i|, summed
    assert grads[False] > 1e3  # exp(40) / ... capped only by 1 / eps
