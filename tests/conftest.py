"""Shared fixtures: a tiny model and tokenizer built locally (no model hub)."""

from __future__ import annotations

import os
import random

import pytest
import torch

# Triton kernels run in Triton's interpreter on machines without CUDA. The variable must be
# set before anything imports triton (transformers may), so it is set here, first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from grpo_lab.envs import FrozenLakeEnv
from grpo_lab.modeling import build_tiny_model, train_tokenizer
from grpo_lab.rollout.demonstrations import format_demonstrations


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow end-to-end test: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tokenizer():
    pairs = format_demonstrations(lambda: FrozenLakeEnv(), 100, 8, 1, seed=0)
    return train_tokenizer([p + " " + a for p, a in pairs], vocab_size=400)


@pytest.fixture()
def tiny_model(tokenizer):
    return build_tiny_model(tokenizer, hidden_size=64, num_layers=2, num_heads=1, num_kv_heads=1, intermediate_size=128, seed=0)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    random.seed(0)
