"""The loss modifiers a TRL or verl user sets beside the policy loss: DeepSeek-V3.2's
bias-corrected KL (exact expected gradient) and off-policy sequence mask, the top-entropy
token selection, masking truncated completions, the adaptive entropy coefficient, and KL
in the reward with a fixed or adaptive coefficient; each by hand, then which tokens each
term of a micro-batch's loss sees."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from grpo_lab.config import AlgoConfig, ConfigError
from grpo_lab.data import RolloutBatch
from grpo_lab.losses import (POLICY_LOSSES, LossScale, Objective, bias_corrected_kl, high_entropy_keep, kl_penalty,
                             off_policy_sequence_keep)
from grpo_lab.losses.terms import k1
from grpo_lab.training.coefficients import AdaptiveEntropy, AdaptiveKL, FixedKL
from grpo_lab.training.kl_reward import KLInReward, row_kl_sums
from grpo_lab.training.step import MicroBatch, micro_batch_loss


# ------------------------------------------------------------------ bias-corrected KL
@pytest.mark.parametrize("seed", range(3))
def test_bias_corrected_k3_has_the_exact_gradient_of_the_reverse_kl(seed):
    """E_{x ~ pi_old}[grad (pi / pi_old) k3(x)] at pi_old = pi: the plain k3 gives the
    forward KL's gradient, the importance-weighted one that of KL(pi || ref)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    ref = torch.log_softmax(torch.randn(6, generator=g, dtype=torch.float64), -1)
    logp = torch.log_softmax(logits, -1)
    weights = logp.exp().detach()  # the sampling distribution pi_old, held fixed
    corrected = (weights * bias_corrected_kl(kl_penalty(logp, ref, "k3"), logp, logp.detach())).sum()
    got = torch.autograd.grad(corrected, logits)[0]
    reverse = torch.autograd.grad((torch.log_softmax(logits, -1).exp() * (torch.log_softmax(logits, -1) - ref)).sum(),
                                  logits)[0]
    assert torch.allclose(got, reverse, atol=1e-12)
    plain = torch.autograd.grad((weights * kl_penalty(torch.log_softmax(logits, -1), ref, "k3")).sum(), logits)[0]
    assert not torch.allclose(plain, reverse, atol=1e-3)


# ------------------------------------------------------------------ off-policy sequence mask
def test_off_policy_mask_drops_only_negative_rows_far_from_the_sampler():
    """Row means of log pi_rollout - log pi: (0.6, 0.6, 0.1, 0.6); threshold 0.5; advantages
    (1, -1, -1, 0): row 1 (A < 0, 0.6 > 0.5) leaves; row 0 (A > 0), row 2 (0.1), row 3
    (A = 0 counts as >= 0) stay."""
    logp = torch.zeros(4, 2, dtype=torch.float64)
    rollout = torch.tensor([[0.2, 1.0], [0.6, 0.6], [0.1, 0.1], [1.2, 0.0]], dtype=torch.float64)
    mask = torch.ones(4, 2, dtype=torch.float64)
    keep, metrics = off_policy_sequence_keep(torch.tensor([1.0, -1.0, -1.0, 0.0]), logp, rollout, mask, 0.5)
    assert keep.flatten().tolist() == [1.0, 0.0, 1.0, 1.0]
    assert float(metrics["off_policy_masked_frac"]) == pytest.approx(0.25)
    mask[3, 1] = 0.0  # row 3's mean is over its one token: 1.2, but A = 0 keeps it
    keep, _ = off_policy_sequence_keep(torch.tensor([1.0, -1.0, -1.0, -0.5]), logp, rollout, mask, 0.5)
    assert keep.flatten().tolist() == [1.0, 0.0, 1.0, 0.0]


# ------------------------------------------------------------------ top-entropy tokens
def test_top_entropy_keeps_the_tokens_at_or_above_the_quantile():
    """Entropies 1..8 on the mask (the 9 masked out): the 0.8 quantile of 1..8 by linear
    interpolation is 1 + 0.8 * 7 = 6.6: tokens 7 and 8 stay."""
    entropy = torch.tensor([[1.0, 2.0, 3.0, 4.0, 9.0], [5.0, 6.0, 7.0, 8.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0, 0.0]])
    keep, metrics = high_entropy_keep(entropy, mask, 0.2)
    assert keep.tolist() == [[0, 0, 0, 0, 0], [0, 0, 1, 1, 0]]
    assert float(metrics["entropy_threshold"]) == pytest.approx(6.6)
    assert torch.equal(high_entropy_keep(entropy, mask, 1.0)[0], mask)  # rho = 1 keeps every token
    assert int(high_entropy_keep(entropy, mask, 0.0)[0].sum()) == 1  # rho = 0: the top token only


# ------------------------------------------------------------------ which tokens each term sees
def micro(advantages, rollout_shift=0.0):
    m, r = 2, 3
    return MicroBatch(prompts=[torch.tensor([1])] * m, responses=[torch.tensor([1, 2, 3])] * m, groups=[[0, 1]],
                      loss_mask=torch.ones(m, r), old_logprobs=None,
                      rollout_logprobs=torch.full((m, r), -1.0 + rollout_shift), off_policy=torch.zeros(m, dtype=torch.bool),
                      advantages=torch.tensor(advantages), streams={})


def test_the_policy_loss_sees_the_kept_tokens_and_the_kl_every_token():
    """Top-entropy rho = 0.5 of entropies (1..6): tokens with 3.5+ stay for the policy loss
    (reinforce: -A logp / 6 each) and the entropy bonus; the k2 KL sees all 6 tokens."""
    logp = torch.full((2, 3), -1.0, dtype=torch.float32, requires_grad=True)
    entropy = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    ref = torch.full((2, 3), -1.5)
    objective = Objective(policy_loss=POLICY_LOSSES.get("reinforce"), kl_coef=0.1, kl_estimator=lambda d, c: 0.5 * d * d,
                          entropy_coef=0.01, top_entropy_quantile=0.5)
    scale = LossScale(num_tokens=6.0, num_seqs=2.0)
    loss, metrics = micro_batch_loss(objective, micro([1.0, -2.0]), logp, torch.ones(2, 3), entropy, ref, scale)
    # policy: -(-2)(-1) * 3 tokens of row 1 = -6 -> /6; entropy: (4+5+6)/6; kl: 6 * 0.5 * 0.25 / 6
    expected = -6.0 / 6 - 0.01 * 15.0 / 6 + 0.1 * (6 * 0.125) / 6
    assert float(loss.detach()) == pytest.approx(expected, abs=1e-6)
    loss.backward()
    kl_grad = 0.1 * 0.5 / 6  # d(0.5 d^2)/dlogp = d = 0.5
    assert logp.grad[0].tolist() == pytest.approx([kl_grad] * 3, abs=1e-7)  # row 0's tokens: below the threshold
    assert logp.grad[1].tolist() == pytest.approx([2.0 / 6 + kl_grad] * 3, abs=1e-7)


def test_the_off_policy_mask_reaches_the_micro_batch_loss():
    logp = torch.full((2, 3), -1.0, requires_grad=True)
    objective = Objective(policy_loss=POLICY_LOSSES.get("reinforce"), off_policy_mask_threshold=0.5)
    scale = LossScale(num_tokens=6.0, num_seqs=2.0)
    # the sampler's log-probs 1 nat above the policy's on every token: rows with A < 0 leave
    loss, metrics = micro_batch_loss(objective, micro([1.0, -2.0], rollout_shift=1.0), logp, torch.ones(2, 3),
                                     torch.ones(2, 3), None, scale)
    loss.backward()
    assert logp.grad[1].abs().sum() == 0 and logp.grad[0].tolist() == pytest.approx([-1.0 / 6] * 3)
    assert float(metrics["off_policy_masked_frac"]) == pytest.approx(0.5)


# ------------------------------------------------------------------ truncated completions
def test_rows_without_loss_keep_their_place_and_reward():
    batch = RolloutBatch(group_id=[0, 0], traj_id=[0, 1], step=[0, 0], prompt_ids=[[1], [1]],
                         response_ids=[[2, 3], [4]], rollout_logprobs=[[0.0, 0.0], [0.0]], loss_mask=[[1, 1], [1]],
                         reward=[1.0, 0.0], done=[True, True], valid_action=[True, True], anchor=[0, 0],
                         truncated=[True, False])
    out = batch.without_loss_on(batch.truncated)
    assert [m.tolist() for m in out.loss_mask] == [[0.0, 0.0], [1.0]]
    assert out.reward.tolist() == [1.0, 0.0] and out.truncated.tolist() == [True, False]
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        batch.without_loss_on(torch.zeros(3, dtype=torch.bool))


# ------------------------------------------------------------------ coefficients
def test_adaptive_kl_follows_verl_and_ziegler_by_hand():
    c = AdaptiveKL(value=0.1, target=0.1, horizon=100.0)
    c.observe(0.15, 10)  # error clip(0.5, -0.2, 0.2) = 0.2: value * (1 + 0.2 * 10 / 100)
    assert c.value == pytest.approx(0.1 * 1.02)
    c.observe(0.09, 50)  # error -0.1: * (1 - 0.1 * 0.5)
    assert c.value == pytest.approx(0.1 * 1.02 * 0.95)
    fixed = FixedKL(0.3)
    fixed.observe(10.0, 1000)
    assert fixed.value == 0.3


def test_adaptive_entropy_follows_skywork_by_hand():
    """c moves by the step toward the target; the coefficient is c while the entropy is at
    most the target, 0 above it; c never goes below 0."""
    e = AdaptiveEntropy(target=0.2, step=0.005)
    assert e.value == 0.0  # nothing measured yet
    e.observe(0.1)  # below: c = 0.005, coefficient 0.005
    assert (e.c, e.value) == (pytest.approx(0.005), pytest.approx(0.005))
    e.observe(0.15)
    assert e.value == pytest.approx(0.01)
    e.observe(0.3)  # above: c = 0.005, coefficient 0 (the entropy is over the target)
    assert (e.c, e.value) == (pytest.approx(0.005), 0.0)
    e.observe(0.4)
    e.observe(0.4)
    assert e.c == 0.0
    restored = AdaptiveEntropy(target=0.2, step=0.005)
    restored.load_state_dict(e.state_dict())
    assert restored == e


# ------------------------------------------------------------------ KL in the reward
def test_kl_in_reward_by_hand():
    """k1 per token (logp - ref): row 0 (0.5, 0.5), row 1 (1.0, masked 3.0): sums (1.0, 1.0),
    token means (0.5, 1.0): rewards (1 - 0.2, 0 - 0.2); the controller sees 0.75 over 2 rows."""
    batch = RolloutBatch(group_id=[0, 0], traj_id=[0, 1], step=[0, 0], prompt_ids=[[1], [1]],
                         response_ids=[[2, 3], [4, 5]], rollout_logprobs=[[0.0, 0.0], [0.0, 0.0]],
                         loss_mask=[[1, 1], [1, 0]], reward=[1.0, 0.0], done=[True, True], valid_action=[True, True],
                         anchor=[0, 0])
    policy = [torch.tensor([-1.0, -1.0]), torch.tensor([-1.0, -1.0])]
    reference = [torch.tensor([-1.5, -1.5]), torch.tensor([-2.0, -4.0])]
    sums, means = row_kl_sums(policy, reference, batch.loss_mask, k1)
    assert sums.tolist() == [1.0, 1.0] and means.tolist() == [0.5, 1.0]
    seen = []

    class Recorder(FixedKL):
        def observe(self, kl, rows):
            seen.append((kl, rows))

    out, metrics = KLInReward(Recorder(0.2), k1)(batch, policy, reference)
    assert (out.reward + out.reward_shaping).tolist() == pytest.approx([0.8, -0.2])
    assert out.reward.tolist() == [1.0, 0.0]  # the environment's, for the metrics
    assert seen == [(0.75, 2)] and metrics["kl_reward_coef"] == 0.2 and metrics["kl_reward"] == 0.75
    # a baseline episode (ReMax's greedy one) pays nothing and is not measured
    greedy = replace(batch, baseline_only=torch.tensor([False, True]))
    out, metrics = KLInReward(Recorder(0.2), k1)(greedy, policy[:1], reference[:1])
    assert out.reward_shaping.tolist() == pytest.approx([-0.2, 0.0]) and seen[-1] == (0.5, 1)


def test_bad_modifier_settings_are_named():
    for kwargs, match in [({"top_entropy_quantile": 1.5}, "top_entropy_quantile=1.5"),
                          ({"off_policy_mask_threshold": -1.0}, "off_policy_mask_threshold=-1.0"),
                          ({"entropy_target": 0.2, "entropy_coef": 0.01}, "entropy_coef=0.01"),
                          ({"kl_reward_coef": 0.1, "kl_reward_controller": "pid"}, r"kl_reward_controller='pid'.*adaptive"),
                          ({"kl_bias_correction": True}, "kl_bias_correction=True")]:
        with pytest.raises(ConfigError, match=match):
            AlgoConfig(**kwargs).validate()
    assert AlgoConfig(kl_reward_coef=0.1).needs_reference and not AlgoConfig().needs_reference
    assert math.isclose(AlgoConfig(kl_reward_coef=0.1, kl_reward_controller="adaptive").kl_in_reward().controller.value, 0.1)
