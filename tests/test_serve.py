"""The OpenAI-compatible endpoint, over real HTTP on 127.0.0.1 with the real ``openai``
client: what it answers, what it records, and what it refuses.

The model is the tiny random-weight one behind the Hugging Face backend, except where an
answer must be a tool call: a random model cannot write one, so those tests use a
backend that replays fixed answers (:class:`ScriptedBackend`, the only stand-in here)."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from chat_templates import chat_tokenizer
from grpo_lab.modeling import build_tiny_model
from grpo_lab.rollout.backend import Completion
from grpo_lab.rollout.backends.hf import HFBackend
from grpo_lab.rollout.conversation import ConversationRenderer
from grpo_lab.rollout.prompts import PromptEncoder
from grpo_lab.endpoint.app import ServeSettings
from grpo_lab.endpoint.server import Endpoint
from grpo_lab.endpoint.tools import TOOL_PARSERS, ToolCall

SEARCH_TOOL = {"type": "function", "function": {"name": "search", "description": "Search the notes.",
                                                "parameters": {"type": "object",
                                                               "properties": {"query": {"type": "string"}},
                                                               "required": ["query"]}}}


@pytest.fixture(scope="module")
def chatml():
    return chat_tokenizer("chatml")


@pytest.fixture(scope="module")
def served(chatml):
    """The tiny model on the HF backend, served; answers of at most 8 tokens."""
    model = build_tiny_model(chatml, hidden_size=64, num_layers=2, num_heads=1, num_kv_heads=1, intermediate_size=128,
                             seed=0)
    endpoint = Endpoint.start(HFBackend(model, chatml), chatml, ServeSettings(model="policy", max_tokens=8,
                                                                              max_context=400))
    yield endpoint
    endpoint.stop()


class ScriptedBackend:
    """A backend that answers each prompt with the next of ``answers`` (text, encoded by
    ``tokenizer`` and cut at ``max_tokens``), log-prob -1 per token. Stands in for a
    model where a test needs a given answer (a tool call) that a random model cannot
    write."""

    def __init__(self, tokenizer, answers: list[str]) -> None:
        self.tokenizer, self.answers, self.prompts = tokenizer, list(answers), []

    def generate(self, prompts, params):
        out = []
        for prompt, sp in zip(prompts, [params] * len(prompts) if not isinstance(params, list) else params):
            self.prompts.append(list(prompt))
            ids = self.tokenizer(self.answers.pop(0), add_special_tokens=False)["input_ids"][: sp.max_tokens]
            out.append(Completion(ids, [-1.0] * len(ids), "stop"))
        return out


def rendered(tok, messages, tools=None) -> list[int]:
    """The chat template's own tokenization of ``messages`` up to the generation prompt."""
    ids = tok.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def chat(client, messages, **kwargs):
    return client.chat.completions.create(model="policy", messages=messages, **kwargs)


def test_every_call_is_a_row_of_the_ids_the_server_returned_and_a_five_call_conversation_reuses_them_verbatim(served,
                                                                                                              chatml):
    """Five calls, each the previous messages, the model's answer as returned and a new
    user message: each prompt is the previous prompt, the sampled ids and the template's
    missing closing tokens, then the new message's tokens; the recorded rows are exactly
    the ids and log-probs the responses carried."""
    key = served.sessions.open()
    client = openai.OpenAI(base_url=served.base_url, api_key=key)
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Go left."}]
    responses = []
    for turn in range(5):
        response = chat(client, messages, logprobs=True)
        responses.append(response)
        messages += [response.choices[0].message.model_dump(exclude_none=True),
                     {"role": "user", "content": f"Now go down {turn}."}]
    calls = served.sessions.close(key).calls
    renderer = ConversationRenderer(PromptEncoder(chatml, True, ""))
    assert len(calls) == 5 and [c.extends for c in calls] == [False, True, True, True, True]
    for call, response in zip(calls, responses):
        choice = response.choices[0]
        assert call.prompt_ids == response.model_extra["prompt_token_ids"]
        assert call.completion.token_ids == choice.model_extra["token_ids"]
        assert call.completion.logprobs == [t.logprob for t in choice.logprobs.content]
    assert calls[0].prompt_ids == rendered(chatml, messages[:2])
    for prev, call, k in zip(calls, calls[1:], range(5)):
        answer = prev.completion.token_ids
        reused = [*prev.prompt_ids, *answer, *renderer.closing(answer)]
        new = chatml(f"<|im_start|>user\nNow go down {k}.<|im_end|>\n<|im_start|>assistant\n",
                     add_special_tokens=False)["input_ids"]
        assert call.prompt_ids == reused + new


def test_an_agent_that_rewrites_its_history_starts_a_new_prefix(served, chatml):
    """A call whose messages do not extend the previous call's (the agent dropped a
    turn, or edited the model's answer) is rendered afresh by the chat template."""
    key = served.sessions.open()
    client = openai.OpenAI(base_url=served.base_url, api_key=key)
    first = [{"role": "user", "content": "Go left."}]
    answer = chat(client, first).choices[0].message.model_dump(exclude_none=True)
    edited = {**answer, "content": answer["content"] + " (edited)"}
    summarised = [{"role": "user", "content": "Summary: you went left. Go down."}]
    chat(client, first + [edited, {"role": "user", "content": "Go down."}])
    chat(client, summarised)
    calls = served.sessions.close(key).calls
    assert [c.extends for c in calls] == [False, False, False]
    assert calls[1].prompt_ids == rendered(chatml, first + [edited, {"role": "user", "content": "Go down."}])
    assert calls[2].prompt_ids == rendered(chatml, summarised)


def test_tool_calls_come_back_parsed_and_the_tool_result_extends_the_conversation():
    """With ``tools`` the answer's ``<tool_call>`` block comes back as ``tool_calls``
    (finish reason ``tool_calls``); the agent's next call with the tool's result extends
    the conversation by the template's rendering of that result; an answer whose call
    does not parse comes back as plain content and is counted."""
    tok = chat_tokenizer("qwen2.5_tools")
    answers = ['<tool_call>\n{"name": "search", "arguments": {"query": "frozen lake"}}\n</tool_call><|im_end|>',
               "The lake is frozen.<|im_end|>",
               '<tool_call>\n{"name": "search", "arguments": {"query": </tool_call><|im_end|>']
    backend = ScriptedBackend(tok, answers)
    endpoint = Endpoint.start(backend, tok, ServeSettings(model="policy", max_tokens=256))
    try:
        key = endpoint.sessions.open()
        client = openai.OpenAI(base_url=endpoint.base_url, api_key=key)
        messages = [{"role": "user", "content": "Is the lake frozen?"}]
        first = chat(client, messages, tools=[SEARCH_TOOL])
        call = first.choices[0].message.tool_calls[0]
        assert first.choices[0].finish_reason == "tool_calls" and first.choices[0].message.content is None
        assert (call.type, call.function.name, json.loads(call.function.arguments)) == ("function", "search",
                                                                                        {"query": "frozen lake"})
        messages += [first.choices[0].message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": "The lake froze in May."}]
        second = chat(client, messages, tools=[SEARCH_TOOL])
        assert second.choices[0].message.content == "The lake is frozen." and not second.choices[0].message.tool_calls
        third = chat(client, [{"role": "user", "content": "Search again."}], tools=[SEARCH_TOOL])
        assert third.choices[0].message.tool_calls is None and "<tool_call>" in third.choices[0].message.content
        assert endpoint.stats.malformed_tool_calls == 1 and endpoint.stats.tool_calls == 1
        calls = endpoint.sessions.close(key).calls
    finally:
        endpoint.stop()
    assert [c.extends for c in calls] == [False, True, False]
    tool_turn = tok("<|im_start|>user\n<tool_response>\nThe lake froze in May.\n</tool_response><|im_end|>\n"
                    "<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    newline = tok("\n", add_special_tokens=False)["input_ids"]
    assert calls[1].prompt_ids == [*calls[0].prompt_ids, *calls[0].completion.token_ids, *newline, *tool_turn]
    assert calls[0].prompt_ids == rendered(tok, messages[:1], [SEARCH_TOOL])


def test_the_hermes_parser_reads_several_calls_and_refuses_broken_ones():
    hermes = TOOL_PARSERS.get("hermes")
    two = hermes('Let me look.\n<tool_call>\n{"name": "a", "arguments": {"x": 1}}\n</tool_call>\n'
                 '<tool_call>{"name": "b", "arguments": "{\\"y\\": 2}"}</tool_call>')
    assert two.content == "Let me look." and two.calls == (ToolCall("a", {"x": 1}), ToolCall("b", {"y": 2}))
    assert hermes("no call here") == hermes("no call here") and not hermes("no call here").calls
    for broken in ('<tool_call>{"name": "a", "arguments": {"x": 1}}', '<tool_call>{"arguments": {}}</tool_call>',
                   '<tool_call>{"name": "a", "arguments": [1]}</tool_call>', "<tool_call>not json</tool_call>"):
        parsed = hermes(broken)
        assert parsed.malformed and parsed.content == broken and not parsed.calls


def test_bad_requests_get_a_4xx_with_a_message_and_the_server_keeps_serving(served):
    """Malformed JSON, a missing, unknown or finished episode's key, another model's
    name, n > 1, a prompt past the context: each refused in the API's error shape; then
    a good request is answered."""
    run = served.sessions.run_key
    url = served.base_url + "/chat/completions"
    good = {"model": "policy", "messages": [{"role": "user", "content": "hi"}]}

    def post(body, key=run, raw=False):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        data = body if raw else json.dumps(body)
        return httpx.post(url, content=data, headers={**headers, "Content-Type": "application/json"}, timeout=60)

    finished = served.sessions.open()
    served.sessions.close(finished)
    cases = [
        (post("{not json", raw=True), 400, "malformed request"),
        (post({"model": "policy"}), 400, "messages"),
        (post({**good, "messages": []}), 400, "messages must not be empty"),
        (post({**good, "messages": [{"content": "no role"}]}), 400, "'role'"),
        (post(good, key=None), 401, "missing API key"),
        (post(good, key="sk-nope"), 401, "invalid API key"),
        (post(good, key=finished), 401, "episode has finished"),
        (post({**good, "model": "gpt-4o"}), 404, "does not exist"),
        (post({**good, "n": 2}), 400, "n=1"),
        (post({**good, "max_tokens": 0}), 400, "max_tokens"),
        (post({**good, "temperature": -1}), 400, "temperature"),
        (post({**good, "messages": [{"role": "user", "content": "left " * 500}]}), 400, "maximum context length"),
    ]
    for response, status, words in cases:
        assert response.status_code == status, (response.status_code, response.text)
        assert words in response.json()["error"]["message"], response.text
    client = openai.OpenAI(base_url=served.base_url, api_key=run, max_retries=0)
    with pytest.raises(openai.BadRequestError) as too_long:
        chat(client, [{"role": "user", "content": "left " * 500}])
    assert too_long.value.code == "context_length_exceeded"
    answer = chat(client, [{"role": "user", "content": "hi"}], max_tokens=100)
    assert 1 <= answer.usage.completion_tokens <= 8  # capped at the server's budget


def concurrent_two_call_episodes(endpoint, n: int) -> None:
    """``n`` agents at once through ``AsyncOpenAI``, two calls each (the second extending
    the first); every episode's rows must be exactly its responses' ids."""

    async def agent(k: int):
        key = endpoint.sessions.open()
        client = openai.AsyncOpenAI(base_url=endpoint.base_url, api_key=key, max_retries=0)
        messages = [{"role": "user", "content": f"Task {k}: go left."}]
        first = await client.chat.completions.create(model="policy", messages=messages)
        messages += [first.choices[0].message.model_dump(exclude_none=True), {"role": "user", "content": "Again."}]
        second = await client.chat.completions.create(model="policy", messages=messages)
        await client.close()
        return key, [first, second]

    async def main():
        return await asyncio.gather(*(agent(k) for k in range(n)))

    for key, responses in asyncio.run(main()):
        calls = endpoint.sessions.close(key).calls
        assert [c.extends for c in calls] == [False, True]
        for call, response in zip(calls, responses):
            assert call.completion.token_ids == response.choices[0].model_extra["token_ids"]
            assert call.prompt_ids == response.model_extra["prompt_token_ids"]


def test_64_concurrent_episodes_are_batched_and_each_records_only_its_own_calls(served):
    """64 agents at once, two calls each: requests share generate calls, and every
    episode's rows are its own responses' ids."""
    steps = served.queue.stats.engine_steps
    concurrent_two_call_episodes(served, 64)
    assert served.queue.stats.engine_steps - steps < 64  # batched: far fewer generate calls than requests


def test_streaming_completions_and_models_answer_as_the_client_expects(served, chatml):
    client = openai.OpenAI(base_url=served.base_url, api_key=served.sessions.run_key)
    assert [m.id for m in client.models.list()] == ["policy"]
    chunks = list(chat(client, [{"role": "user", "content": "hi"}], stream=True,
                       stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish in (["stop"], ["length"]) and chunks[-1].usage.completion_tokens >= 1
    ids = next(c.choices[0].model_extra["token_ids"] for c in chunks if c.choices and c.choices[0].model_extra.get("token_ids"))
    assert text == chatml.decode(ids, skip_special_tokens=True)
    done = client.completions.create(model="policy", prompt="Go left", max_tokens=4, logprobs=1)
    choice = done.choices[0]
    assert len(choice.model_extra["token_ids"]) == len(choice.logprobs.token_logprobs) <= 4
    assert done.model_extra["prompt_token_ids"] == chatml("Go left")["input_ids"]
    by_ids = client.completions.create(model="policy", prompt=done.model_extra["prompt_token_ids"], max_tokens=2)
    assert by_ids.model_extra["prompt_token_ids"] == done.model_extra["prompt_token_ids"]


def test_a_paused_queue_starts_nothing_until_the_weights_are_swapped(served):
    """Inside ``paused()`` a request waits; it is answered after the block."""
    import threading

    client = openai.OpenAI(base_url=served.base_url, api_key=served.sessions.run_key)
    answered = threading.Event()

    def ask():
        chat(client, [{"role": "user", "content": "hi"}])
        answered.set()

    with served.paused():
        worker = threading.Thread(target=ask)
        worker.start()
        assert not answered.wait(1.0)
    assert answered.wait(60)
    worker.join()


def test_python_m_grpo_lab_serve_serves_a_saved_model_until_interrupted(tmp_path, chatml):
    """The endpoint alone, as a user starts it on a model directory: it prints its URL
    and key, answers the ``openai`` client, and stops cleanly on SIGINT."""
    import signal
    import subprocess
    import sys

    model = build_tiny_model(chatml, hidden_size=64, num_layers=2, num_heads=1, num_kv_heads=1, intermediate_size=128,
                             seed=0)
    model.save_pretrained(tmp_path / "policy")
    chatml.save_pretrained(tmp_path / "policy")
    proc = subprocess.Popen([sys.executable, "-m", "grpo_lab.serve", f"model.name_or_path={tmp_path / 'policy'}",
                             "serve.port=0", "serve.api_key=sk-test-key-1", "serve.model_name=tiny",
                             "rollout.max_new_tokens=6"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        banner = proc.stdout.readline()
        assert banner.startswith("serving 'tiny' at http://127.0.0.1:"), (banner, proc.stderr.read() if proc.poll() else "")
        assert proc.stdout.readline().strip() == "API key: sk-test-key-1"
        client = openai.OpenAI(base_url=banner.split(" at ")[1].strip(), api_key="sk-test-key-1")
        answer = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Go left."}])
        assert 1 <= answer.usage.completion_tokens <= 6
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=client.base_url, api_key="sk-wrong-key", max_retries=0).models.list()
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
