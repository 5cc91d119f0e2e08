"""Packings as objects, and the default's choice: ``auto`` packs a micro-batch as a trie
where its cost model says that is cheaper than the plain forward, with the same
gradient either way (tests/test_trie.py checks the equality on real batches)."""

from __future__ import annotations

import random

import pytest
import torch

from grpo_lab.config import ConfigError, TrainerConfig
from grpo_lab.training.packing import NODE_COST, PACKINGS, TRIE_AT_MOST, get_packing, packing_costs


def test_costs_by_hand():
    """Rows [1,2,3] and [1,2,4,5], hidden size 1 (a query-key pair costs 1/6 token).
    Plain: 2 rows padded to 4 tokens, 2 * 4 * 4 pairs. Trie: sorted, the second row shares
    2 tokens with the first and adds 2; 3 + 2 tokens attending to rows of 3 and 4; nodes:
    a leaf per row and the branch node [1,2]."""
    plain, trie = packing_costs([torch.tensor([1, 2, 4, 5]), torch.tensor([1, 2, 3])], hidden_size=1)
    assert plain == pytest.approx(2 * 4 + 2 * 4 * 4 / 6)
    assert trie == pytest.approx(5 + (3 * 3 + 2 * 4) / 6 + NODE_COST * 3)


def group(prompt: int, answer: int, size: int, groups: int, seed: int = 0):
    rng = random.Random(seed)
    prompts, responses = [], []
    for _ in range(groups):
        p = torch.tensor([rng.randrange(500) for _ in range(prompt)])
        for _ in range(size):
            prompts.append(p)
            responses.append(torch.tensor([rng.randrange(500) for _ in range(answer)]))
    return prompts, responses


class Hidden:
    """A model as the cost model sees it: its config's hidden size."""

    def __init__(self, hidden: int) -> None:
        self.config = type("Config", (), {"hidden_size": hidden, "get_text_config": lambda self: self})()


@pytest.mark.parametrize("prompt, answer, size, chosen", [
    (300, 32, 4, "trie"),  # the sweep: 0.38x the plain time
    (100, 32, 16, "trie"),  # 0.39x
    (10, 256, 4, "none"),  # the trie saves 3% of the tokens and measured 0.94-1.00x
    (10, 16, 2, "none"),  # 32 groups of 2 sharing 10 tokens: the nodes cost more than the tokens saved
])
def test_auto_packs_where_the_trie_saves_and_not_where_it_does_not(prompt, answer, size, chosen):
    prompts, responses = group(prompt, answer, size, 64 // size)
    assert PACKINGS["auto"].choose(Hidden(128), prompts, responses).name == chosen
    plain, trie = packing_costs([torch.cat([p, r]) for p, r in zip(prompts, responses)], 128)
    assert (trie <= TRIE_AT_MOST * plain) == (chosen == "trie")


def test_rows_that_share_nothing_never_take_the_trie():
    prompts, responses = group(50, 20, 1, 32)
    assert PACKINGS["auto"].choose(Hidden(128), prompts, responses).name == "none"


def test_names_resolve_once_and_bad_names_list_the_valid_ones():
    assert get_packing("true") is PACKINGS["group"] and get_packing("false") is PACKINGS["none"]
    assert get_packing(PACKINGS["trie"]) is PACKINGS["trie"]
    assert TrainerConfig().validate() is None and TrainerConfig().packing == "auto"
    with pytest.raises(ConfigError, match=r"trainer.packing='nope'.*\['auto', 'group', 'none', 'trie'\]"):
        TrainerConfig(packing="nope").validate()


def test_the_old_key_shared_prefix_is_read_as_packing_with_a_warning():
    tc = TrainerConfig(shared_prefix="trie")
    with pytest.warns(FutureWarning, match="trainer.shared_prefix is now trainer.packing"):
        tc.validate()
    assert tc.packing == "trie" and tc.shared_prefix is None
    with pytest.warns(FutureWarning), pytest.raises(ConfigError, match="trainer.shared_prefix='group'"):
        TrainerConfig(packing="trie", shared_prefix="group").validate()
