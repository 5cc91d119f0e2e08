"""End-to-end: a short training run changes the parameters and writes complete outputs."""

import json
import subprocess
import sys

import pytest
import torch

from grpo_lab.config import Config, EnvConfig, ModelConfig, TrainerConfig, WarmupConfig, AlgoConfig, LoggerConfig
from grpo_lab.training.resume import RunDirectoryError
from grpo_lab.trainer import Trainer

STEP_KEYS = {
    "step", "reward_mean", "success_rate", "episode_length", "invalid_action_rate", "num_rows", "response_tokens",
    "frac_zero_std_groups", "rollout_time", "update_time", "num_updates",
}
UPDATE_KEYS = {"loss", "grad_norm", "clip_frac", "approx_kl", "entropy", "logprob_diff_rollout"}


def small_config(**trainer):
    return Config(
        algo=AlgoConfig(group_size=4),
        env=EnvConfig(max_steps=4),
        model=ModelConfig(tiny_hidden_size=64, tiny_num_heads=1, tiny_num_kv_heads=1, tiny_intermediate_size=128),
        trainer=TrainerConfig(total_steps=3, tasks_per_step=4, eval_episodes=4, lr=1e-3,
                              warmup=WarmupConfig(steps=40, batch_size=16, episodes=60), **trainer),
        logger=LoggerConfig(wandb="false", progress_bar=False),
    )


@pytest.mark.slow
def test_training_changes_parameters_and_writes_outputs(tmp_path):
    trainer = Trainer(small_config(), output_dir=tmp_path)
    after_warmup = {}
    warmup = trainer.warmup

    def warmup_then_snapshot():
        losses = warmup()
        after_warmup.update({k: v.clone() for k, v in trainer.model.state_dict().items()})
        return losses

    trainer.warmup = warmup_then_snapshot
    summary = trainer.train()
    changed = [k for k, v in trainer.model.state_dict().items() if not torch.equal(v, after_warmup[k])]
    assert len(changed) == len(after_warmup), "RL left some parameters unchanged"
    # the backend generates with the trained weights
    for name, p in trainer.model.named_parameters():
        assert torch.equal(trainer.backend.model.get_parameter(name), p)

    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2]
    for r in records:
        assert STEP_KEYS <= set(r), STEP_KEYS - set(r)
        assert 0.0 <= r["success_rate"] <= 1.0
        if r["num_updates"]:
            assert UPDATE_KEYS <= set(r), UPDATE_KEYS - set(r)
            assert r["logprob_diff_rollout"] < 1e-3
    assert any(r["num_updates"] for r in records)
    assert (tmp_path / "training_curves.png").stat().st_size > 1000
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved == json.loads(json.dumps(summary))
    assert set(saved["eval_after_warmup"]) == {"success_rate", "reward_mean", "invalid_action_rate", "episode_length", "episodes",
                                             "episodes_dropped"}
    with pytest.raises(RunDirectoryError, match="metrics.jsonl"):
        Trainer(small_config(), output_dir=tmp_path).train()  # never overwrites an earlier run
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "final_model")
    assert torch.equal(reloaded.state_dict()["model.embed_tokens.weight"], trainer.model.state_dict()["model.embed_tokens.weight"])


@pytest.mark.slow
def test_micro_batch_size_does_not_change_the_gradient(tmp_path):
    from grpo_lab.advantages import compute_advantages
    from grpo_lab.training.step import policy_gradient_backward

    trainer = Trainer(small_config(), output_dir=tmp_path)
    batch = trainer.collect(0)
    adv = compute_advantages(batch, "grpo").advantages
    if not bool((adv != 0).any()):
        adv = torch.randn(len(batch))
    rows = torch.arange(len(batch))
    grads = []
    for micro in (len(batch), 3, 1):
        trainer.model.zero_grad(set_to_none=True)
        policy_gradient_backward(trainer.model, batch, rows, adv, None, AlgoConfig().objective(), micro_batch_size=micro,
                                 max_tokens=16, pad_id=trainer.parts.pad_id)
        grads.append(torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6, rtol=1e-4)
    assert torch.allclose(grads[0], grads[2], atol=1e-6, rtol=1e-4)


TINY_RUN = ["trainer.total_steps=2", "trainer.tasks_per_step=2", "algo.group_size=2", "env.max_steps=3",
            "trainer.eval_episodes=2", "trainer.warmup.steps=2", "trainer.warmup.episodes=10", "logger.wandb=false"]


def train_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "grpo_lab.train", *args], capture_output=True, text=True, timeout=600,
                          cwd=cwd)


@pytest.mark.slow
def test_command_line_run_keeps_everything_in_its_output_dir(tmp_path):
    """With trainer.output_dir, the resolved config (.hydra/) and train.log land there with
    the metrics, and nothing in ./outputs; run again there, it stops with one error line
    (exit 2), the traceback in the log, and the finished run untouched."""
    out = tmp_path / "runs" / "a"
    proc = train_cli(*TINY_RUN, f"trainer.output_dir={out}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "success rate:" in proc.stdout and "(2 eval episodes;" in proc.stdout
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    assert (out / ".hydra" / "config.yaml").is_file() and "output directory" in (out / "train.log").read_text()
    assert not (tmp_path / "outputs").exists()
    config = (out / ".hydra" / "config.yaml").read_text()
    again = train_cli(*TINY_RUN, f"trainer.output_dir={out}", cwd=tmp_path)
    assert again.returncode == 2
    lines = again.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "holds a finished run" in lines[0], again.stderr
    assert "Traceback" not in again.stderr and (out / ".hydra" / "config.yaml").read_text() == config


@pytest.mark.parametrize("args, expected, logged", [
    (["algo.nonsense=1"], "Could not override 'algo.nonsense'", False),
    (["trainer.lr=abc"], "could not be converted to Float", False),
    (["algo=nope"], "Could not find 'algo/nope'", False),
    (["algo.estimator=nope"], "valid names", False),
    (["model.name_or_path=./nope"], "model.name_or_path='./nope'", False),
    (["env=dataset", "env.kwargs.path=missing.jsonl"], "env.kwargs.path='missing.jsonl': no such file", True),
])
def test_a_user_mistake_is_one_error_line_and_exit_code_2(args, expected, logged, tmp_path):
    """Hydra's own override errors, bad values and missing files end alike: one line
    starting with 'error:', exit code 2, no traceback on the console; a mistake found once
    the run's log is open (the environment is built) leaves its traceback there. Mistakes
    in the config itself are found before anything is written."""
    out = tmp_path / "out"
    proc = train_cli(*args, f"trainer.output_dir={out}", cwd=tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], proc.stderr[-3000:]
    if logged:
        assert "Traceback" in (out / "train.log").read_text()
    else:
        assert not out.exists()


@pytest.mark.slow
def test_gigpo_with_focal_and_dynamic_sampling_trains(tmp_path):
    config = small_config()
    config.trainer.total_steps = 2
    config.algo = AlgoConfig(group_size=4, estimator="gigpo", params={"gamma": 0.9}, modifiers=["focal"],
                             drop_zero_std_groups=True)
    Trainer(config, output_dir=tmp_path).train()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2
    for r in records:
        assert {"step_group_size_mean", "frac_singleton_step_groups", "focal_scale_mean", "rows_dropped"} <= set(r)
        assert 0 <= r["rows_dropped"] <= r["num_rows"]


@pytest.mark.slow
def test_copo_blended_loss_trains(tmp_path):
    """COPO's global stream gives groups with one outcome a gradient too."""
    config = small_config()
    config.trainer.total_steps = 2
    config.algo = AlgoConfig(group_size=4, estimator="copo")
    Trainer(config, output_dir=tmp_path).train()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all({"copo_entropy_mean", "copo_local_weight_mean"} <= set(r) for r in records)
    assert any(r["num_updates"] for r in records)


def test_mini_batch_without_signal_makes_no_gradient(tiny_model):
    from grpo_lab.data import RolloutBatch
    from grpo_lab.training.step import policy_gradient_backward

    ids = torch.tensor([5, 6, 7])
    batch = RolloutBatch(
        group_id=[0, 0], traj_id=[0, 1], step=[0, 0], prompt_ids=[ids, ids], response_ids=[ids, ids],
        rollout_logprobs=[torch.zeros(3)] * 2, loss_mask=[torch.ones(3)] * 2, reward=[1.0, 1.0],
        done=[True, True], valid_action=[True, True], anchor=["s", "s"],
    )
    kwargs = dict(micro_batch_size=1, max_tokens=3)
    assert policy_gradient_backward(tiny_model, batch, torch.arange(2), torch.zeros(2), None, AlgoConfig().objective(), **kwargs) == {}
    assert all(p.grad is None for p in tiny_model.parameters())
    metrics = policy_gradient_backward(tiny_model, batch, torch.arange(2), torch.zeros(2), None, AlgoConfig().objective(), **kwargs,
                                       extras={"global_advantages": torch.ones(2), "local_weight": torch.zeros(2)})
    assert metrics and any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in tiny_model.parameters())


def _one_batch():
    from grpo_lab.data import RolloutBatch

    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(2, 300, (n,), generator=g) for n in (5, 9, 3, 7)]
    responses = [torch.randint(2, 300, (n,), generator=g) for n in (4, 2, 6, 3)]
    return RolloutBatch(
        group_id=[0, 0, 1, 1], traj_id=[0, 1, 2, 3], step=[0] * 4, prompt_ids=prompts, response_ids=responses,
        rollout_logprobs=[torch.full((len(r),), -3.0) for r in responses], loss_mask=[torch.ones(len(r)) for r in responses],
        reward=[1.0, 0.0, 0.0, 1.0], done=[True] * 4, valid_action=[True] * 4, anchor=list("abcd"),
    )


@pytest.mark.parametrize("settings", [
    dict(policy_loss="reinforce"),
    dict(ratio_level="sequence", loss_agg="seq-mean-token-mean"),
    dict(dual_clip_c=3.0, tis_cap=2.0),
    dict(kl_coef=0.1, kl_estimator="k2", loss_agg="seq-mean-token-sum-norm"),
])
def test_every_loss_option_is_micro_batch_invariant(tiny_model, settings):
    """The accumulated gradient is the same for micro-batches of 4, 2 and 1 rows."""
    from grpo_lab.training.step import policy_gradient_backward
    from grpo_lab.checkpointing import frozen_copy

    batch = _one_batch()
    ref = frozen_copy(tiny_model)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.01 * torch.randn_like(p))
    adv = torch.tensor([1.0, -1.0, -0.5, 0.5])
    grads = []
    for micro in (4, 2, 1):
        tiny_model.zero_grad(set_to_none=True)
        metrics = policy_gradient_backward(tiny_model, batch, torch.arange(4), adv, None, AlgoConfig(**settings).objective(),
                                           micro_batch_size=micro, max_tokens=8, ref_model=ref)
        grads.append(torch.cat([p.grad.flatten() for p in tiny_model.parameters()]))
    assert grads[0].abs().sum() > 0
    assert torch.allclose(grads[0], grads[1], atol=1e-7, rtol=1e-4) and torch.allclose(grads[0], grads[2], atol=1e-7, rtol=1e-4)
    if "kl_coef" in settings:
        assert metrics["kl_ref"][0] > 0
    if "tis_cap" in settings:
        assert 0 < metrics["tis_weight_mean"][0] <= 2.0


def test_reference_model_only_with_kl(tmp_path):
    config = small_config()
    config.trainer.total_steps = 1
    trainer = Trainer(config, output_dir=tmp_path / "a")
    trainer.train()
    assert trainer.ref_model is None
    config.algo = AlgoConfig(group_size=4, kl_coef=0.05)
    trainer = Trainer(config, output_dir=tmp_path / "b")
    trainer.train()
    assert trainer.ref_model is not None and not any(p.requires_grad for p in trainer.ref_model.parameters())


def test_shared_prefix_step_gives_the_plain_gradient(tiny_model):
    """policy_gradient_backward with the packed forward equals the ordinary forward."""
    from grpo_lab.data import RolloutBatch
    from grpo_lab.training.shared_prefix import enable_shared_prefix
    from grpo_lab.training.step import policy_gradient_backward

    enable_shared_prefix(tiny_model)
    g = torch.Generator().manual_seed(2)
    shared = [torch.randint(2, 300, (n,), generator=g) for n in (12, 30)]
    prompts, responses, groups = [], [], []
    for group, prefix in enumerate(shared):
        for member in range(4):
            tail = torch.randint(2, 300, (member % 2,), generator=g)  # some prompts extend the prefix
            prompts.append(torch.cat([prefix, tail]))
            responses.append(torch.randint(2, 300, (2 + member,), generator=g))
            groups.append(group)
    batch = RolloutBatch(
        group_id=groups, traj_id=list(range(8)), step=[0] * 8, prompt_ids=prompts, response_ids=responses,
        rollout_logprobs=[torch.full((len(r),), -3.0) for r in responses], loss_mask=[torch.ones(len(r)) for r in responses],
        reward=[float(i % 3 == 0) for i in range(8)], done=[True] * 8, valid_action=[True] * 8, anchor=list("abcdefgh"),
    )
    adv = torch.randn(8, generator=g)
    grads = []
    for shared_prefix, micro in ((False, 8), (True, 8), (True, 3)):
        tiny_model.zero_grad(set_to_none=True)
        policy_gradient_backward(tiny_model, batch, torch.randperm(8, generator=g), adv, None, AlgoConfig().objective(),
                                 micro_batch_size=micro, max_tokens=8, packing=shared_prefix)
        grads.append(torch.cat([p.grad.flatten() for p in tiny_model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6, rtol=1e-4)
    assert torch.allclose(grads[0], grads[2], atol=1e-6, rtol=1e-4)


def test_scheduled_rollout_collects_the_lock_step_batch(tmp_path):
    """Property: with per-request seeds, the trainer's ``continuous`` and ``micro``
    schedulers collect the same batch as ``full`` lock-step turns, and log their costs."""
    from grpo_lab.config import RolloutConfig

    batches = {}
    for mode in ("full", "micro", "continuous"):
        config = small_config()
        config.rollout = RolloutConfig(scheduler=mode, request_seeds=True, max_inflight=4, micro_group_size=2, env_workers=2)
        trainer = Trainer(config, output_dir=tmp_path / mode)
        batches[mode] = trainer.collect(step=0)
        if mode != "full":
            assert trainer.rollout.stats["rollout_engine_steps"] >= 1
    for mode in ("micro", "continuous"):
        assert torch.equal(batches[mode].traj_id, batches["full"].traj_id)
        assert all(torch.equal(x, y) for x, y in zip(batches[mode].response_ids, batches["full"].response_ids))


@pytest.mark.slow
@pytest.mark.parametrize("estimator,node", [("tree_grpo", "step"), ("treerpo", "segment")])
def test_tree_sampling_trains_with_the_tree_estimators(tmp_path, estimator, node):
    """rollout.sampler=tree end to end: tree batches reach the estimator and the update,
    and the step logs the budget it spent."""
    from grpo_lab.config import RolloutConfig
    from grpo_lab.rollout.tree import TreeSamplerConfig

    config = small_config()
    config.trainer.total_steps = 2
    config.algo = AlgoConfig(group_size=4, estimator=estimator, kl_coef=0.01)
    config.rollout = RolloutConfig(sampler="tree", tree=TreeSamplerConfig(trees_per_prompt=2, rounds=1, nodes_per_round=2,
                                                                         node=node, segment_tokens=6))
    Trainer(config, output_dir=tmp_path).train()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2
    for r in records:
        assert {"responses_per_prompt", "rollout_env_steps", "rollout_replayed_env_steps", "tree_nodes"} <= set(r)
        assert r["tree_nodes"] == r["num_rows"]
    assert any(r["num_updates"] for r in records)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["stop_gradient", "off_policy"])
def test_adaptive_sampling_trains_and_reports_its_cost(tmp_path, mode):
    from grpo_lab.config import RolloutConfig
    from grpo_lab.rollout.adaptive import AdaptiveConfig

    config = small_config()
    config.trainer.total_steps = 3
    config.rollout = RolloutConfig(sampler="adaptive", adaptive=AdaptiveConfig(stages=2, responses_per_stage=2,
                                                                                     reuse_mode=mode))
    Trainer(config, output_dir=tmp_path).train()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 3
    for r in records:
        assert 2 <= r["responses_per_prompt"] <= 4
        assert {"ar3po_reused", "ar3po_unsolved", "ar3po_buffer_size", "ar3po_stages_run"} <= set(r)
