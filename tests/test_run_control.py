"""A long run survives its environments and its operator: faults counted in the metrics,
the fault-rate limit, SIGTERM / SIGINT / SIGKILL and exact resume, resume checks."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fault_envs import FaultyLake, SigtermLake, VerboseLake
from grpo_lab.config import (AlgoConfig, Config, ConfigError, EnvConfig, LoggerConfig, ModelConfig, RolloutConfig,
                             TrainerConfig, WarmupConfig)
from grpo_lab.envs import env_names, register_env
from grpo_lab.training.checkpoint import list_checkpoints
from grpo_lab.training.resume import read_metrics
from grpo_lab.training.stop import Abandon, EnvFaultRateExceeded, RunStopped, StopSignals, TrainingInterrupted
from grpo_lab.training.resume import RunDirectoryError
from grpo_lab.trainer import Trainer
from grpo_lab.training.update import PolicyUpdate

for _name, _factory in (("faulty_lake", FaultyLake), ("sigterm_lake", SigtermLake), ("verbose_lake", VerboseLake)):
    if _name not in env_names():
        register_env(_name, _factory)

TESTS_DIR = Path(__file__).parent


def config(total_steps=3, env="frozenlake", env_kwargs=None, rollout=None, **trainer):
    return Config(
        algo=AlgoConfig(group_size=4),
        env=EnvConfig(name=env, max_steps=4, **({"kwargs": env_kwargs} if env_kwargs is not None else {})),
        model=ModelConfig(tiny_hidden_size=64, tiny_num_heads=1, tiny_num_kv_heads=1, tiny_intermediate_size=128),
        rollout=rollout or RolloutConfig(),
        trainer=TrainerConfig(**{"total_steps": total_steps, "tasks_per_step": 4, "eval_episodes": 4, "lr": 1e-3,
                                 "warmup": WarmupConfig(steps=10, batch_size=16, episodes=30), **trainer}),
        logger=LoggerConfig(wandb="false", progress_bar=False, plot=False),
    )


def metrics(path):
    return [json.loads(line) for line in (Path(path) / "metrics.jsonl").read_text().splitlines()]


def same_steps(a, b):
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for key in ("reward_mean", "num_rows", "response_tokens", "loss", "grad_norm"):
            assert ra.get(key) == rb.get(key), (ra["step"], key, ra.get(key), rb.get(key))


# ---------------------------------------------------------------------- environments
@pytest.mark.slow
def test_a_run_survives_raising_hanging_and_nan_environments(tmp_path, caplog):
    """An environment that raises on some steps, hangs on others and returns NaN on
    others, in worker processes: the run completes, every kind is counted in
    metrics.jsonl, and the log names the environment, seed, step and first line."""
    kwargs = {"error_rate": 0.04, "nan_rate": 0.04, "hang_rate": 0.01, "hang_seconds": 3600.0}
    cfg = config(3, env="faulty_lake", env_kwargs=kwargs, rollout=RolloutConfig(env_workers=2, max_env_fault_rate=0.9))
    cfg.env.step_timeout_s = 0.5
    cfg.trainer.warmup = WarmupConfig(steps=40, batch_size=16, episodes=60)  # valid actions reach the environment
    t0 = time.perf_counter()
    with caplog.at_level("WARNING", logger="grpo_lab"):
        summary = Trainer(cfg, output_dir=tmp_path).train()
    records = metrics(tmp_path)
    assert [r["step"] for r in records] == [0, 1, 2] and "eval_final" in summary
    totals = {k: sum(r[k] for r in records) for k in ("env_errors", "env_timeouts", "env_nonfinite_rewards", "episodes_dropped")}
    assert totals["env_errors"] >= 1 and totals["env_timeouts"] >= 1 and totals["env_nonfinite_rewards"] >= 1, totals
    assert totals["episodes_dropped"] == totals["env_errors"] + totals["env_timeouts"] + totals["env_nonfinite_rewards"]
    for r in records:  # a step trains on what survived: rows from whole groups of at least two
        assert r["num_rows"] > 0
    lines = [rec.getMessage() for rec in caplog.records if "episode dropped" in rec.getMessage()]
    assert any("env 'faulty_lake' seed" in m and "RuntimeError: simulator crashed on" in m and "traceback" not in m
               for m in lines)
    assert any("timeout: no answer within 0.5 s" in m for m in lines)
    assert time.perf_counter() - t0 < 240


def test_the_fault_rate_limit_stops_a_run_whose_episodes_all_fail(tmp_path):
    cfg = config(2, env="faulty_lake", env_kwargs={"reset_error_rate": 1.0}, rollout=RolloutConfig(env_workers=0))
    cfg.trainer.warmup.steps = 0  # no demonstration could be played
    cfg.trainer.eval_episodes = 0  # (the evaluation has the same limit: next test)
    with pytest.raises(EnvFaultRateExceeded) as err:
        Trainer(cfg, output_dir=tmp_path).train()
    message = str(err.value)
    assert "step 0: 16 of 16 episodes failed (groups_dropped=4, env_errors=16)" in message and "rollout.max_env_fault_rate=0.2" in message
    assert "ValueError: no level for seed" in message and "trainer.resume=auto" in message  # no step completed: start afresh
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["stopped"]["last_step"] == -1 and summary["stopped"]["checkpoint"] is None


def test_evaluation_has_the_fault_rate_limit_and_says_how_many_episodes_it_rests_on(tmp_path, caplog):
    """Half of the evaluation's episodes fail: past rollout.max_env_fault_rate the run stops
    naming the evaluation (no success rate of the survivors passed off as the policy's);
    under a limit that allows it, the figure says how many episodes it rests on."""
    cfg = config(1, env="faulty_lake", env_kwargs={"reset_error_rate": 0.5}, rollout=RolloutConfig(env_workers=0))
    cfg.trainer.warmup.steps = 0
    cfg.trainer.eval_episodes = 16
    with pytest.raises(EnvFaultRateExceeded, match=r"evaluation \(16 tasks x 1 samples\): \d+ of 16 episodes failed"):
        Trainer(cfg, output_dir=tmp_path / "strict").train()
    cfg.rollout.max_env_fault_rate = 1.0
    with caplog.at_level("INFO", logger="grpo_lab"):
        summary = Trainer(cfg, output_dir=tmp_path / "lenient").train()
    evaluation = summary["eval_after_warmup"]
    assert 0 < evaluation["episodes_dropped"] < 16 and evaluation["episodes"] + evaluation["episodes_dropped"] == 16
    lines = [r.getMessage() for r in caplog.records if "after warm-up: success rate" in r.getMessage()]
    assert lines and f"over {evaluation['episodes']} of 16 eval episodes; {evaluation['episodes_dropped']} failed" in lines[0]


def test_steps_that_train_nothing_are_shown_counted_and_warned_about(tmp_path, caplog, capsys):
    """One-turn FrozenLake episodes never reach the goal: every group's rewards are equal,
    every advantage zero. Each such step says so (signal_rows 0) on the progress bar, the
    summary counts them, and the third in a row brings a warning naming the likely cause."""
    cfg = config(4)
    cfg.env.max_steps = 1
    cfg.algo.invalid_action_penalty = 0.0
    cfg.trainer.warmup.steps, cfg.trainer.eval_episodes = 0, 0
    cfg.logger.progress_bar = True
    with caplog.at_level("WARNING", logger="grpo_lab"):
        summary = Trainer(cfg, output_dir=tmp_path).train()
    assert [r["signal_rows"] for r in metrics(tmp_path)] == [0, 0, 0, 0]
    assert summary["steps_without_signal"] == 4
    warnings = [r.getMessage() for r in caplog.records if "trained nothing" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith("steps 0-2: every group's advantages were zero")
    assert "no episode succeeds" in warnings[0]
    assert "no signal=4 steps" in capsys.readouterr().err


def test_the_likely_cause_follows_the_success_rate():
    from grpo_lab.evaluation import no_signal_warning

    steps = lambda rate: [{"step": s, "success_rate": rate} for s in (5, 6, 7)]  # noqa: E731
    assert "too hard" in no_signal_warning(steps(0.0)) and "steps 5-7" in no_signal_warning(steps(0.0))
    assert "too easy" in no_signal_warning(steps(1.0))
    assert "does not tell the episodes of a task apart" in no_signal_warning(steps(0.5))


@pytest.mark.parametrize("policy", ["truncate_history", "drop_episode", "error"])
def test_observations_longer_than_the_context_under_each_policy(tmp_path, tokenizer, policy):
    """A model of 256 positions and observations of about 2,000 tokens in half of the
    tasks: nothing longer than the context reaches the model; the episodes that cannot
    fit are dropped and counted (even without history they do not fit), or, with
    ``error``, the run stops naming the episode."""
    from grpo_lab.modeling import build_tiny_model

    model = build_tiny_model(tokenizer, hidden_size=64, num_layers=2, num_heads=1, num_kv_heads=1, intermediate_size=128,
                             max_position_embeddings=256)
    cfg = config(2, env="verbose_lake", env_kwargs={"pad_words": 1000, "every": 2},
                 rollout=RolloutConfig(env_workers=0, overlong_prompt=policy, max_env_fault_rate=1.0))
    trainer = Trainer(cfg, output_dir=tmp_path, model=model, tokenizer=tokenizer)
    assert trainer.parts.max_context == 256
    seen = []
    generate = trainer.backend.generate

    def recording(prompts, params):
        seen.extend(len(p) + sp.max_tokens for p, sp in zip(prompts, params if isinstance(params, list) else [params] * len(prompts)))
        return generate(prompts, params)

    trainer.backend.generate = recording
    if policy == "error":
        with pytest.raises(RunStopped, match=r"env 'verbose_lake' seed \d+ step 0: the prompt has \d+ tokens and the model's context is 256"):
            trainer.train()
        return
    trainer.train()
    records = metrics(tmp_path)
    assert sum(r["overlong_dropped"] for r in records) >= 1 and all(r["episodes_dropped"] == r["overlong_dropped"] for r in records)
    assert seen and max(seen) <= 256


# ---------------------------------------------------------------------- signals
def test_a_signal_inside_an_abandonable_phase_abandons_it_and_outside_waits():
    with StopSignals() as stop:
        with pytest.raises(Abandon) as err:
            with stop.abandonable():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(5)
        assert err.value.signum == signal.SIGINT
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGTERM)  # outside: recorded, the work goes on
        assert stop.requested == signal.SIGTERM
        with pytest.raises(Abandon):
            with stop.abandonable():  # and the next abandonable phase does not start
                pass
    assert TrainingInterrupted("x", signal.SIGTERM).exit_code == 143
    assert TrainingInterrupted("x", signal.SIGINT).exit_code == 130


@pytest.mark.slow
def test_sigterm_in_the_middle_of_a_step_then_resume_equals_the_uninterrupted_run(tmp_path, monkeypatch):
    """SIGTERM during step 2's rollout (no checkpoints scheduled): the run saves step 1,
    exits with 143, and the resumed run's metrics and weights equal an uninterrupted
    run's, step for step."""
    def cfg(**kw):
        c = config(4, env="sigterm_lake", rollout=RolloutConfig(env_workers=0), **kw)
        c.trainer.warmup = WarmupConfig(steps=40, batch_size=16, episodes=60)  # valid actions reach the environment
        return c

    starts = SigtermLake.steps_at_each_rollout(monkeypatch)
    SigtermLake.ARMED, SigtermLake.steps_taken = 0, 0
    whole = Trainer(cfg(), output_dir=tmp_path / "whole")
    whole.train()
    assert starts[3] - starts[2] >= 2  # step 2's rollout steps the environment
    SigtermLake.ARMED, SigtermLake.steps_taken = (starts[2] + starts[3]) // 2, 0
    try:
        with pytest.raises(TrainingInterrupted) as err:
            Trainer(cfg(), output_dir=tmp_path / "split").train()
    finally:
        SigtermLake.ARMED = 0
    assert err.value.exit_code == 143 and err.value.last_step == 1
    assert "SIGTERM" in str(err.value) and "trainer.resume=true" in str(err.value)
    assert [s for s, _ in list_checkpoints(tmp_path / "split")] == [1]
    assert [r["step"] for r in metrics(tmp_path / "split")] == [0, 1]
    resumed = Trainer(cfg(resume="true"), output_dir=tmp_path / "split")
    resumed.train()
    same_steps(metrics(tmp_path / "whole"), metrics(tmp_path / "split"))
    for (name, a), b in zip(whole.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_signal_during_the_update_finishes_the_step_first(tmp_path, monkeypatch):
    original = PolicyUpdate.__call__

    def update_then_signal(self, batch, advantages, extras=None):
        out = original(self, batch, advantages, extras)
        if int(batch.group_id.min()) >= 4:  # step 1 (tasks_per_step=4)
            os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(PolicyUpdate, "__call__", update_then_signal)
    with pytest.raises(TrainingInterrupted) as err:
        Trainer(config(3, rollout=RolloutConfig(env_workers=0)), output_dir=tmp_path).train()
    assert err.value.exit_code == 130 and err.value.last_step == 1
    assert [r["step"] for r in metrics(tmp_path)] == [0, 1]
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1]


def test_a_second_signal_during_the_update_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    """Two signals inside step 1's update: the update is cut short, so the weights in
    memory are no step's; nothing is saved over the last checkpoint (step 0), and the
    run says it resumes from there."""
    original = PolicyUpdate.__call__

    fired = []

    def update_with_two_signals(self, batch, advantages, extras=None):
        if int(batch.group_id.min()) >= 4 and not fired:  # step 1, once
            fired.append(True)
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, batch, advantages, extras)

    monkeypatch.setattr(PolicyUpdate, "__call__", update_with_two_signals)
    with pytest.raises(TrainingInterrupted) as err:
        Trainer(config(3, rollout=RolloutConfig(env_workers=0), checkpoint_every=1), output_dir=tmp_path).train()
    assert err.value.last_step == 0 and "during the update of step 1" in str(err.value)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [0]
    resumed = Trainer(config(2, rollout=RolloutConfig(env_workers=0), checkpoint_every=1, resume="true"),
                      output_dir=tmp_path)
    resumed.train()
    assert [r["step"] for r in metrics(tmp_path)] == [0, 1]


def run_cli(out, *overrides, wait=True):
    cmd = [sys.executable, "-m", "grpo_lab.train", "algo.group_size=4", "env.max_steps=4", "trainer.tasks_per_step=4",
           "trainer.eval_episodes=4", "trainer.warmup.steps=10", "trainer.warmup.episodes=30", "model.tiny_hidden_size=64",
           "model.tiny_num_heads=1", "model.tiny_num_kv_heads=1", "model.tiny_intermediate_size=128", "logger.wandb=false",
           "logger.progress_bar=false", "logger.plot=false", f"trainer.output_dir={out}", f"hydra.run.dir={out}/hydra",
           *overrides]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    if wait:
        stdout, stderr = proc.communicate(timeout=600)
        return proc.returncode, stdout + stderr
    return proc


def wait_for_steps(out, n, proc, timeout=300):
    t0 = time.time()
    while time.time() - t0 < timeout:
        path = Path(out) / "metrics.jsonl"
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise TimeoutError


@pytest.mark.slow
def test_command_line_sigterm_exits_143_and_prints_the_resume_command(tmp_path):
    out = tmp_path / "run"
    proc = run_cli(out, "trainer.total_steps=30", wait=False)
    wait_for_steps(out, 2, proc)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 143, stderr[-2000:]
    assert "run stopped: stopped by SIGTERM" in stderr and "resume with:" in stderr
    command = stderr.split("resume with:")[1].strip().splitlines()[0]
    assert f"trainer.output_dir={out}" in command and "trainer.resume=true" in command
    last = json.loads((out / "summary.json").read_text())["stopped"]["last_step"]
    assert last >= 1 and [s for s, _ in list_checkpoints(out)] == [last]
    code, text = run_cli(out, "trainer.total_steps=" + str(last + 3), "trainer.resume=true")
    assert code == 0, text[-2000:]
    assert [r["step"] for r in metrics(out)] == list(range(last + 3))


@pytest.mark.slow
def test_sigkill_at_any_moment_then_resume_auto_completes_the_same_run(tmp_path):
    """SIGKILL (no handler can run) at a moment between steps or inside a checkpoint
    write; resume=auto continues from the newest complete checkpoint, removes the
    half-written one, drops a torn metrics line, and ends with the uninterrupted run's
    metrics."""
    whole = tmp_path / "whole"
    code, text = run_cli(whole, "trainer.total_steps=5", "trainer.checkpoint_every=1")
    assert code == 0, text[-2000:]
    out = tmp_path / "killed"
    proc = run_cli(out, "trainer.total_steps=5", "trainer.checkpoint_every=1", wait=False)
    wait_for_steps(out, 2, proc)
    proc.kill()
    proc.communicate()
    (out / "checkpoints" / ".tmp_step_000009_12345").mkdir(parents=True, exist_ok=True)  # as a kill mid-write leaves
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "reward_me')  # as a kill mid-line leaves
    code, text = run_cli(out, "trainer.total_steps=5", "trainer.checkpoint_every=1", "trainer.resume=auto")
    assert code == 0, text[-2000:]
    assert "dropping its last line" in text and not list((out / "checkpoints").glob(".tmp_*"))
    same_steps(metrics(whole), metrics(out))


# ---------------------------------------------------------------------- resume checks
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished")
    Trainer(config(2, rollout=RolloutConfig(env_workers=0), checkpoint_every=1), output_dir=out).train()
    return out


def copy_of(run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


def test_resume_refuses_a_changed_config_listing_every_key(finished_run, tmp_path):
    out = copy_of(finished_run, tmp_path)
    cfg = config(4, rollout=RolloutConfig(env_workers=0, temperature=0.7), checkpoint_every=1, resume="true", lr=5e-4)
    cfg.algo.group_size = 3
    with pytest.raises(ConfigError) as err:
        Trainer(cfg, output_dir=out).train()
    message = str(err.value)
    assert "in 3 key(s)" in message and "algo.group_size: 4 -> 3" in message and "trainer.lr: 0.001 -> 0.0005" in message
    assert "rollout.temperature: 1.0 -> 0.7" in message and "resume_allow_changes=true" in message
    assert "total_steps" not in message  # harmless


def test_an_allowed_lr_change_reaches_the_optimizer(finished_run, tmp_path):
    out = copy_of(finished_run, tmp_path)
    trainer = Trainer(config(3, rollout=RolloutConfig(env_workers=0), checkpoint_every=1, resume="true", lr=5e-4,
                             resume_allow_changes=True), output_dir=out)
    trainer.train()
    assert all(group["lr"] == 5e-4 for group in trainer.parts.optimizer.param_groups)
    assert [r["step"] for r in metrics(out)] == [0, 1, 2]


def test_resume_auto_continues_a_run_and_restarts_one_that_died_before_its_first_checkpoint(finished_run, tmp_path):
    out = copy_of(finished_run, tmp_path)
    Trainer(config(3, rollout=RolloutConfig(env_workers=0), checkpoint_every=1, resume="auto"), output_dir=out).train()
    assert [r["step"] for r in metrics(out)] == [0, 1, 2]
    dead = tmp_path / "dead"
    dead.mkdir()
    (dead / "metrics.jsonl").write_text('{"step": 0, "reward_mean": 0.5}\n')
    with pytest.raises(RunDirectoryError, match="stopped before its first checkpoint.*trainer.resume=auto"):
        Trainer(config(1, rollout=RolloutConfig(env_workers=0)), output_dir=dead).train()
    with pytest.raises(RunDirectoryError, match="trainer.resume=auto"):
        Trainer(config(1, rollout=RolloutConfig(env_workers=0), resume="true"), output_dir=dead).train()
    Trainer(config(1, rollout=RolloutConfig(env_workers=0), resume="auto"), output_dir=dead).train()
    assert [r["step"] for r in metrics(dead)] == [0]
    kept = list(dead.glob("metrics.before_*.jsonl"))
    assert len(kept) == 1 and "0.5" in kept[0].read_text()


def test_a_checkpoint_set_aside_mid_save_is_restored_and_partial_ones_removed(finished_run, tmp_path):
    """A crash between the two renames of a re-save leaves ``.old_step_N`` (complete) and
    no ``step_N``: resume puts it back; ``.tmp_step_*`` goes."""
    from grpo_lab.training.resume import remove_partial_writes

    out = copy_of(finished_run, tmp_path)
    root = out / "checkpoints"
    (root / "step_000001").rename(root / ".old_step_000001_777")
    (root / ".tmp_step_000001_777").mkdir()
    removed = remove_partial_writes(out)
    assert [p.name for p in removed] == [".tmp_step_000001_777"]
    assert [s for s, _ in list_checkpoints(out)] == [0, 1]


def test_a_setting_added_since_the_checkpoint_counts_as_unchanged_at_its_default():
    from grpo_lab.training.resume import config_changes

    saved = {"trainer": {"lr": 1.0}}
    new = {"trainer": {"lr": 1.0, "new_knob": 3}}
    assert config_changes(saved, new, defaults={"trainer": {"new_knob": 3}}) == []
    assert config_changes(saved, new, defaults={"trainer": {"new_knob": 2}}) == [("trainer.new_knob", "<absent>", 3)]


def test_resume_names_a_damaged_metrics_line_and_drops_a_torn_last_one(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0}\n{"step": 1}\n{"step": 2, "rew')
    assert [r["step"] for r in read_metrics(path)] == [0, 1]
    path.write_text('{"step": 0}\n{"step": 1, oops}\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 2: cannot be read"):
        read_metrics(path)


# ---------------------------------------------------------------------- command line
@pytest.mark.parametrize("overrides, expected", [
    (["+trainer.some_typo=1"], "unknown config key(s) ['trainer.some_typo']"),
    (["+rollout.tree.depth=3"], "unknown config key(s) ['rollout.tree.depth']"),
    (["model.name_or_path=/no/such/dir"], "the directory /no/such/dir does not exist"),
    (["model.name_or_path=./missing_model"], "missing_model does not exist"),
])
def test_config_mistakes_stop_before_anything_loads(overrides, expected):
    from hydra import compose, initialize_config_module

    from grpo_lab.train import build_config

    with initialize_config_module(config_module="grpo_lab.configs", version_base="1.3"):
        with pytest.raises(ConfigError) as err:
            build_config(compose(config_name="config", overrides=overrides))
    assert expected in str(err.value)


def test_a_model_directory_that_exists_and_a_hub_id_pass_the_check(tmp_path):
    from grpo_lab.config import check_model_source

    check_model_source(str(tmp_path))
    check_model_source("Qwen/Qwen2.5-0.5B-Instruct")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a directory"):
        check_model_source(str(tmp_path / "file"))
