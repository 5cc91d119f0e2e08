"""Conversation episodes: token in, token out.

- The renderer writes what the chat template writes: a conversation built turn by turn
  (first prompt, sampled answer, missing closing tokens, user turn) equals the
  template's own tokenization of the whole conversation, for ChatML (Qwen) and Llama-3
  templates, whether the answer ended on a stop string or on a sampled end-of-turn token
  (which leaves ChatML's trailing newline to add: the verl#6501 class of bug).
- Through the real agent loop (tiny model, HF backend, FrozenLake, 10 turns): each
  turn's prompt and answer are a prefix of the next turn's prompt, the answer tokens are
  the sampled ones, each observation is tokenized once, and the loss mask covers the
  turn's own answer.
- ``max_episode_tokens`` with each overlong policy; configuration errors.
"""

from __future__ import annotations

import pytest
import torch
from chat_templates import ANSWER_PREFIX, END_OF_TURN, chat_tokenizer

from grpo_lab.config import Config, ConfigError, RolloutConfig
from grpo_lab.envs import FrozenLakeEnv
from grpo_lab.modeling import build_tiny_model
from grpo_lab.rollout import AgentLoopConfig, PromptEncoder, SamplingParams, run_episodes
from grpo_lab.rollout.agent_loop import OverlongPromptError
from grpo_lab.rollout.backend import Completion
from grpo_lab.rollout.backends.hf import HFBackend
from grpo_lab.rollout.conversation import NO_ACTION_NOTE, ConversationRenderer, TemplateError, is_prefix
from grpo_lab.rollout.faults import FaultLog

ANSWERS = ["<action>left</action>", "I think <action>down</action>", "no idea"]
OBSERVATIONS = ["Grid:\nS.F\nFHG\nYou are at S.", "Grid:\n.S.\nFHG", "Grid:\n..S\nFHG\nStill here."]


def by_template(tok, system, answers, observations, close_sampled, kind="chatml"):
    """The conversation's tokens, built turn by turn; answers are the tokens of their text
    (plus the family's end-of-turn token when ``close_sampled``)."""
    r = ConversationRenderer.of(PromptEncoder(tok, system=system))
    ids = r.start("Task.\n\n" + observations[0])
    end = tok.convert_tokens_to_ids(END_OF_TURN[kind])
    for answer, obs in zip(answers, observations[1:]):
        sampled = tok(ANSWER_PREFIX.get(kind, "") + answer, add_special_tokens=False)["input_ids"]
        sampled += [end] if close_sampled else []
        before = list(ids)
        ids = r.extend(ids, sampled, obs)
        assert is_prefix(before + sampled, ids)
    return ids


#: templates whose system text is written into the last user message
SYSTEM_IN_LAST_USER = ("mistral_v3", "mistral_nemo")


@pytest.mark.parametrize("kind", ["chatml", "llama3", "phi3", "phi3.5", "mistral_v3", "mistral_nemo"])
@pytest.mark.parametrize("close_sampled", [False, True])
@pytest.mark.parametrize("system", ["", "Be brief."])
def test_turn_by_turn_equals_the_templates_rendering_of_the_whole_conversation(kind, close_sampled, system):
    """Phi-3 closes a last assistant message with the end-of-text token but a continued one
    without: the continued form is appended. Mistral's templates write the system text
    into the last user message: with a system prompt they are refused when the renderer
    is built (before any turn), saying why; without one they are followed exactly."""
    tok = chat_tokenizer(kind)
    if system and kind in SYSTEM_IN_LAST_USER:
        with pytest.raises(TemplateError, match="writes the system prompt into the last user message.*"
                                                "rollout.system_prompt=''"):
            ConversationRenderer.of(PromptEncoder(tok, system=system))
        return
    ids = by_template(tok, system, ANSWERS[:2], OBSERVATIONS, close_sampled, kind)
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": "Task.\n\n" + OBSERVATIONS[0]},
        {"role": "assistant", "content": ANSWERS[0]}, {"role": "user", "content": OBSERVATIONS[1]},
        {"role": "assistant", "content": ANSWERS[1]}, {"role": "user", "content": OBSERVATIONS[2]}]
    whole = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    whole = list(whole["input_ids"] if hasattr(whole, "keys") else whole)
    assert ids == whole, (tok.decode(ids), tok.decode(whole))


def test_a_template_is_checked_when_the_trainer_starts(tmp_path):
    """A conversation run with a template it cannot follow stops before any rollout, with
    the reason; Phi-3, refused at its first turn before, starts."""
    from grpo_lab.config import EnvConfig, LoggerConfig, ModelConfig, TrainerConfig, WarmupConfig
    from grpo_lab.trainer import Trainer

    def config(system):
        return Config(env=EnvConfig(max_steps=2), model=ModelConfig(),
                      rollout=RolloutConfig(episode_format="conversation", system_prompt=system, env_workers=0),
                      trainer=TrainerConfig(total_steps=1, tasks_per_step=1, eval_episodes=0,
                                            warmup=WarmupConfig(steps=0)),
                      logger=LoggerConfig(wandb="false", progress_bar=False, plot=False))

    for kind, system in (("mistral_v3", "Be brief."), ("phi3", "Be brief.")):
        tok = chat_tokenizer(kind)
        model = build_tiny_model(tok, hidden_size=64, num_layers=1, num_heads=1, num_kv_heads=1, intermediate_size=64)
        if kind == "mistral_v3":
            with pytest.raises(ConfigError, match="rollout.episode_format=conversation: the chat template writes the "
                                                  "system prompt into the last user message"):
                Trainer(config(system), output_dir=tmp_path / kind, model=model, tokenizer=tok)
        else:
            trainer = Trainer(config(system), output_dir=tmp_path / kind, model=model, tokenizer=tok)
            assert tok.decode(ConversationRenderer.of(trainer.parts.encoder).close_ids) == "<|end|>\n"
            trainer.envs.close()


def test_closing_adds_only_what_the_answer_lacks():
    tok = chat_tokenizer("chatml")
    r = ConversationRenderer.of(PromptEncoder(tok))
    im_end, newline = tok.convert_tokens_to_ids("<|im_end|>"), tok("\n", add_special_tokens=False)["input_ids"]
    assert r.close_ids == [im_end, *newline]
    assert r.closing([5, 6]) == [im_end, *newline]  # stopped on a stop string: the whole closing
    assert r.closing([5, im_end]) == newline  # sampled <|im_end|>: the newline the template puts after it
    assert r.closing([5, im_end, *newline]) == []
    llama = ConversationRenderer.of(PromptEncoder(chat_tokenizer("llama3")))
    assert llama.closing([5, llama.close_ids[0]]) == []  # <|eot_id|> alone closes a Llama-3 turn


def test_a_template_that_rewrites_earlier_turns_keeps_them_as_sampled():
    """Qwen3 drops the reasoning block of earlier answers; the conversation keeps the
    sampled tokens instead (as verl does), and the user turn is still the template's."""
    tok = chat_tokenizer("qwen3")
    r = ConversationRenderer.of(PromptEncoder(tok))
    first = r.start("hello")
    answer = tok("<think>\nhm\n</think>\n\n<action>up</action>", add_special_tokens=False)["input_ids"]
    ids = r.extend(first, answer, "next")
    assert ids[: len(first) + len(answer)] == first + answer
    assert tok.decode(ids[len(first) + len(answer):]) == "<|im_end|>\n<|im_start|>user\nnext<|im_end|>\n<|im_start|>assistant\n"


def test_a_template_that_drops_the_answer_text_is_refused_by_name():
    tok = chat_tokenizer("chatml")
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}{% endfor %}"
    with pytest.raises(TemplateError, match="does not write an assistant message's text"):
        ConversationRenderer.of(PromptEncoder(tok))


def test_plain_text_conversation_appends_eos_and_the_observation():
    tok = chat_tokenizer("chatml")
    r = ConversationRenderer.of(PromptEncoder(tok, use_chat_template=False, system="Sys."))
    first = r.start("Task")
    assert tok.decode(first) == "Sys.\n\nTask"
    ids = r.extend(first, tok("ok", add_special_tokens=False)["input_ids"], "obs")
    assert tok.decode(ids, skip_special_tokens=False) == "Sys.\n\nTaskok<|im_end|>\n\nobs"


# ----------------------------------------------------------------------------- the loop
def conversation_batch(kind="chatml", max_steps=10, group_size=2, seeds=(3, 4), max_tokens=6, **loop):
    tok = chat_tokenizer(kind)
    model = build_tiny_model(tok, hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=128)
    config = AgentLoopConfig(group_size=group_size, max_steps=max_steps, sampling=SamplingParams(max_tokens=max_tokens),
                             episode_format="conversation", request_seed=7, **loop)
    faults = FaultLog()
    batch = run_episodes(HFBackend(model, tok), PromptEncoder(tok, system="Play well."), FrozenLakeEnv, list(seeds),
                         config, faults=faults)
    return tok, batch, faults


@pytest.mark.parametrize("kind", ["chatml", "llama3"])
def test_conversation_rows_from_the_real_loop_extend_one_another(kind):
    tok, batch, _ = conversation_batch(kind)
    renderer = ConversationRenderer.of(PromptEncoder(tok, system="Play well."))
    assert len(batch) > 0 and int(batch.step.max()) == 9  # episodes of 10 turns
    head, foot = tok.decode(renderer.user_turn("XYZ")).split("XYZ")  # the template's user turn around its text
    rows_of: dict[int, list[int]] = {}
    for i, t in enumerate(batch.traj_id.tolist()):
        rows_of.setdefault(t, []).append(i)
    for rows in rows_of.values():
        for a, b in zip(rows, rows[1:]):
            turn = batch.prompt_ids[a].tolist() + batch.response_ids[a].tolist()
            nxt = batch.prompt_ids[b].tolist()
            assert is_prefix(turn, nxt), "a turn's prompt and answer are the start of the next prompt"
            # what follows the answer: its missing closing tokens and one user turn, tokenized once
            added = nxt[len(turn):]
            closing = renderer.closing(batch.response_ids[a].tolist())
            assert added[: len(closing)] == closing
            user = tok.decode(added[len(closing):])
            assert user.startswith(head) and user.endswith(foot) and head not in user[len(head):], user
        for i in rows:
            assert batch.loss_mask[i].numel() == batch.response_ids[i].numel()  # the loss covers the answer only
            assert len(batch.rollout_logprobs[i]) == batch.response_ids[i].numel()


def test_unparsed_answers_get_a_note_and_the_same_observation():
    tok, batch, _ = conversation_batch(max_steps=3, group_size=2, seeds=(5,))
    invalid = [i for i in range(len(batch)) if not batch.valid_action[i] and not batch.done[i]]
    assert invalid, "a random tiny model's answers have no action"
    i = invalid[0]
    nxt = i + 1
    assert batch.traj_id[nxt] == batch.traj_id[i]
    tail = tok.decode(batch.prompt_ids[nxt][len(batch.prompt_ids[i]) + len(batch.response_ids[i]):].tolist())
    assert NO_ACTION_NOTE in tail


@pytest.mark.parametrize("policy", ["end_episode", "drop_episode", "error"])
def test_max_episode_tokens_with_each_overlong_policy(policy):
    _, free, _ = conversation_batch(max_steps=6, seeds=(3,))
    lengths = [len(p) + len(r) for p, r in zip(free.prompt_ids, free.response_ids)]
    limit = sorted(len(p) for p in free.prompt_ids)[len(free) // 2] + 1  # about half the turns fit
    if policy == "error":
        with pytest.raises(OverlongPromptError, match=f"the limit is {limit}"):
            conversation_batch(max_steps=6, seeds=(3,), max_episode_tokens=limit, overlong=policy)
        return
    _, batch, faults = conversation_batch(max_steps=6, seeds=(3,), max_episode_tokens=limit, overlong=policy)
    assert max(lengths) > limit
    assert all(len(p) + len(r) <= limit for p, r in zip(batch.prompt_ids, batch.response_ids))
    if policy == "end_episode":
        assert faults.overlong_ended >= 1 and len(batch) > 0
        for t in set(batch.traj_id.tolist()):
            rows = [i for i in range(len(batch)) if batch.traj_id[i] == t]
            assert bool(batch.done[rows[-1]]) and not any(bool(batch.done[i]) for i in rows[:-1])
    else:
        assert faults.overlong_dropped >= 1


def test_config_checks_the_episode_format():
    with pytest.raises(ValueError, match="truncate_history.*conversation"):
        AgentLoopConfig(episode_format="conversation", overlong="truncate_history")
    with pytest.raises(ValueError, match="max_episode_tokens"):
        AgentLoopConfig(max_episode_tokens=100)
    rc = RolloutConfig(episode_format="conversation")
    rc.validate()
    assert rc.overlong_prompt == "end_episode"  # the format's default
    for bad, key in ((dict(episode_format="chat"), "rollout.episode_format"),
                     (dict(episode_format="conversation", overlong_prompt="truncate_history"), "rollout.overlong_prompt"),
                     (dict(max_episode_tokens=64), "rollout.max_episode_tokens")):
        with pytest.raises(ConfigError, match=key):
            Config(rollout=RolloutConfig(**bad)).validate()


def test_a_backend_answer_is_kept_verbatim_even_when_its_text_would_encode_differently():
    """Token out: the ids a backend returns are what the next prompt holds, even when
    decoding and encoding them again would give other ids."""
    tok = chat_tokenizer("chatml")
    odd = [tok.convert_tokens_to_ids(c) for c in ["<", "a"]] + tok("ction>up</action>", add_special_tokens=False)["input_ids"]
    assert tok(tok.decode(odd), add_special_tokens=False)["input_ids"] != odd

    class Fixed:
        def generate(self, prompts, params):
            return [Completion(token_ids=list(odd), logprobs=[0.0] * len(odd), finish_reason="stop") for _ in prompts]

    config = AgentLoopConfig(group_size=1, max_steps=2, episode_format="conversation")
    batch = run_episodes(Fixed(), PromptEncoder(tok), FrozenLakeEnv, [1], config)
    assert len(batch) == 2
    second = batch.prompt_ids[1].tolist()
    start = len(batch.prompt_ids[0])
    assert second[start: start + len(odd)] == odd
    assert torch.equal(batch.response_ids[0], torch.tensor(odd))


@pytest.mark.parametrize("scheduler, estimator", [("full", "grpo"), ("continuous", "gigpo"), ("full", "tree_grpo")])
def test_training_on_conversation_episodes_through_the_trie_forward(tmp_path, scheduler, estimator):
    """A run with conversation episodes and the trie forward: the update's log-probs of the
    sampled tokens equal the sampler's (the trie reproduces each conversation exactly);
    GiGPO's step groups come from the turns' anchors as in the memory format; Tree-GRPO's
    trees branch conversations."""
    import json

    from grpo_lab.config import AlgoConfig, EnvConfig, LoggerConfig, ModelConfig, TrainerConfig, WarmupConfig
    from grpo_lab.trainer import Trainer

    config = Config(
        algo=AlgoConfig(estimator=estimator, group_size=3, entropy_coef=0.001),  # every row trains, rewarded or not
        env=EnvConfig(max_steps=4),
        rollout=RolloutConfig(episode_format="conversation", max_episode_tokens=400, scheduler=scheduler, env_workers=0,
                              sampler="tree" if estimator == "tree_grpo" else "chain"),
        model=ModelConfig(tiny_hidden_size=64, tiny_num_heads=1, tiny_num_kv_heads=1, tiny_intermediate_size=128),
        trainer=TrainerConfig(total_steps=2, tasks_per_step=2, eval_episodes=2, lr=1e-3, packing="trie",
                              warmup=WarmupConfig(steps=0)),
        logger=LoggerConfig(wandb="false", progress_bar=False),
    )
    Trainer(config, output_dir=tmp_path).train()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(r["num_rows"] > 0 for r in records)
    assert all(r["num_updates"] == 1 for r in records)
    assert all(r["logprob_diff_rollout"] < 1e-3 for r in records)
    assert all("overlong_ended" in r for r in records)
    if estimator == "gigpo":
        assert all(r["frac_rows_in_shared_step_groups"] > 0 for r in records)  # turns that revisit a state


def test_warmup_demonstrations_are_conversations_that_extend_one_another():
    """The warm-up of a conversation run imitates conversations: each demonstration's
    prompt is the one before it, its answer (EOS included), the closing the template adds
    and the next observation, as a rollout would build it."""
    from grpo_lab.rollout.demonstrations import conversation_demonstrations

    tok = chat_tokenizer("chatml")
    encoder = PromptEncoder(tok)
    demos = conversation_demonstrations(FrozenLakeEnv, 3, 6, 0, encoder, tok.eos_token_id)
    assert len(demos) >= 3
    chains = 0
    for (p0, a0), (p1, _) in zip(demos, demos[1:]):
        if is_prefix(p0.tolist() + a0.tolist(), p1.tolist()):
            chains += 1
            rest = p1.tolist()[len(p0) + len(a0):]
            assert tok.decode(rest).startswith("\n<|im_start|>user\n")  # <|im_end|> was the answer's EOS
        assert tok.decode(a0).startswith("<action>") and a0[-1] == tok.eos_token_id
    assert chains >= len(demos) - 3  # every turn but an episode's first extends the one before
    capped = conversation_demonstrations(FrozenLakeEnv, 3, 6, 0, encoder, tok.eos_token_id, max_tokens=120)
    assert capped and all(len(p) + len(a) <= 120 for p, a in capped)


@pytest.mark.parametrize("node", ["step", "segment"])
def test_tree_sampled_conversations_continue_their_ancestors_tokens(node):
    """Tree-GRPO / TreeRPO on conversation episodes: a node's prompt is its parent's prompt
    and answer followed (at a turn's end) by the closing and the next user turn."""
    import random

    from grpo_lab.rollout.tree import TreeSamplerConfig, sample_trees

    tok = chat_tokenizer("chatml")
    model = build_tiny_model(tok, hidden_size=64, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64)
    config = AgentLoopConfig(max_steps=4, sampling=SamplingParams(max_tokens=6), episode_format="conversation",
                             request_seed=2)
    tree = TreeSamplerConfig(trees_per_prompt=2, rounds=1, nodes_per_round=2, node=node, segment_tokens=3)
    batch, _ = sample_trees(HFBackend(model, tok), PromptEncoder(tok), FrozenLakeEnv, [7], config, tree,
                            random.Random(0))
    row_of = {(int(t), int(n)): i for i, (t, n) in enumerate(zip(batch.tree_id, batch.node_id))}
    children = 0
    for i in range(len(batch)):
        parent = row_of.get((int(batch.tree_id[i]), int(batch.parent_id[i])))
        if parent is None:
            continue
        children += 1
        before = batch.prompt_ids[parent].tolist() + batch.response_ids[parent].tolist()
        assert is_prefix(before, batch.prompt_ids[i].tolist())
    assert children >= 3
