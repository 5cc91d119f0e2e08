"""The agent loop with a scripted backend: exact tokens, masks, flags, and early exits."""

from __future__ import annotations

import pytest
import torch

from grpo_lab.envs.base import Observation, StepResult
from grpo_lab.rollout import AgentLoopConfig, Completion, PromptEncoder, SamplingParams, Turn, parse_action, render_prompt, run_episodes


class LineEnv:
    """Positions 0..3 on a line; the goal is 3. ``left`` at 0 is illegal. Start = seed % 2."""

    instruction = "Walk right to 3."

    def reset(self, seed):
        self.pos = seed % 2
        return self._obs()

    def legal_actions(self):
        return ["right"] + (["left"] if self.pos > 0 else [])

    def step(self, action):
        if action not in self.legal_actions():
            return StepResult(self._obs(), 0.0, False, {"won": False, "valid_action": False})
        self.pos += 1 if action == "right" else -1
        won = self.pos == 3
        return StepResult(self._obs(), float(won), won, {"won": won, "valid_action": True})

    def _obs(self):
        return Observation(f"position {self.pos}", ("line", self.pos))


class ScriptedBackend:
    """Answers each call from a script; records the prompts it was given."""

    def __init__(self, tokenizer, script):
        self.tokenizer, self.script, self.calls = tokenizer, list(script), []

    def generate(self, prompts, params):
        texts = self.script.pop(0)
        assert len(texts) == len(prompts), f"script expects {len(texts)} prompts, got {len(prompts)}"
        self.calls.append([list(p) for p in prompts])
        out = []
        for k, text in enumerate(texts):
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            out.append(Completion(ids, [-0.1 * (k + 1)] * len(ids)))
        return out

    def load_weights(self, named_tensors, version=None):
        pass

    def sleep(self):
        pass

    def wake(self):
        pass


R, L, JUNK = "<action>right</action>", "<action>left</action>", "I am not sure"


def play(tokenizer, window=1):
    # 2 seeds x G=2: trajectories 0, 1 start at 0 (group 0); 2, 3 start at 1 (group 1)
    script = [
        [R, JUNK, R, L],  # 0 -> 1 | 0 stays (unparseable) | 1 -> 2 | 1 -> 0
        [R, L, R, R],  # 1 -> 2 | left at 0 is illegal | 2 -> 3 wins | 0 -> 1
        [R, R, R],  # 2 -> 3 wins | 0 -> 1, max steps | 1 -> 2, max steps
    ]
    backend = ScriptedBackend(tokenizer, script)
    encoder = PromptEncoder(tokenizer)
    config = AgentLoopConfig(group_size=2, max_steps=3, history_window=window, sampling=SamplingParams(max_tokens=8))
    batch = run_episodes(backend, encoder, LineEnv, [0, 1], config)
    return batch, backend, encoder


def test_rows_flags_and_rewards(tokenizer):
    batch, backend, _ = play(tokenizer)
    assert [len(c) for c in backend.calls] == [4, 4, 3]  # the winner of turn 2 stops at once
    assert batch.traj_id.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    assert batch.group_id.tolist() == [0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1]
    assert batch.step.tolist() == [0, 1, 2, 0, 1, 2, 0, 1, 0, 1, 2]
    assert batch.valid_action.tolist() == [True, True, True, False, False, True, True, True, True, True, True]
    assert batch.reward.tolist() == [0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0]
    assert batch.won.tolist() == [False, False, True, False, False, False, False, True, False, False, False]
    assert batch.done.tolist() == [False, False, True, False, False, True, False, True, False, False, True]
    assert [a[1] for a in batch.anchor] == [0, 1, 2, 0, 0, 0, 1, 2, 1, 0, 1]
    assert batch.trajectory_success().tolist() == [True, False, True, False]


def test_exact_response_tokens_logprobs_and_masks(tokenizer):
    batch, _, _ = play(tokenizer)
    right = tokenizer(R, add_special_tokens=False)["input_ids"]
    junk = tokenizer(JUNK, add_special_tokens=False)["input_ids"]
    assert batch.response_ids[0].tolist() == right
    assert batch.response_ids[3].tolist() == junk
    # trajectory 1 was the second prompt of turn 1: the scripted log-prob is -0.2
    assert torch.allclose(batch.rollout_logprobs[3], torch.full((len(junk),), -0.2))
    for resp, mask in zip(batch.response_ids, batch.loss_mask):
        assert mask.shape == resp.shape and bool((mask == 1).all())


def test_exact_prompt_tokens_with_history_window(tokenizer):
    batch, backend, encoder = play(tokenizer, window=1)
    # trajectory 1, step 2: the window shows only turn 2 (an illegal left at position 0)
    expected = render_prompt(LineEnv.instruction, [Turn("position 0", None), Turn("position 0", None)], "position 0", 1)
    assert "Turn 2:\nposition 0\nYou answered: (no valid action)" in expected and "Turn 1" not in expected
    assert batch.prompt_ids[5].tolist() == encoder.encode(expected)
    # trajectory 0, step 1: turn 1 shows the parsed action
    expected0 = render_prompt(LineEnv.instruction, [Turn("position 0", "right")], "position 1", 1)
    assert batch.prompt_ids[1].tolist() == encoder.encode(expected0)
    assert backend.calls[1][0] == encoder.encode(expected0)


def test_window_zero_shows_no_history(tokenizer):
    batch, _, encoder = play(tokenizer, window=0)
    assert batch.prompt_ids[2].tolist() == encoder.encode(render_prompt(LineEnv.instruction, [], "position 2", 0))


@pytest.mark.parametrize("text, action", [
    ("<action>up</action>", "up"),
    ("think... <action> left </action>", "left"),
    ("<action>up</action> no, <action>down</action>", "down"),
    ("<action></action>", None),
    ("<action>up", None),
    ("up", None),
])
def test_parse_action(text, action):
    assert parse_action(text) == action


def test_backend_returning_wrong_count_is_an_error(tokenizer):
    class Short(ScriptedBackend):
        def generate(self, prompts, params):
            return []

    with pytest.raises(RuntimeError, match="completions"):
        run_episodes(Short(tokenizer, []), PromptEncoder(tokenizer), LineEnv, [0], AgentLoopConfig(group_size=2))


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="group_size"):
        AgentLoopConfig(group_size=0)
    with pytest.raises(ValueError, match="max_steps"):
        AgentLoopConfig(max_steps=0)


def test_system_prompt_opens_every_prompt_as_text_or_as_the_system_message(tokenizer):
    plain = PromptEncoder(tokenizer, use_chat_template=False, system="Be brief.")
    assert plain.encode("Now:\nx") == tokenizer("Be brief.\n\nNow:\nx", add_special_tokens=True)["input_ids"]
    assert PromptEncoder(tokenizer, use_chat_template=False).encode("Now:\nx") == tokenizer("Now:\nx")["input_ids"]

    class Chat:  # a chat template that shows the roles it was given
        chat_template = "{roles}"

        def apply_chat_template(self, messages, add_generation_prompt, tokenize):
            assert add_generation_prompt and tokenize
            return [len(m["content"]) for m in messages] + [{"system": 1, "user": 2}[m["role"]] for m in messages]

    assert PromptEncoder(Chat(), system="Be brief.").encode("hello") == [9, 5, 1, 2]
    assert PromptEncoder(Chat()).encode("hello") == [5, 2]


def test_an_empty_prompt_is_an_episode_fault_never_a_backend_error(tokenizer):
    """An environment whose first observation is empty, with no instruction and no chat
    template around it, makes a prompt of no tokens: the episode fails by name (counted in
    env_errors) before any request, instead of the HF backend's 'every prompt needs at
    least one token' taking the rollout down."""
    from grpo_lab.envs.base import TextFormat
    from grpo_lab.rollout.backends.hf import HFBackend
    from grpo_lab.rollout.faults import FaultLog
    from grpo_lab.modeling import build_tiny_model

    class Blank:
        instruction = ""
        text_format = TextFormat(tags=(), framed=False)

        def reset(self, seed):
            return Observation("" if seed % 2 else "2+2?", ("row", seed))

        def legal_actions(self):
            return []

        def step(self, action):
            return StepResult(Observation("", ("row", 0)), 1.0, True, {"won": True, "valid_action": True})

    model = build_tiny_model(tokenizer, hidden_size=32, num_layers=1, num_heads=1, num_kv_heads=1, intermediate_size=32)
    faults = FaultLog()
    config = AgentLoopConfig(group_size=2, max_steps=1, sampling=SamplingParams(max_tokens=3))
    batch = run_episodes(HFBackend(model, tokenizer), PromptEncoder(tokenizer), Blank, [0, 1], config, faults=faults)
    assert faults.env_errors == 2 and faults.episodes_dropped == 2
    assert any("the prompt is empty" in line for line in faults.examples)
    assert len(batch) == 2 and set(batch.group_id.tolist()) == {0}  # the other task's group played
