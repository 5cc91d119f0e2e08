"""Checkpoints: written whole or not at all, pruned only after a newer one is complete,
and a resumed run continues exactly the run that was interrupted."""

from __future__ import annotations

import json

import pytest
import torch

from grpo_lab.config import AlgoConfig, Config, EnvConfig, LoggerConfig, ModelConfig, TrainerConfig, WarmupConfig
from grpo_lab.training.checkpoint import latest_checkpoint, list_checkpoints, load_model_weights, save_checkpoint
from grpo_lab.training.resume import RunDirectoryError
from grpo_lab.trainer import Trainer


def test_a_half_written_checkpoint_is_never_the_latest(tiny_model, tmp_path):
    save_checkpoint(tmp_path, 3, tiny_model, {"x": 1}, keep=2)
    (tmp_path / "checkpoints" / ".tmp_step_000005_1").mkdir()  # a crash mid-write
    (tmp_path / "checkpoints" / "step_000007").mkdir()  # no trainer state: incomplete
    step, path = latest_checkpoint(tmp_path)
    assert step == 3 and path.name == "step_000003"


def test_pruning_keeps_the_newest_and_weights_round_trip(tiny_model, tokenizer, tmp_path):
    from grpo_lab.modeling import build_tiny_model

    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, tiny_model, {}, keep=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 3]
    other = build_tiny_model(tokenizer, hidden_size=64, num_layers=2, num_heads=1, num_kv_heads=1, intermediate_size=128, seed=1)
    load_model_weights(other, latest_checkpoint(tmp_path)[1])
    for (name, a), b in zip(tiny_model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), name


def test_loading_refuses_a_checkpoint_of_another_shape(tiny_model, tokenizer, tmp_path):
    from grpo_lab.modeling import build_tiny_model

    save_checkpoint(tmp_path, 0, tiny_model, {}, keep=1)
    bigger = build_tiny_model(tokenizer, hidden_size=64, num_layers=3, num_heads=1, num_kv_heads=1, intermediate_size=128)
    with pytest.raises(KeyError, match="missing"):
        load_model_weights(bigger, latest_checkpoint(tmp_path)[1])


def config(total_steps, **trainer):
    return Config(
        algo=AlgoConfig(group_size=4, kl_coef=0.01),  # the KL reference must survive the resume too
        env=EnvConfig(max_steps=4),
        model=ModelConfig(tiny_hidden_size=64, tiny_num_heads=1, tiny_num_kv_heads=1, tiny_intermediate_size=128),
        trainer=TrainerConfig(**{"total_steps": total_steps, "tasks_per_step": 4, "eval_episodes": 4, "lr": 1e-3,
                                 "checkpoint_every": 2, "warmup": WarmupConfig(steps=20, batch_size=16, episodes=40),
                                 **trainer}),
        logger=LoggerConfig(wandb="false", progress_bar=False, plot=False),
    )


@pytest.mark.slow
def test_a_resumed_run_is_the_uninterrupted_run(tmp_path):
    """Property: 4 steps in one go, and 2 steps then a resume to 4, end with the same
    weights and the same per-step metrics."""
    whole = Trainer(config(4), output_dir=tmp_path / "whole")
    whole.train()
    first = Trainer(config(2), output_dir=tmp_path / "split")
    first.train()
    with pytest.raises(RunDirectoryError, match="trainer.resume=true"):
        Trainer(config(4), output_dir=tmp_path / "split").train()
    resumed = Trainer(config(4, resume=True), output_dir=tmp_path / "split")
    resumed.train()
    for (name, a), b in zip(whole.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name
    read = lambda d: [json.loads(line) for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    a, b = read("whole"), read("split")
    assert [r["step"] for r in b] == [0, 1, 2, 3]
    for ra, rb in zip(a, b):
        assert ra["reward_mean"] == rb["reward_mean"] and ra["num_rows"] == rb["num_rows"]
    assert [s for s, _ in list_checkpoints(tmp_path / "split")] == [1, 3]
    # the summary of the resumed run keeps the first part's fields and adds the parts' times
    summaries = {d: json.loads((tmp_path / d / "summary.json").read_text()) for d in ("whole", "split")}
    split = summaries["split"]
    for key in ("warmup_loss_first", "warmup_loss_last", "eval_after_warmup"):
        assert split[key] == summaries["whole"][key], key
    assert [(p["first_step"], p["last_step"]) for p in split["parts"]] == [(0, 1), (2, 3)]
    assert split["train_seconds"] == pytest.approx(sum(p["seconds"] for p in split["parts"]), abs=1e-3)
    assert split["parts"][0]["seconds"] > 0 and split["parts"][1]["seconds"] > 0
    assert split["steps_without_signal"] == sum(r.get("signal_rows") == 0 for r in b)


def test_resume_without_a_checkpoint_names_the_fix(tmp_path):
    trainer = Trainer(config(2, resume=True), output_dir=tmp_path)
    with pytest.raises(RunDirectoryError, match="trainer.output_dir"):
        trainer.train()


# ---------------------------------------------------------------------- damaged checkpoints
def truncate(path, keep: int = 100) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:keep])


@pytest.mark.parametrize("damage", ["model/model.safetensors", "trainer_state.pt", "model/config.json", "missing"])
def test_a_damaged_newest_checkpoint_is_named_and_the_previous_one_resumes(tiny_model, tmp_path, caplog, damage):
    from grpo_lab.training.resume import choose_start

    for step in (1, 2):
        save_checkpoint(tmp_path, step, tiny_model, {"step_state": step}, keep=2)
    newest = tmp_path / "checkpoints" / "step_000002"
    if damage == "missing":
        (newest / "model" / "model.safetensors").unlink()
        damage = "model/model.safetensors"
    elif damage == "model/config.json":  # same size, other bytes: the hash catches it
        text = (newest / damage).read_text()
        (newest / damage).write_text(text.replace('"', "'", 1))
    else:
        truncate(newest / damage)
    with caplog.at_level("WARNING", logger="grpo_lab"):
        point = choose_start(tmp_path, "true")
    assert point[0] == 1 and point[1].name == "step_000001"
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert f"step_000002 cannot be loaded ({damage}:" in warning and "resuming from step_000001" in warning
    assert not newest.exists() and (tmp_path / "checkpoints" / "broken_step_000002").is_dir()  # set aside, kept
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1]


def test_when_no_checkpoint_loads_the_resume_says_so_naming_each_file(tiny_model, tmp_path):
    from grpo_lab.training.resume import RunDirectoryError, choose_start

    for step in (1, 2):
        save_checkpoint(tmp_path, step, tiny_model, {}, keep=2)
    truncate(tmp_path / "checkpoints" / "step_000002" / "model" / "model.safetensors")
    truncate(tmp_path / "checkpoints" / "step_000001" / "trainer_state.pt")
    for mode in ("true", "auto"):  # auto does not start afresh over a run it cannot read
        with pytest.raises(RunDirectoryError, match=r"no checkpoint in .* can be loaded:\n.*step_000002/model/model"
                                                    r"\.safetensors: \d+ bytes where \d+ were written.*\n.*step_000001/"
                                                    r"trainer_state\.pt"):
            choose_start(tmp_path, mode)


def test_a_checkpoint_written_before_manifests_still_loads_and_is_checked_for_readability(tiny_model, tmp_path):
    from grpo_lab.training.checkpoint import CheckpointError, verify_checkpoint

    save_checkpoint(tmp_path, 1, tiny_model, {}, keep=1)
    path = tmp_path / "checkpoints" / "step_000001"
    (path / "manifest.json").unlink()
    verify_checkpoint(path)
    truncate(path / "trainer_state.pt")
    with pytest.raises(CheckpointError, match="trainer_state.pt: unreadable"):
        verify_checkpoint(path)


def test_the_checkpoint_holds_the_tokenizer_and_a_failed_write_leaves_nothing(tiny_model, tokenizer, tmp_path,
                                                                              monkeypatch):
    from transformers import AutoTokenizer

    from grpo_lab.training import checkpoint as ckpt

    save_checkpoint(tmp_path, 1, tiny_model, {}, keep=2, tokenizer=tokenizer)
    loaded = AutoTokenizer.from_pretrained(tmp_path / "checkpoints" / "step_000001" / "model")
    assert loaded("12 down")["input_ids"] == tokenizer("12 down")["input_ids"]

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device", "trainer_state.pt")

    monkeypatch.setattr(ckpt.torch, "save", full)
    with pytest.raises(ckpt.CheckpointWriteError, match=r"the checkpoint of step 2 could not be written \(\[Errno 28\] "
                                                        r"No space left on device"):
        save_checkpoint(tmp_path, 2, tiny_model, {}, keep=2, tokenizer=tokenizer)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000001"]


# ---------------------------------------------------------------------- a full disk, for real
@pytest.fixture()
def small_disk(tmp_path):
    """A directory on a tmpfs of 16 MiB (a disk that really fills up); skipped where this
    machine does not let the tests mount one."""
    import subprocess

    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()})")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(directory, leave: int) -> None:
    """Fill the file system of ``directory`` up to ``leave`` bytes free."""
    import os

    free = os.statvfs(directory).f_bavail * os.statvfs(directory).f_frsize
    with open(directory / "filler.bin", "wb") as f:
        f.write(b"\0" * max(0, free - leave))


@pytest.mark.slow
def test_a_full_disk_stops_the_run_at_its_last_checkpoint_and_the_resume_continues(small_disk, tmp_path):
    """The disk fills after the first checkpoint: the second cannot be written. The run
    stops saying so (no raw OSError), names the intact checkpoint and how to resume,
    leaves no half-written directory; freed, the resume continues from it."""
    from grpo_lab.training.stop import CheckpointFailed

    out = small_disk / "run"
    trainer = Trainer(config(3, checkpoint_every=1), output_dir=out)
    save = trainer._save

    def save_then_fill(step):
        save(step)
        fill(small_disk, leave=64 * 1024)  # room for metrics, not for a checkpoint

    trainer._save = save_then_fill
    with pytest.raises(CheckpointFailed) as stopped:
        trainer.train()
    message = str(stopped.value)
    assert "the checkpoint of step 1 could not be written ([Errno 28] No space left on device" in message
    assert "the checkpoint of step 0 is intact; to continue from step 1" in message and "trainer.resume=true" in message
    assert stopped.value.last_step == 0 and stopped.value.checkpoint.endswith("step_000000")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["reference", "step_000000"]
    (small_disk / "filler.bin").unlink()
    Trainer(config(3, checkpoint_every=1, resume=True), output_dir=out).train()
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2]


def test_saving_a_step_again_replaces_it_whole(tiny_model, tmp_path):
    save_checkpoint(tmp_path, 4, tiny_model, {"version": 1}, keep=2)
    save_checkpoint(tmp_path, 4, tiny_model, {"version": 2}, keep=2)
    from grpo_lab.training.checkpoint import load_trainer_state, verify_checkpoint

    path = tmp_path / "checkpoints" / "step_000004"
    verify_checkpoint(path)
    assert load_trainer_state(path)["version"] == 2
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000004"]
