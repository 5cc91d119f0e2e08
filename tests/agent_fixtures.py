"""Agent functions for the tests of ``env=agent`` (found by ``module:function`` as a
user's would be)."""

from __future__ import annotations

import asyncio
import time


async def counting(task: dict, ctx) -> float:
    """``task["calls"]`` calls, each extending the conversation; a step reward of 0.5 on
    the first call; returns ``task["reward"]``."""
    messages = [{"role": "user", "content": f"Task {task['name']}."}]
    for k in range(int(task["calls"])):
        response = await ctx.client.chat.completions.create(model=ctx.model, messages=messages, max_tokens=4)
        if k == 0:
            ctx.reward(0.5)
        ctx.anchor(("state", task["name"], k))
        messages += [response.choices[0].message.model_dump(exclude_none=True),
                     {"role": "user", "content": f"Step {k}."}]
    return float(task["reward"])


def plain(task: dict, ctx) -> float:
    """A plain ``def`` agent with the synchronous client."""
    ctx.sync_client.chat.completions.create(model=ctx.model, messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    return 1.0


async def raising(task: dict, ctx) -> float:
    await ctx.client.chat.completions.create(model=ctx.model, messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    raise KeyError("the tool is gone")


async def nan(task: dict, ctx) -> float:
    await ctx.client.chat.completions.create(model=ctx.model, messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    return float("nan")


async def text_reward(task: dict, ctx) -> float:
    await ctx.client.chat.completions.create(model=ctx.model, messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    return "1.0"


async def hanging(task: dict, ctx) -> float:
    await ctx.client.chat.completions.create(model=ctx.model, messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    await asyncio.sleep(3600)
    return 1.0


def hanging_plain(task: dict, ctx) -> float:
    time.sleep(3)
    return 1.0


async def silent(task: dict, ctx) -> float:
    return 1.0


async def by_task(task: dict, ctx) -> float:
    """What ``task["kind"]`` says: one of the agents above."""
    return await {"counting": counting, "raising": raising, "nan": nan}[task["kind"]](task, ctx)


async def planner_executor(task: dict, ctx) -> float:
    """A two-agent system as a user writes it: the planner (``model="planner"``) is called,
    then ``task["hops"]`` executor invocations (``model="executor"``), each of two calls
    that extend their own conversation, then the planner once more, extending its own
    conversation. Returns ``task["reward"]``."""
    plan = [{"role": "user", "content": f"Plan task {task['name']}."}]
    first = await ctx.client.chat.completions.create(model="planner", messages=plan, max_tokens=4)
    plan.append(first.choices[0].message.model_dump(exclude_none=True))
    for hop in range(int(task["hops"])):
        work = [{"role": "user", "content": f"Hop {hop} of {task['name']}."}]
        for k in range(2):
            out = await ctx.client.chat.completions.create(model="executor", messages=work, max_tokens=3)
            work += [out.choices[0].message.model_dump(exclude_none=True), {"role": "user", "content": f"More {k}."}]
        plan.append({"role": "user", "content": f"Hop {hop} done."})
    await ctx.client.chat.completions.create(model="planner", messages=plan, max_tokens=4)
    return float(task["reward"])
