"""Loss terms beyond the clipped surrogate: the KL estimators' gradients by exact
expectation, GSPO's defaults and log-ratio clamp, importance weights of rows an earlier
policy sampled, the entropy bonus, and dynamic sampling decided on the estimator's output."""

from __future__ import annotations

import math

import pytest
import torch

from grpo_lab.config import AlgoConfig
from grpo_lab.data import RolloutBatch
from grpo_lab.training.forward import response_logprobs
from grpo_lab.losses import aggregate, behaviour_weights, clipped_policy_loss, kl_penalty, LossScale
from grpo_lab.training.step import informative_rows, policy_gradient_backward


# ------------------------------------------------------------------ KL estimators as losses
def expected_loss_gradient(estimator, logits, ref_logp):
    """The exact expectation over x ~ pi of the gradient of k(log pi(x) - log ref(x)),
    each sample's weight pi(x) held fixed (as it is for a sampled token)."""
    logp = torch.log_softmax(logits, -1)
    loss = (logp.exp().detach() * kl_penalty(logp, ref_logp, estimator)).sum()
    return torch.autograd.grad(loss, logits)[0]


@pytest.mark.parametrize("seed", range(3))
def test_kl_estimator_gradients_point_where_the_docs_say(seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    ref_logp = torch.log_softmax(torch.randn(6, generator=g, dtype=torch.float64), -1)

    def grad_of(fn):
        return torch.autograd.grad(fn(torch.log_softmax(logits, -1)), logits)[0]

    reverse = grad_of(lambda logp: (logp.exp() * (logp - ref_logp)).sum())  # KL(pi || ref)
    forward = grad_of(lambda logp: (ref_logp.exp() * (ref_logp - logp)).sum())  # KL(ref || pi)
    assert torch.allclose(expected_loss_gradient("k1", logits, ref_logp), torch.zeros(6, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(expected_loss_gradient("k2", logits, ref_logp), reverse, atol=1e-12)
    assert torch.allclose(expected_loss_gradient("k3", logits, ref_logp), forward, atol=1e-12)
    for straight_through in ("k1+", "k3+", "abs+"):  # the estimator's value, k2's gradient
        assert torch.allclose(expected_loss_gradient(straight_through, logits, ref_logp), reverse, atol=1e-12)
    assert not torch.allclose(reverse, forward, atol=1e-3)  # the two directions differ here


# ------------------------------------------------------------------ GSPO
def test_gspo_has_its_own_defaults_and_explicit_values_stay():
    gspo = AlgoConfig(ratio_level="sequence")
    assert gspo.loss_settings() == (3e-4, 4e-4, "seq-mean-token-mean")
    assert AlgoConfig().loss_settings() == (0.2, 0.28, "token-mean")
    assert AlgoConfig(ratio_level="sequence", clip_low=1e-3, loss_agg="token-mean").loss_settings() == (1e-3, 4e-4, "token-mean")
    gspo.validate()  # fills the defaults in, so that the logged config shows them
    assert (gspo.clip_low, gspo.clip_high, gspo.loss_agg) == (3e-4, 4e-4, "seq-mean-token-mean")


def test_gspo_log_ratio_is_clamped_and_one_pass_ratios_are_one():
    logp = torch.tensor([[0.0, 0.0], [-1.0, -2.0]], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[-20.0, -20.0], [-1.0, -2.0]], dtype=torch.float64)  # row 0: sequence log-ratio 20
    mask = torch.ones(2, 2, dtype=torch.float64)
    loss, metrics = clipped_policy_loss(logp, old, torch.tensor([1.0, 1.0], dtype=torch.float64), mask,
                                        clip_low=3e-4, clip_high=4e-4, ratio_level="sequence", loss_agg="seq-mean-token-mean")
    assert metrics["ratio_max"].item() == pytest.approx(math.exp(10.0))  # clamped, not e^20
    loss.backward()
    assert torch.equal(logp.grad[0], torch.zeros(2, dtype=torch.float64))  # no gradient past the clamp
    # one pass over fresh rows: old = current, detached, so every sequence ratio is exactly 1
    _, metrics = clipped_policy_loss(logp, logp.detach(), torch.tensor([1.0, -1.0], dtype=torch.float64), mask,
                                     clip_low=3e-4, clip_high=4e-4, ratio_level="sequence")
    assert metrics["ratio_mean"].item() == 1.0 and metrics["clip_frac"].item() == 0.0


# ------------------------------------------------------------------ behaviour (off-policy) weights
def test_behaviour_weights_by_hand():
    old = torch.log(torch.tensor([[0.6, 0.3], [0.6, 0.3]]))
    rollout = torch.log(torch.tensor([[0.2, 0.6], [0.2, 0.6]]))  # ratios 3 and 0.5 on both rows
    mask = torch.ones(2, 2)
    stale = torch.tensor([True, False])
    w, m = behaviour_weights(old, rollout, mask, stale, tis_cap=None, stale_cap=2.0)
    assert torch.allclose(w, torch.tensor([[2.0, 0.5], [1.0, 1.0]]))  # the fresh row is untouched without TIS
    assert m["off_policy_weight_mean"].item() == pytest.approx(1.25) and "tis_weight_mean" not in m
    w, m = behaviour_weights(old, rollout, mask, stale, tis_cap=1.5, stale_cap=2.0)
    assert torch.allclose(w, torch.tensor([[2.0, 0.5], [1.5, 0.5]]))
    assert m["tis_frac_truncated"].item() == pytest.approx(0.5)
    assert behaviour_weights(old, rollout, mask, torch.tensor([False, False]), None, 2.0) == (None, {})


def test_a_reused_rows_gradient_weight_is_its_truncated_ratio(tiny_model):
    """AR3PO off_policy reuse: one optimizer pass, the reused row's per-token gradient
    weight is min(pi_old / pi_behaviour, cap), computed here by hand from the ratios we planted."""
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(2, 300, (6,), generator=g) for _ in range(2)]
    responses = [torch.randint(2, 300, (3,), generator=g) for _ in range(2)]
    with torch.no_grad():
        current, _, _ = response_logprobs(tiny_model, prompts, responses)
    planted = torch.tensor([3.0, 0.5, 1.5])  # pi_old / pi_behaviour of the reused row's tokens
    behaviour = current[1] - planted.log()
    batch = RolloutBatch(
        group_id=[0, 0], traj_id=[0, 1], step=[0, 0], prompt_ids=prompts, response_ids=responses,
        rollout_logprobs=[current[0], behaviour], loss_mask=[torch.ones(3)] * 2, reward=[0.0, 1.0],
        done=[True, True], valid_action=[True, True], anchor=["s", "s"], off_policy=[False, True],
    )
    adv = torch.tensor([-0.5, 1.0])
    tiny_model.zero_grad(set_to_none=True)
    policy_gradient_backward(tiny_model, batch, torch.arange(2), adv, None, AlgoConfig(off_policy_is_cap=2.0).objective(),
                             micro_batch_size=2, max_tokens=3)
    got = [p.grad.clone() for p in tiny_model.parameters()]
    # by hand: token-mean over 6 tokens of -A * w * log pi, w = 1 on the fresh row, min(ratio, 2) on the reused one
    tiny_model.zero_grad(set_to_none=True)
    logp, _, _ = response_logprobs(tiny_model, prompts, responses)
    weight = torch.stack([torch.ones(3), torch.tensor([2.0, 0.5, 1.5])])
    (-(adv[:, None] * weight * logp).sum() / 6).backward()
    for a, b in zip(got, (p.grad for p in tiny_model.parameters())):
        assert torch.allclose(a, b, atol=1e-7, rtol=1e-5)


# ------------------------------------------------------------------ entropy bonus
def test_entropy_bonus_trains_every_row_and_has_the_entropy_gradient(tiny_model):
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(2, 300, (5,), generator=g) for _ in range(2)]
    responses = [torch.randint(2, 300, (n,), generator=g) for n in (2, 4)]
    batch = RolloutBatch(
        group_id=[0, 0], traj_id=[0, 1], step=[0, 0], prompt_ids=prompts, response_ids=responses,
        rollout_logprobs=[torch.zeros(2), torch.zeros(4)], loss_mask=[torch.ones(2), torch.ones(4)], reward=[1.0, 1.0],
        done=[True, True], valid_action=[True, True], anchor=["s", "s"],
    )
    zero = torch.zeros(2)  # no advantage anywhere: only the entropy term trains
    tiny_model.zero_grad(set_to_none=True)
    metrics = policy_gradient_backward(tiny_model, batch, torch.arange(2), zero, None, AlgoConfig(entropy_coef=0.1).objective(),
                                       micro_batch_size=1, max_tokens=4)
    assert metrics["entropy"][0] > 0
    got = [p.grad.clone() for p in tiny_model.parameters()]
    tiny_model.zero_grad(set_to_none=True)
    _, mask, entropy = response_logprobs(tiny_model, prompts, responses, with_entropy=True, entropy_grad=True)
    (-0.1 * aggregate(entropy, mask, "token-mean", LossScale.of(mask))).backward()
    for a, b in zip(got, (p.grad for p in tiny_model.parameters())):
        assert torch.allclose(a, b, atol=1e-7, rtol=1e-5)


def test_entropy_is_detached_unless_asked(tiny_model):
    ids = [torch.tensor([3, 4, 5])]
    _, _, detached = response_logprobs(tiny_model, ids, ids, with_entropy=True)
    _, _, live = response_logprobs(tiny_model, ids, ids, with_entropy=True, entropy_grad=True)
    assert not detached.requires_grad and live.requires_grad


# ------------------------------------------------------------------ dynamic sampling
def test_dynamic_sampling_decides_on_the_estimators_output():
    """Group 0's returns are all equal but GiGPO gives its steps advantages: it stays.
    Group 1 has all-zero advantages: it goes. 2-D advantages count any non-zero token."""
    group = torch.tensor([0, 0, 0, 1, 1, 2])
    adv = torch.tensor([0.0, 0.3, -0.3, 0.0, 0.0, 0.0])
    assert informative_rows(group, adv).tolist() == [0, 1, 2]
    adv2 = torch.zeros(6, 3)
    adv2[5, 2] = 1.0
    assert informative_rows(group, adv2).tolist() == [5]
