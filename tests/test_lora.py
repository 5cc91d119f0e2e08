"""LoRA (PEFT): only the adapter trains, only the adapter travels to the backend, and the
backend then samples from exactly the trained policy."""

from __future__ import annotations

import copy
import json

import pytest
import torch

peft = pytest.importorskip("peft")

from grpo_lab.rollout import HFBackend, SamplingParams  # noqa: E402
from grpo_lab.training.forward import response_logprobs  # noqa: E402
from grpo_lab.training.lora import adapter_state, apply_lora, is_lora  # noqa: E402


def perturb_adapter(model, scale=0.5):
    """LoRA's B starts at zero (the adapter is a no-op); give it weight."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn_like(p) * scale)


def test_only_the_adapter_trains(tiny_model):
    model = apply_lora(tiny_model, r=4, alpha=8, dropout=0.0, target_modules="all-linear")
    assert is_lora(model) and not is_lora(torch.nn.Linear(1, 1))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_pushing_the_adapter_makes_the_backend_sample_the_trained_policy(tiny_model, tokenizer):
    """Property: after ``load_adapter`` the backend's log-probs equal the trainer's forward
    on the adapted model; before it they do not (the backend held the old adapter)."""
    model = apply_lora(tiny_model, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"])
    backend = HFBackend(model, tokenizer)
    perturb_adapter(model)
    prompts = [tokenizer(t)["input_ids"] for t in ("Frozen lake: reach G", "row 2")]

    @torch.no_grad()
    def gap():
        comps = backend.generate(prompts, SamplingParams(max_tokens=8))
        logp, _, _ = response_logprobs(model, [torch.tensor(p) for p in prompts], [torch.tensor(c.token_ids) for c in comps])
        return max(float((logp[i, : len(c.token_ids)] - torch.tensor(c.logprobs)).abs().max()) for i, c in enumerate(comps))

    model.eval()
    assert gap() > 1e-3
    tensors, config = adapter_state(model)
    backend.load_adapter(tensors, config)
    assert gap() < 1e-4


def test_the_push_carries_only_the_adapter(tiny_model):
    model = apply_lora(tiny_model, r=4, alpha=8, dropout=0.0, target_modules="all-linear")
    tensors, config = adapter_state(model)
    adapter_numel = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad)
    assert sum(t.numel() for t in tensors.values()) == adapter_numel
    assert adapter_numel < 0.2 * sum(p.numel() for p in model.parameters())
    assert all("lora_" in name for name in tensors) and config.r == 4


def test_a_backend_on_the_base_model_takes_the_adapter_and_samples_the_adapted_policy(tiny_model, tokenizer):
    """An engine process serves the base model: the first adapter pushed wraps it in the
    adapter's config, and it then samples the adapted policy (its log-probs are the
    PEFT model's forward), with the version given."""
    base = copy.deepcopy(tiny_model)
    backend = HFBackend(base, tokenizer)
    model = apply_lora(tiny_model, r=2, alpha=4, dropout=0.0, target_modules="all-linear")
    perturb_adapter(model)
    model.eval()
    backend.load_adapter(*adapter_state(model), version=7)
    prompts = [tokenizer(t)["input_ids"] for t in ("Frozen lake: reach G", "row 2")]
    comps = backend.generate(prompts, SamplingParams(max_tokens=8))
    with torch.no_grad():
        logp, _, _ = response_logprobs(model, [torch.tensor(p) for p in prompts],
                                       [torch.tensor(c.token_ids) for c in comps])
    assert max(float((logp[i, : len(c.token_ids)] - torch.tensor(c.logprobs)).abs().max())
               for i, c in enumerate(comps)) < 1e-4
    assert all(c.version == 7 for c in comps)


@pytest.mark.slow
def test_lora_training_run_changes_only_the_adapter(tmp_path):
    from grpo_lab.config import AlgoConfig, Config, EnvConfig, LoggerConfig, ModelConfig, TrainerConfig, WarmupConfig
    from grpo_lab.trainer import Trainer

    config = Config(
        algo=AlgoConfig(group_size=4, kl_coef=0.01),
        env=EnvConfig(max_steps=4),
        model=ModelConfig(tiny_hidden_size=64, tiny_num_heads=1, tiny_num_kv_heads=1, tiny_intermediate_size=128, lora_r=8),
        trainer=TrainerConfig(total_steps=2, tasks_per_step=4, eval_episodes=4, lr=1e-2,
                              warmup=WarmupConfig(steps=20, batch_size=16, episodes=40)),
        logger=LoggerConfig(wandb="false", progress_bar=False, plot=False),
    )
    trainer = Trainer(config, output_dir=tmp_path)
    base_before = {n: p.clone() for n, p in trainer.model.named_parameters() if not p.requires_grad}
    adapter_before = {n: p.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    assert all(torch.equal(after[n], p) for n, p in base_before.items())
    assert any(not torch.equal(after[n], p) for n, p in adapter_before.items())
    saved = json.loads((tmp_path / "final_model" / "adapter_config.json").read_text())
    assert saved["r"] == 8
    # the backend serves the trained adapter
    tensors, _ = adapter_state(trainer.model)
    backend_params = dict(trainer.backend.model.named_parameters())
    for name, t in tensors.items():
        key = name.replace(".weight", ".default.weight")
        assert torch.equal(backend_params[key], t)
