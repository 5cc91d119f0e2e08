"""Mixed precision, gradient checkpointing, learning-rate schedules, the sampler
registry, and the data-parallel reductions and refusals that need no second process."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from grpo_lab.advantages import compute_advantages
from grpo_lab.config import (AlgoConfig, Config, ConfigError, EnvConfig, LoggerConfig, ModelConfig, RolloutConfig,
                             TrainerConfig, WarmupConfig)
from grpo_lab.rollout.samplers import get_sampler, register_sampler, sampler_names
from grpo_lab.training import distributed as dp
from grpo_lab.training.step import policy_gradient_backward
from grpo_lab.training.update import build_lr_scheduler, enable_gradient_checkpointing


def small_config(**trainer) -> Config:
    return Config(
        algo=AlgoConfig(group_size=4),
        env=EnvConfig(max_steps=3),
        model=ModelConfig(tiny_hidden_size=64, tiny_num_heads=1, tiny_num_kv_heads=1, tiny_intermediate_size=128),
        rollout=RolloutConfig(env_workers=0, max_new_tokens=12),
        trainer=TrainerConfig(tasks_per_step=4, eval_episodes=0, lr=1e-3, device="cpu", save_final=False,
                              warmup=WarmupConfig(steps=30, batch_size=16, episodes=60), **trainer),
        logger=LoggerConfig(wandb="false", progress_bar=False, plot=False),
    )


@pytest.fixture(scope="module")
def rollout(tmp_path_factory):
    """A warmed-up tiny model and a batch from the real sampler, with learning signal."""
    from grpo_lab.trainer import Trainer

    cfg = small_config(output_dir=str(tmp_path_factory.mktemp("features")))
    trainer = Trainer(cfg)
    trainer.warmup()
    for step in range(20):
        batch = trainer.collect(step)
        adv = compute_advantages(batch, cfg.algo.estimator, cfg.algo.invalid_action_penalty, cfg.algo.params,
                                 cfg.algo.modifier_settings(), cfg.algo.penalty_placement).advantages
        if (adv != 0).any():
            break
    trainer.envs.close()
    return trainer, batch, adv


def gradients(model, batch, adv, algo, **kwargs) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model.train()
    policy_gradient_backward(model, batch, torch.arange(len(batch)), adv, None, algo.objective(), micro_batch_size=5,
                             max_tokens=12, **kwargs)
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("shared_prefix", [False, True, "trie"])
def test_gradient_checkpointing_gives_the_same_gradient(rollout, shared_prefix):
    """Recomputing activations in the backward changes memory, not the gradient (also
    through the shared-prefix forward)."""
    trainer, batch, adv = rollout
    plain, checkpointed = copy.deepcopy(trainer.model), copy.deepcopy(trainer.model)
    enable_gradient_checkpointing(checkpointed)
    assert checkpointed.is_gradient_checkpointing
    a = gradients(plain, batch, adv, trainer.config.algo, packing=shared_prefix)
    b = gradients(checkpointed, batch, adv, trainer.config.algo, packing=shared_prefix)
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-7, msg=name)


def test_bf16_mixed_precision_keeps_float32_weights_and_gradients_close_to_float32(rollout):
    """Under ``mixed_precision=bf16`` the forward computes in bf16 while weights and
    gradients stay float32; the gradient points where the float32 one does."""
    trainer, batch, adv = rollout
    model = copy.deepcopy(trainer.model)
    full = gradients(model, batch, adv, trainer.config.algo)
    half = gradients(model, batch, adv, trainer.config.algo,
                     autocast=lambda: dp.autocast(torch.device("cpu"), "bf16"))
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(g.dtype == torch.float32 for g in half.values())
    a = torch.cat([full[n].flatten() for n in full])
    b = torch.cat([half[n].flatten() for n in full])
    assert not torch.equal(a, b)  # bf16 really was used
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.99


def test_mixed_precision_refuses_half_precision_weights():
    with pytest.raises(ConfigError, match="trainer.mixed_precision.*model.dtype=float32"):
        Config(model=ModelConfig(dtype="bfloat16"), trainer=TrainerConfig(mixed_precision="bf16")).validate()


@pytest.mark.parametrize("bad", [{"strategy": "zero3"}, {"lr_scheduler": "step"}, {"lr_warmup_steps": -1},
                                 {"mixed_precision": "fp16"}])
def test_bad_cluster_settings_are_refused_by_name(bad):
    with pytest.raises(ConfigError, match=f"trainer.{next(iter(bad))}"):
        Config(trainer=TrainerConfig(**bad)).validate()


def test_learning_rate_schedules_by_hand():
    """2 warm-up steps to lr=1, then over the remaining 8 of 10: constant stays 1;
    linear falls by 1/8 a step; cosine follows 0.5 (1 + cos(pi k / 8))."""
    def lrs(name):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched = build_lr_scheduler(opt, name, warmup_steps=2, total_steps=10)
        out = []
        for _ in range(10):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    assert lrs("constant") == pytest.approx([0, 0.5] + [1.0] * 8)
    assert lrs("linear") == pytest.approx([0, 0.5] + [(10 - k) / 8 for k in range(2, 10)])
    assert lrs("cosine") == pytest.approx([0, 0.5] + [0.5 * (1 + math.cos(math.pi * (k - 2) / 8)) for k in range(2, 10)])


def test_the_trainer_steps_its_schedule_once_per_optimizer_step(rollout):
    """``trainer.lr_scheduler=linear`` over total_steps * minibatches optimizer steps:
    the logged ``lr`` is the one the last optimizer step used, and it falls as a hand
    count says."""
    trainer, batch, adv = rollout
    from grpo_lab.training.packing import PACKINGS
    from grpo_lab.training.update import PolicyUpdate, build_optimizer

    cfg = copy.deepcopy(trainer.config)
    cfg.trainer.lr_scheduler, cfg.trainer.total_steps, cfg.trainer.minibatches_per_epoch = "linear", 4, 2
    model = copy.deepcopy(trainer.model)
    opt = build_optimizer(model, 1e-3, 0.0)
    sched = build_lr_scheduler(opt, "linear", 0, cfg.trainer.optimizer_steps())
    tc = cfg.trainer
    update = PolicyUpdate(model, opt, sched, cfg.algo.objective(), PACKINGS[tc.packing], trainer.parts.pad_id,
                          torch.device("cpu"), epochs=tc.epochs_per_batch, minibatches=tc.minibatches_per_epoch,
                          micro_batch_size=tc.micro_batch_size, max_tokens=cfg.rollout.max_new_tokens,
                          temperature=cfg.rollout.temperature, seed=tc.seed)
    seen = [update(batch, adv)["lr"] for _ in range(2)]
    assert seen == pytest.approx([1e-3 * 7 / 8, 1e-3 * 5 / 8])  # 2 optimizer steps per batch, 8 in all


def test_samplers_sit_behind_a_registry():
    assert {"chain", "tree", "adaptive"} <= set(sampler_names())
    with pytest.raises(ValueError, match="already registered"):
        register_sampler("chain")(lambda ctx, seeds, ids: None)
    with pytest.raises(KeyError, match="valid names.*adaptive.*chain.*tree"):
        get_sampler("beam")
    with pytest.raises(ConfigError, match="rollout.sampler.*'beam'"):
        Config(rollout=RolloutConfig(sampler="beam")).validate()


def test_step_records_are_reduced_over_ranks(monkeypatch):
    """Counts add up, times take the slowest rank, other metrics are means weighted by
    each rank's rows (hand-worked for two ranks)."""
    from grpo_lab.training.metrics_log import reduce_record

    ranks = [({"num_rows": 10.0, "reward_mean": 1.0, "rollout_time": 3.0, "episodes_dropped": 1.0}, 10),
             ({"num_rows": 30.0, "reward_mean": 0.2, "rollout_time": 5.0, "episodes_dropped": 0.0}, 30)]
    import grpo_lab.training.metrics_log as metrics_log

    monkeypatch.setattr(metrics_log, "gather_objects", lambda ctx, obj: ranks)
    out = reduce_record(dp.DistContext(rank=0, world_size=2), {"step": 7, "num_rows": 10, "reward_mean": 1.0}, 10)
    assert out == {"step": 7, "num_rows": 40.0, "reward_mean": pytest.approx((10 * 1.0 + 30 * 0.2) / 40),
                   "rollout_time": 5.0, "episodes_dropped": 1.0, "world_size": 2}


def test_data_parallel_settings_are_refused_before_any_process_group(monkeypatch, tmp_path):
    """Under a launcher of 3 processes, 4 tasks per step cannot be split into whole
    groups; LoRA with FSDP is refused; both before anything starts."""
    from grpo_lab.trainer import Trainer

    already = torch.distributed.is_initialized()  # an in-process vLLM engine of an earlier test may have made one
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match="trainer.tasks_per_step=4 must be divisible by the 3 processes"):
        Trainer(small_config(output_dir=str(tmp_path)))
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = small_config(output_dir=str(tmp_path), strategy="fsdp")
    cfg.model.lora_r = 8
    with pytest.raises(ConfigError, match="model.lora_r=8 with trainer.strategy=fsdp"):
        Trainer(cfg)
    assert torch.distributed.is_initialized() == already


def test_strategy_follows_the_accelerate_config(monkeypatch):
    assert dp.resolve_strategy("auto", 1) == "none"
    assert dp.resolve_strategy("auto", 2) == "ddp"
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert dp.resolve_strategy("auto", 2) == "fsdp"
    assert dp.resolve_strategy("ddp", 2) == "ddp"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert dp.resolve_mixed_precision("auto") == "bf16" and dp.resolve_mixed_precision("no") == "no"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    with pytest.raises(ValueError, match="mixed_precision='fp16'"):
        dp.resolve_mixed_precision("auto")


def test_each_launched_process_sees_only_its_own_gpu():
    """Under a launcher, ``CUDA_VISIBLE_DEVICES`` is narrowed to the rank's device, so
    the trainer and a vLLM engine (which takes the first visible device) share it; a
    single process, or a list already narrowed, is left alone; too few devices is an
    error naming them."""
    assert dp.narrow_visible_devices({"WORLD_SIZE": "1", "LOCAL_RANK": "0"}) is None
    env = {"WORLD_SIZE": "8", "LOCAL_RANK": "3"}
    assert dp.narrow_visible_devices(env) == "3" and env["CUDA_VISIBLE_DEVICES"] == "3"
    env = {"WORLD_SIZE": "4", "LOCAL_RANK": "1", "CUDA_VISIBLE_DEVICES": "4,5,6,7"}
    assert dp.narrow_visible_devices(env) == "5"
    env = {"WORLD_SIZE": "4", "LOCAL_RANK": "1", "CUDA_VISIBLE_DEVICES": "6"}
    assert dp.narrow_visible_devices(env) is None and env["CUDA_VISIBLE_DEVICES"] == "6"
    with pytest.raises(ValueError, match="LOCAL_RANK=2 but CUDA_VISIBLE_DEVICES='0,1'"):
        dp.narrow_visible_devices({"WORLD_SIZE": "4", "LOCAL_RANK": "2", "CUDA_VISIBLE_DEVICES": "0,1"})
