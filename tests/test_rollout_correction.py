"""Rollout correction (train/inference mismatch): importance weights at token, sequence
and geometric level, and rejection of tokens or rows whose ratio leaves a band; worked
by hand, and through the micro-batch loss."""

from __future__ import annotations

import math

import pytest
import torch

from grpo_lab.config import AlgoConfig, ConfigError
from grpo_lab.losses import RATIO_LEVELS_OF_ROWS, rejection_keep, truncated_is_weights

#: pi_old / pi_rollout = (2, 1, 0.5 | 1.5, 1.5, [masked 8])
OLD = torch.log(torch.tensor([[0.4, 0.3, 0.1], [0.3, 0.3, 0.8]], dtype=torch.float64))
ROLLOUT = torch.log(torch.tensor([[0.2, 0.3, 0.2], [0.2, 0.2, 0.1]], dtype=torch.float64))
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]], dtype=torch.float64)


def test_importance_weights_at_each_level_by_hand():
    token, _ = truncated_is_weights(OLD, ROLLOUT, MASK, 1.8, RATIO_LEVELS_OF_ROWS.get("token"))
    assert token[0].tolist() == pytest.approx([1.8, 1.0, 0.5]) and token[1, :2].tolist() == pytest.approx([1.5, 1.5])
    plain, _ = truncated_is_weights(OLD, ROLLOUT, MASK, 1.8)  # the default is the token level, exactly
    assert torch.equal(plain * MASK, token * MASK)
    seq, metrics = truncated_is_weights(OLD, ROLLOUT, MASK, 2.0, RATIO_LEVELS_OF_ROWS.get("sequence"))
    # row 0: 2 * 1 * 0.5 = 1; row 1: 1.5 * 1.5 = 2.25 -> capped at 2 (the masked token does not count)
    assert seq[0].tolist() == pytest.approx([1.0] * 3) and seq[1, :2].tolist() == pytest.approx([2.0, 2.0])
    assert float(metrics["tis_frac_truncated"]) == pytest.approx(2 / 5)
    geo, _ = truncated_is_weights(OLD, ROLLOUT, MASK, 5.0, RATIO_LEVELS_OF_ROWS.get("geometric"))
    assert geo[0].tolist() == pytest.approx([1.0] * 3) and geo[1, :2].tolist() == pytest.approx([1.5, 1.5])


def test_rejection_at_each_level_by_hand():
    keep, m = rejection_keep(OLD, ROLLOUT, MASK, RATIO_LEVELS_OF_ROWS.get("token"), 0.6, 1.6)
    assert (keep * MASK).tolist() == [[0.0, 1.0, 0.0], [1.0, 1.0, 0.0]]  # 2 and 0.5 leave [0.6, 1.6]
    assert float(m["rejected_frac"]) == pytest.approx(2 / 5)
    keep, _ = rejection_keep(OLD, ROLLOUT, MASK, RATIO_LEVELS_OF_ROWS.get("sequence"), 0.5, 2.0)
    assert (keep * MASK).tolist() == [[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]  # row 1's product 2.25 > 2
    keep, _ = rejection_keep(OLD, ROLLOUT, MASK, RATIO_LEVELS_OF_ROWS.get("geometric"), 1 / 1.4, 1.4)
    assert (keep * MASK).tolist() == [[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]  # row 1's geometric mean 1.5 > 1.4
    with pytest.raises(ValueError, match="band"):
        rejection_keep(OLD, ROLLOUT, MASK, RATIO_LEVELS_OF_ROWS.get("token"), 1.2, 2.0)


def test_rejected_tokens_give_no_gradient_and_the_others_the_plain_one():
    """The micro-batch loss with rejection equals the loss with those tokens masked by
    hand (the normaliser stays the mini-batch's, as stated)."""
    from grpo_lab.losses import LossScale
    from grpo_lab.training.step import MicroBatch, micro_batch_loss

    config = AlgoConfig(rejection="token", rejection_upper=1.6, rejection_lower=0.6)
    config.validate()
    objective = config.objective()
    micro = MicroBatch(prompts=[], responses=[], groups=[], loss_mask=MASK.float(), old_logprobs=OLD.float(),
                       rollout_logprobs=ROLLOUT.float(), off_policy=torch.zeros(2, dtype=torch.bool),
                       advantages=torch.tensor([1.0, -1.0]), streams={})
    scale = LossScale.of(MASK.float())

    def grad(objective, mask):
        logp = OLD.float().clone().requires_grad_(True)
        loss, metrics = micro_batch_loss(objective, micro, logp, mask, torch.zeros(2, 3), None, scale)
        loss.backward()
        return logp.grad, metrics

    rejected, metrics = grad(objective, torch.ones(2, 3))
    by_hand, _ = grad(AlgoConfig().objective(), torch.tensor([[0.0, 1.0, 0.0], [1.0, 1.0, 1.0]]))
    assert torch.allclose(rejected, by_hand) and float(metrics["rejected_frac"]) == pytest.approx(2 / 5)
    assert float(rejected[0, 0]) == 0.0 and float(rejected[0, 2]) == 0.0


def test_the_settings_are_checked_by_name():
    assert AlgoConfig(rejection="geometric", rejection_upper=1.001).rejection_bounds() == pytest.approx(
        (1 / 1.001, 1.001))
    for bad, key in ((dict(tis_level="row"), "algo.tis_level"), (dict(rejection="tokens"), "algo.rejection"),
                     (dict(rejection_upper=0.9), "algo.rejection_upper"), (dict(rejection_lower=1.5), "algo.rejection_lower")):
        with pytest.raises(ConfigError, match=key):
            AlgoConfig(**bad).validate()
    assert math.isclose(AlgoConfig(rejection_upper=4.0).rejection_bounds()[0], 0.25)
