"""Scenarios of the data-parallel tests, run in one process (the reference) or in every
rank under ``torchrun --nproc_per_node 2`` (gloo on the CPU).

    python tests/dp_worker.py update DIR STRATEGY      # one optimizer step per loss_agg
    python tests/dp_worker.py train DIR STRATEGY STEPS [RESUME]

``DIR`` holds ``model/`` (a tiny model and tokenizer) and, for ``update``, ``batch.pt``
(a rollout batch the real sampler produced); results are written back into ``DIR``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from grpo_lab.advantages import compute_advantages  # noqa: E402
from grpo_lab.config import AlgoConfig, Config, EnvConfig, LoggerConfig, ModelConfig, RolloutConfig, TrainerConfig, WarmupConfig  # noqa: E402
from grpo_lab.training import distributed as dp  # noqa: E402
from grpo_lab.losses import LOSS_AGG_MODES  # noqa: E402
from grpo_lab.trainer import Trainer  # noqa: E402

TASKS = 4


def config(strategy: str, **trainer) -> Config:
    """``strategy`` ``ddp``, ``fsdp``, ``auto``, or ``ddp+lora`` (a LoRA adapter, DDP)."""
    lora = strategy.endswith("+lora")
    strategy = strategy.removesuffix("+lora")
    return Config(
        algo=AlgoConfig(group_size=4),
        env=EnvConfig(max_steps=3),
        model=ModelConfig(tiny_hidden_size=64, tiny_num_heads=1, tiny_num_kv_heads=1, tiny_intermediate_size=128,
                          lora_r=8 if lora else 0),
        rollout=RolloutConfig(env_workers=0, max_new_tokens=12),
        trainer=TrainerConfig(tasks_per_step=TASKS, eval_episodes=4, lr=1e-3, warmup=WarmupConfig(steps=0), device="cpu",
                              strategy=strategy, save_final=False, **trainer),
        logger=LoggerConfig(wandb="false", progress_bar=False, plot=False),
    )


def load_model(directory: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(directory / "model", dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(directory / "model")


def full_weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {name: t.clone().cpu() for name, t in dp.full_tensors(trainer.model)}


def update(directory: Path, strategy: str) -> None:
    """One optimizer step per ``algo.loss_agg`` on this rank's groups of ``batch.pt``;
    rank 0 saves the weights after each."""
    batch = torch.load(directory / "batch.pt", weights_only=False)
    out = {}
    for mode in LOSS_AGG_MODES:
        cfg = config(strategy, micro_batch_size=3, output_dir=str(directory / f"run_{mode}"))
        cfg.algo.loss_agg = mode
        model, tokenizer = load_model(directory)
        trainer = Trainer(cfg, model=model, tokenizer=tokenizer)
        groups = torch.unique(batch.group_id)
        mine = trainer.dist.shard(groups.tolist())
        rows = torch.nonzero(torch.isin(batch.group_id, torch.tensor(mine))).flatten()
        local = batch.select(rows)
        adv = compute_advantages(local, cfg.algo.estimator, cfg.algo.invalid_action_penalty, cfg.algo.params,
                                 cfg.algo.modifier_settings(), cfg.algo.penalty_placement).advantages
        metrics = trainer.policy_update(local, adv)
        weights = full_weights(trainer)
        grads = {name: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
                 for name, p in trainer.model.named_parameters() if p.grad is not None}
        trainer.envs.close()
        if trainer.dist.is_main:
            out[mode] = {"weights": weights, "grads": grads, "metrics": metrics}
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save(out, directory / f"update_{dp.launched_world_size()}.pt")


def train(directory: Path, strategy: str, steps: int, resume: bool) -> None:
    """A run of ``steps`` steps (checkpoint every 2), or its resumption; each rank
    records the seeds and group ids it played, rank 0 the final weights."""
    cfg = config(strategy, total_steps=steps, checkpoint_every=2, keep_checkpoints=3,
                 output_dir=str(directory / "run"), resume="true" if resume else "false")
    model, tokenizer = load_model(directory)
    trainer = Trainer(cfg, model=model, tokenizer=tokenizer)
    played = []
    collect = trainer.collect

    def recording_collect(step):
        batch = collect(step)
        played.append({"step": step, "groups": sorted(set(batch.group_id.tolist())),
                       "rows_per_group": {int(g): int((batch.group_id == g).sum()) for g in set(batch.group_id.tolist())}})
        return batch

    trainer.collect = recording_collect
    trainer.train()
    tag = f"{dp.launched_world_size()}_{'resumed' if resume else 'straight'}"
    (directory / f"played_{tag}_rank{trainer.dist.rank}.json").write_text(json.dumps(played))
    weights = full_weights(trainer)
    if trainer.dist.is_main:
        torch.save(weights, directory / f"weights_{tag}.pt")


if __name__ == "__main__":
    scenario, directory, strategy = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    try:
        if scenario == "update":
            update(directory, strategy)
        else:
            train(directory, strategy, int(sys.argv[4]), len(sys.argv) > 5 and sys.argv[5] == "resume")
    except BaseException:
        dp.shutdown()
        raise
    dp.shutdown(wait=True)
