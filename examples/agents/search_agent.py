"""A tool-calling agent written with the plain ``openai`` SDK: it answers a question with
a ``search`` tool over a BM25 index of the synthetic knowledge base that ``env=search_qa``
uses, and its reward is the exact match of its final answer.

Train it (the tasks are that knowledge base's questions)::

    python -m grpo_lab.train env=agent env.kwargs.entry=examples.agents.search_agent:run \\
        env.kwargs.tasks=examples/agents/search_tasks.jsonl model.name_or_path=Qwen/Qwen2.5-1.5B-Instruct

The model sees the tool's JSON schema through its chat template and calls it in the
template's own format; the endpoint turns the call into ``tool_calls`` and records the
tokens. Nothing here knows about training.
"""

from __future__ import annotations

import functools
import json

from grpo_lab.envs.knowledge import build_knowledge_base
from grpo_lab.envs.search_qa import SearchIndex, exact_match_score

SEARCH_TOOL = {
    "type": "function",
    "function": {
        "name": "search",
        "description": "Search the knowledge base; returns the best matching passages.",
        "parameters": {"type": "object", "properties": {"query": {"type": "string", "description": "search words"}},
                       "required": ["query"]},
    },
}
SYSTEM = ("Answer the user's question in a few words. Use the search tool to look facts up; when you know the "
          "answer, reply with the answer alone.")
MAX_CALLS = 4
TOP_K = 3


@functools.lru_cache(maxsize=1)
def knowledge(seed: int = 0) -> tuple[list[str], SearchIndex]:
    passages = build_knowledge_base(seed).passages
    texts = [f"{p['title']}: {p['text']}" for p in passages]
    return texts, SearchIndex(texts)


def search(query: str) -> str:
    texts, index = knowledge()
    hits = index.search(query, TOP_K)
    return "\n".join(texts[i] for i in hits) or "No passage matches."


async def run(task: dict, ctx) -> float:
    """Exact match of the final answer with ``task["answer"]``."""
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": task["question"]}]
    answer = ""
    for _ in range(MAX_CALLS):
        response = await ctx.client.chat.completions.create(model=ctx.model, messages=messages, tools=[SEARCH_TOOL])
        message = response.choices[0].message
        messages.append(message.model_dump(exclude_none=True))
        if not message.tool_calls:
            answer = message.content or ""
            break
        for call in message.tool_calls:
            try:
                query = str(json.loads(call.function.arguments).get("query", ""))
            except (json.JSONDecodeError, AttributeError):
                query = ""
            messages.append({"role": "tool", "tool_call_id": call.id, "content": search(query)})
    return exact_match_score(answer, [task["answer"]])
