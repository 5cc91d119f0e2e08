"""What a run saves loads back the way a user loads it: ``AutoTokenizer`` and
``AutoModelForCausalLM`` on ``final_model/``, a checkpoint's ``model/`` and the vLLM
start-up copy give the same token ids as the run's tokenizer, on the environments' own
texts, and the same log-probs as the run's model."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import pytest

from grpo_lab.config import AlgoConfig, Config, EnvConfig, LoggerConfig, ModelConfig, TrainerConfig, WarmupConfig
from grpo_lab.envs import make_env
from grpo_lab.rollout.env_pool import EnvRunner, EnvSpec
from grpo_lab.training.forward import response_logprobs
from grpo_lab.build import build_model
from grpo_lab.trainer import Trainer
from grpo_lab.rollout.demonstrations import format_demonstrations, prompt_corpus

#: environments whose texts the saved tokenizer must encode as the run's does (digits,
#: grids, tags, names, punctuation)
ENVS = {"frozenlake": {}, "sokoban": {}, "countdown": {}, "search_qa": {}}


def env_texts() -> list[str]:
    texts = [" 12", "7 * (3 + 12) = 105", "<answer>42</answer>", "  two  spaces\n\nnew paragraph", "naïve café"]
    for name, kwargs in ENVS.items():
        factory = lambda: make_env(name, **kwargs)  # noqa: E731
        pairs = list(format_demonstrations(factory, 12, 4, 1, seed=3))
        texts += [p + " " + a for p, a in pairs] or list(prompt_corpus(factory, 12, seed=3))
    return texts


def tiny_config(architecture: str = "qwen2", **trainer) -> Config:
    return Config(
        algo=AlgoConfig(group_size=2),
        env=EnvConfig(max_steps=3),
        model=ModelConfig(tiny_architecture=architecture, tiny_hidden_size=64, tiny_num_heads=2, tiny_num_kv_heads=1,
                          tiny_intermediate_size=96, tiny_num_layers=1),
        trainer=TrainerConfig(total_steps=1, tasks_per_step=2, eval_episodes=2, warmup=WarmupConfig(steps=2, episodes=8),
                              **trainer),
        logger=LoggerConfig(wandb="false", progress_bar=False, plot=False),
    )


def assert_loads_the_same(directory, tokenizer, model, texts) -> None:
    loaded_tok = AutoTokenizer.from_pretrained(directory)
    for text in texts:
        assert loaded_tok(text)["input_ids"] == tokenizer(text)["input_ids"], (type(loaded_tok).__name__, text)
    assert (loaded_tok.eos_token_id, loaded_tok.pad_token_id) == (tokenizer.eos_token_id, tokenizer.pad_token_id)
    loaded = AutoModelForCausalLM.from_pretrained(directory).eval()
    model = model.eval()
    ids = [torch.tensor(tokenizer(t)["input_ids"]) for t in texts[:8]]
    prompts, responses = [i[: max(1, len(i) // 2)] for i in ids], [i[max(1, len(i) // 2):] for i in ids]
    keep = [k for k, r in enumerate(responses) if r.numel()]
    prompts, responses = [prompts[k] for k in keep], [responses[k] for k in keep]
    with torch.no_grad():
        want, mask, _ = response_logprobs(model, prompts, responses)
        got, _, _ = response_logprobs(loaded, prompts, responses)
    assert float(((want - got).abs() * mask).max()) == 0.0


@pytest.mark.parametrize("architecture", ["qwen2", "qwen3", "llama"])
def test_the_tiny_tokenizer_and_model_reload_identically_through_the_auto_classes(architecture, tmp_path):
    """transformers loads a directory whose config says qwen2 with Qwen2Tokenizer whatever
    class was saved: the tiny tokenizer must be one already (before, " 12" was one token
    in memory and three after the reload)."""
    cfg = tiny_config(architecture)
    envs = EnvRunner(EnvSpec.from_registry(cfg.env.name, dict(cfg.env.kwargs)), 0, None)
    envs.start()
    model, tokenizer = build_model(cfg, envs)
    model.save_pretrained(tmp_path)  # as the trainer writes final_model/ and vLLM's start-up copy
    tokenizer.save_pretrained(tmp_path)
    assert_loads_the_same(tmp_path, tokenizer, model, env_texts())


@pytest.mark.slow
def test_final_model_and_checkpoint_reload_as_the_run_left_them(tmp_path):
    trainer = Trainer(tiny_config(checkpoint_every=1), output_dir=tmp_path)
    trainer.train()
    texts = env_texts()
    assert_loads_the_same(tmp_path / "final_model", trainer.tokenizer, trainer.model, texts)
    assert_loads_the_same(tmp_path / "checkpoints" / "step_000000" / "model", trainer.tokenizer, trainer.model, texts)
