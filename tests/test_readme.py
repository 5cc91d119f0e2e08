"""The README's library snippet runs as written, every command line of its Configuration
section loads and validates (and, in the slow suite, starts and trains a step), and CI
runs the README's test command."""

import gc
import os
import re
import shlex
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def readme_train_commands() -> list[list[str]]:
    """The overrides of every ``python -m grpo_lab.train`` line of the Configuration section."""
    section = README.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, re.DOTALL):
        for line in block.splitlines():
            line = line.split(" #", 1)[0].strip()
            if line.startswith("python -m grpo_lab.train"):
                commands.append(shlex.split(line)[3:])
    return commands


def load(*overrides):
    from grpo_lab.train import compose_config

    return compose_config(overrides)


def test_the_configuration_section_has_command_lines():
    assert len(readme_train_commands()) >= 15


@pytest.mark.parametrize("overrides", readme_train_commands(), ids=lambda o: " ".join(o) or "default")
def test_readme_command_line_loads_and_validates(overrides):
    load(*overrides)


#: a small budget, so that each example starts and trains one step; it replaces the
#: README's own values of these keys (which do not change what is being started)
BUDGET = {"trainer.total_steps": "1", "trainer.tasks_per_step": "2", "trainer.eval_episodes": "2",
          "trainer.warmup.steps": "2", "trainer.warmup.episodes": "8", "trainer.save_final": "false",
          "logger.wandb": "false", "logger.progress_bar": "false", "logger.plot": "false"}


@pytest.mark.slow
def test_every_readme_command_line_starts_and_trains_a_step(tmp_path):
    """In order (the resume example continues the checkpoint example's run directory)."""
    from grpo_lab.trainer import Trainer

    if not torch.cuda.is_available():  # vLLM's CPU engine, small and in this process
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    try:
        import vllm  # noqa: F401
        have_vllm = True
    except ImportError:
        have_vllm = False
    ran, skipped = [], []
    for n, overrides in enumerate(readme_train_commands()):
        settings = dict(o.split("=", 1) for o in overrides)
        if "model.name_or_path" in settings or settings.get("trainer.device", "auto").startswith("cuda"):
            if not torch.cuda.is_available() or not Path(settings.get("model.name_or_path", "")).exists():
                skipped.append(overrides)
                continue
        if settings.get("rollout") == "vllm" and not have_vllm:  # the test extras install it; note it, go on
            skipped.append(overrides)
            continue
        settings.update(BUDGET)
        run_dir = tmp_path / f"run{n}"
        if "trainer.output_dir" in settings:
            run_dir = tmp_path / settings["trainer.output_dir"].replace("/", "_")
            settings["trainer.output_dir"] = str(run_dir)
        if settings.get("trainer.checkpoint_every"):
            settings["trainer.checkpoint_every"] = "1"
        if settings.get("trainer.resume") == "true":
            settings["trainer.total_steps"] = "2"  # one step past the checkpoint of the example before
        config = load(*(f"{k}={v}" for k, v in settings.items()))
        try:
            trainer = Trainer(config, output_dir=run_dir)
            summary = trainer.train()
        except Exception as err:
            raise AssertionError(f"README example `{' '.join(overrides)}` failed: {type(err).__name__}: {err}") from err
        assert (run_dir / "metrics.jsonl").exists() and "eval_final" in summary, overrides
        ran.append(overrides)
        del trainer
        gc.collect()
    # only the GPU/real-model example may skip, and the vLLM one where vLLM is not installed
    assert len(ran) >= len(readme_train_commands()) - 1 - (not have_vllm), skipped


def test_library_snippet_runs():
    section = README.split("## Use as a library", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["adv"].shape == (4,)
    assert namespace["logprobs"].shape == (4, 8) and namespace["mask"].sum() == 22
    assert all(p.grad is not None for p in namespace["model"].parameters())


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "test-command" in ci
    command = README.split("<!-- test-command -->", 1)[1].split("```bash\n", 1)[1].split("\n", 1)[0]
    assert "pytest --runslow" in command and ".[dev" in command


def readme_task_commands() -> list[list[str]]:
    section = README.split("## Tasks", 1)[1].split("\n## ", 1)[0]
    block = re.findall(r"```bash\n(.*?)```", section, re.DOTALL)[0]
    return [shlex.split(line.split(" #", 1)[0])[3:] for line in block.splitlines() if line.startswith("python -m")]


def test_the_tasks_section_has_a_line_per_shipped_environment():
    names = [dict(o.split("=", 1) for o in overrides)["env"] for overrides in readme_task_commands()]
    shipped = sorted(p.stem for p in (ROOT / "grpo_lab" / "configs" / "env").glob("*.yaml"))
    assert sorted(names) == shipped


@pytest.mark.parametrize("overrides", readme_task_commands(), ids=lambda o: o[0])
def test_readme_task_line_loads_and_validates(overrides):
    """(Training on each task is tested in ``test_task_training.py`` and the tasks' own tests.)"""
    load(*overrides)
