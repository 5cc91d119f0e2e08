"""Data-parallel training equals the single-process run: two CPU processes under
``torchrun`` (gloo), each with half the groups, against one process with all of them
(scenarios in ``tests/dp_worker.py``)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from grpo_lab.losses import LOSS_AGG_MODES

WORKER = Path(__file__).with_name("dp_worker.py")
STRATEGIES = ("ddp", "fsdp")


def run_worker(args: list[str], processes: int, timeout: int = 600) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    if processes == 1:
        cmd = [sys.executable, str(WORKER), *args]
        env = {k: v for k, v in env.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
               "--standalone", "--tee", "3", str(WORKER), *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:  # every rank's output, each line prefixed with its rank
        pytest.fail(f"{' '.join(cmd)} failed (exit {done.returncode}):\n{done.stdout[-4000:]}\n{done.stderr[-20000:]}")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A tiny model and a batch of 4 groups from the real chain sampler, with learning
    signal in some groups and none in others."""
    from dp_worker import config

    from grpo_lab.advantages import compute_advantages
    from grpo_lab.config import WarmupConfig
    from grpo_lab.trainer import Trainer

    directory = tmp_path_factory.mktemp("dp")
    cfg = config("auto", output_dir=str(directory / "prepare"))
    cfg.trainer.warmup = WarmupConfig(steps=30, batch_size=16, episodes=60)
    trainer = Trainer(cfg)
    trainer.warmup()  # valid actions, so that rewards differ within groups
    trainer.model.save_pretrained(directory / "model")
    trainer.tokenizer.save_pretrained(directory / "model")
    for step in range(20):
        batch = trainer.collect(step)
        adv = compute_advantages(batch, cfg.algo.estimator, cfg.algo.invalid_action_penalty, cfg.algo.params,
                                 cfg.algo.modifier_settings(), cfg.algo.penalty_placement).advantages
        groups = torch.unique(batch.group_id)
        signal = [bool((adv[batch.group_id == g] != 0).any()) for g in groups]
        if len(groups) == 4 and 0 < sum(signal[:2]) and 0 < sum(signal[2:]):
            break
    else:
        pytest.fail("no rollout batch with learning signal on both halves")
    torch.save(batch, directory / "batch.pt")
    trainer.envs.close()
    return directory


@pytest.mark.slow
@pytest.mark.parametrize("strategy", STRATEGIES + ("ddp+lora",))
def test_one_step_on_two_ranks_equals_one_rank_for_every_loss_aggregation(prepared, strategy):
    """The loss normalisers are summed over ranks, so 2 ranks with half the groups each
    take the same optimizer step as 1 rank with all of them, for every ``algo.loss_agg``
    (micro-batches of 3 rows: the ranks run different numbers of micro-batches)."""
    directory = prepared / strategy
    directory.mkdir()
    shutil.copytree(prepared / "model", directory / "model")
    shutil.copy(prepared / "batch.pt", directory / "batch.pt")
    run_worker(["update", str(directory), strategy], 1)
    run_worker(["update", str(directory), strategy], 2)
    one, two = torch.load(directory / "update_1.pt"), torch.load(directory / "update_2.pt")
    assert set(one) == set(two) == set(LOSS_AGG_MODES)
    for mode in LOSS_AGG_MODES:
        # the gradient: any normaliser counted per rank would scale one rank's share
        g1, g2 = one[mode]["grads"], two[mode]["grads"]
        assert g1.keys() == g2.keys() and len(g1) > 0
        scale = max(float(g.abs().max()) for g in g1.values())
        for name in g1:
            torch.testing.assert_close(g2[name], g1[name], rtol=1e-4, atol=1e-6 * scale, msg=f"{mode}: grad of {name}")
        assert two[mode]["metrics"]["grad_norm"] == pytest.approx(one[mode]["metrics"]["grad_norm"], rel=1e-5)
        # the logged loss is the whole mini-batch's: the ranks' shares add up
        assert two[mode]["metrics"]["loss"] == pytest.approx(one[mode]["metrics"]["loss"], rel=1e-4, abs=1e-7)
        assert one[mode]["metrics"]["num_updates"] == two[mode]["metrics"]["num_updates"] == 1
        # the parameters, to a small fraction of one step (lr = 1e-3): Adam's first step
        # divides each gradient by its own magnitude, which magnifies rounding in tiny ones
        w1, w2 = one[mode]["weights"], two[mode]["weights"]
        assert w1.keys() == w2.keys()
        for name in w1:
            torch.testing.assert_close(w2[name], w1[name], rtol=0, atol=2e-5, msg=f"{mode}: {name}")
    # the normalisers differ between modes, and so do the gradients
    g_token, g_seq = one["token-mean"]["grads"], one["seq-mean-token-sum"]["grads"]
    assert any(not torch.allclose(g_token[name], g_seq[name]) for name in g_token)
    if strategy.endswith("+lora"):  # the adapter alone trains
        assert all(".lora_" in name for name in g_token)


TIMES = ("rollout_time", "update_time", "rollout_env_seconds")


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_two_rank_run_logs_once_never_splits_a_group_and_resumes_exactly(prepared, tmp_path, strategy):
    """4 steps on 2 ranks: rank 0 alone writes one reduced record per step; each step's
    4 groups are played whole, 2 on each rank, with ids that never collide; a run
    stopped after its step-1 checkpoint and resumed on 2 ranks ends with the same
    weights and the same metrics as the run that went straight through."""
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    for d in (straight, stopped):
        shutil.copytree(prepared / "model", d / "model")
    run_worker(["train", str(straight), strategy, "4"], 2)
    run_worker(["train", str(stopped), strategy, "2"], 2)
    run_worker(["train", str(stopped), strategy, "4", "resume"], 2)

    records = read_metrics(straight / "run")
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    assert all(r["world_size"] == 2 for r in records)
    played = [json.loads((straight / f"played_2_straight_rank{rank}.json").read_text()) for rank in (0, 1)]
    for step in range(4):
        groups = [set(p[step]["groups"]) for p in played]
        assert groups[0].isdisjoint(groups[1])
        assert groups[0] | groups[1] == set(range(4 * step, 4 * step + 4))
        assert all(len(g) == 2 for g in groups), groups
        for p in played:  # every group whole: group_size episodes of at least one row each
            assert all(rows >= 4 for rows in p[step]["rows_per_group"].values())
        assert records[step]["num_rows"] == sum(sum(p[step]["rows_per_group"].values()) for p in played)

    a, b = torch.load(straight / "weights_2_straight.pt"), torch.load(stopped / "weights_2_resumed.pt")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    resumed = read_metrics(stopped / "run")
    assert [r["step"] for r in resumed] == [0, 1, 2, 3]
    for x, y in zip(records, resumed):
        assert {k: v for k, v in x.items() if k not in TIMES} == {k: v for k, v in y.items() if k not in TIMES}
    checkpoints = sorted(p.name for p in (stopped / "run" / "checkpoints").iterdir())
    assert checkpoints == ["step_000001", "step_000003"] + (["reference"] if False else [])
    if strategy == "fsdp":
        assert (stopped / "run" / "checkpoints" / "step_000003" / "sharded" / ".metadata").is_file()


_ROOT = Path(__file__).resolve().parents[1]
#: the cluster page, and the README's section that points to it
CLUSTER = ((_ROOT / "docs" / "cluster.md").read_text() + "\n"
           + (_ROOT / "README.md").read_text().split("## Clusters", 1)[1].split("\n## ", 1)[0])
SBATCH = Path(__file__).resolve().parents[1] / "scripts" / "slurm" / "train.sbatch"


def cluster_commands() -> list[str]:
    """Every command line of the cluster page's ``bash`` blocks."""
    import re

    return [line.strip() for block in re.findall(r"```bash\n(.*?)```", CLUSTER, re.DOTALL)
            for line in block.splitlines() if line.strip()]


def train_overrides(command: str) -> list[str]:
    import shlex

    words = shlex.split(command, comments=True)
    if words[0] == "sbatch":
        script = next(w for w in words if w.endswith(".sbatch"))
        overrides = words[words.index(script) + 1:]
        if script.endswith("async.sbatch"):  # what the script adds for the trainer
            overrides += ["trainer.async=true", "rollout.engine_urls=[http://node:8000/v1]", "rollout.engine_api_key=k"]
        return overrides
    entry = "grpo_lab.serve" if "grpo_lab.serve" in words else "grpo_lab.train"  # both take the run's overrides
    return words[words.index(entry) + 1:]


def test_the_cluster_page_has_every_launcher():
    starts = {c.split()[0] + (" " + c.split()[1] if c.startswith("accelerate") else "") for c in cluster_commands()}
    assert {"torchrun", "accelerate launch", "sbatch", "python"} <= starts


@pytest.mark.parametrize("command", cluster_commands(), ids=lambda c: " ".join(c.split()[:4]))
def test_cluster_page_command_lines_load_and_validate(command):
    from test_readme import load

    load(*train_overrides(command))


def test_the_async_sbatch_script_parses_and_starts_engines_then_the_trainer():
    script = SBATCH.with_name("async.sbatch")
    done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    text = script.read_text()
    assert "-m grpo_lab.serve" in text and "trainer.async=true" in text and "GRPO_LAB_WEIGHT_HOST" in text
    assert text.index("-m grpo_lab.serve") < text.index("curl") < text.index("-m grpo_lab.train")


def test_the_sbatch_script_parses_and_starts_one_torchrun_per_node():
    done = subprocess.run(["bash", "-n", str(SBATCH)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    text = SBATCH.read_text()
    assert "--ntasks-per-node=1" in text and "--rdzv_backend c10d" in text and '-m grpo_lab.train "$@"' in text


@pytest.mark.slow
def test_the_cluster_pages_cpu_command_trains_on_two_processes(tmp_path):
    """The page's CPU example, verbatim, through the real entry point: rank 0 writes one
    record per step and the final model."""
    import shlex

    (command,) = [c for c in cluster_commands() if "trainer.device=cpu" in c]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    words = shlex.split(command, comments=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", *words[1:]]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-8000:]
    run = tmp_path / "runs" / "cpu-ddp"
    records = read_metrics(run)
    assert [r["step"] for r in records] == [0, 1, 2] and all(r["world_size"] == 2 for r in records)
    assert (run / "final_model" / "config.json").is_file()
    summary = json.loads((run / "summary.json").read_text())
    assert "eval_final" in summary and "stopped" not in summary
    assert done.stdout.count("success rate:") == 1  # rank 0 alone reports


@pytest.mark.slow
def test_each_rank_drives_its_own_vllm_engine_and_receives_the_new_weights(tmp_path):
    """``rollout=vllm`` on 2 CPU processes: each rank's engine samples its groups, and
    after every update it serves the new weights (the trainer's log-probs of the next
    step's samples match the engine's)."""
    pytest.importorskip("vllm")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", VLLM_ENABLE_V1_MULTIPROCESSING="0",
               VLLM_CPU_NUM_OF_RESERVED_CPU="0", VLLM_CPU_KVCACHE_SPACE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "grpo_lab.train",
           "rollout=vllm", "trainer.device=cpu", "trainer.total_steps=3", "trainer.tasks_per_step=4",
           "trainer.eval_episodes=4", "trainer.warmup.steps=40", "trainer.lr=3e-3", "rollout.env_workers=0",
           "logger.wandb=false", "logger.progress_bar=false", "logger.plot=false", "trainer.save_final=false",
           f"trainer.output_dir={tmp_path / 'run'}"]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-8000:]
    assert "Invalid process group" not in done.stderr
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == [0, 1, 2]
    updated = [i for i, r in enumerate(records) if r["num_updates"]]
    assert updated and updated[0] < 2, records
    for r in records[updated[0] + 1:]:
        if "logprob_diff_rollout" in r:
            assert r["logprob_diff_rollout"] < 1e-2, r


@pytest.mark.slow
def test_sigterm_stops_both_ranks_after_the_step_and_the_run_resumes(tmp_path):
    """SIGTERM to ``torchrun`` (as SLURM sends it) reaches both ranks; they finish the
    step in progress together, save it, and exit 143; the same command with
    ``trainer.resume=true`` completes the run."""
    import signal
    import time

    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    args = ["trainer.device=cpu", "trainer.total_steps=30", "trainer.tasks_per_step=4", "trainer.eval_episodes=2",
            "trainer.warmup.steps=5", "rollout.env_workers=0", "logger.wandb=false", "logger.progress_bar=false",
            "logger.plot=false", "trainer.save_final=false", f"trainer.output_dir={run}"]
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
              "--shutdown-timeout", "300", "-m", "grpo_lab.train"]
    proc = subprocess.Popen(launch + args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and metrics.read_text().count("\n") >= 1:
            break
        time.sleep(0.5)
    assert proc.poll() is None, proc.communicate()[1][-5000:]
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=600)
    summary = json.loads((run / "summary.json").read_text())
    assert "stopped by SIGTERM" in summary["stopped"]["reason"], err[-5000:]
    last = summary["stopped"]["last_step"]
    assert 0 <= last < 29
    assert (run / "checkpoints" / f"step_{last:06d}" / "trainer_state.pt").is_file()
    assert [r["step"] for r in read_metrics(run)] == list(range(last + 1))
    assert proc.returncode != 0 and err.count("run stopped: stopped by SIGTERM") == 2  # each rank says so

    resume = args[:1] + ["trainer.total_steps=" + str(last + 3)] + args[2:] + ["trainer.resume=true"]
    done = subprocess.run(launch + resume, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-8000:]
    assert [r["step"] for r in read_metrics(run)] == list(range(last + 3))
