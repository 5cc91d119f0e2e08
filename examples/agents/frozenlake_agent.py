"""A multi-turn agent written with the plain ``openai`` SDK: it keeps its own message
list, asks the model for one move per turn, and plays FrozenLake with the moves.

Train it (tasks: one row per episode seed, ``{"seed": 0}``...)::

    python -m grpo_lab.train env=agent env.kwargs.entry=examples.agents.frozenlake_agent:run \\
        env.kwargs.tasks=examples/agents/frozenlake_tasks.jsonl model.name_or_path=Qwen/Qwen2.5-0.5B-Instruct

Nothing here knows about training: the same function runs against any OpenAI-compatible
server (``python -m grpo_lab.serve``, vLLM, an API).
"""

from __future__ import annotations

from grpo_lab.envs.base import ACTION_FORMAT
from grpo_lab.envs.frozenlake import FrozenLakeEnv

SYSTEM = ("You play FrozenLake on a grid: reach the goal G from your position P without stepping into a hole H. "
          "Answer with one move in action tags: <action>left</action>, <action>down</action>, <action>right</action> "
          "or <action>up</action>.")
MAX_TURNS = 8


async def run(task: dict, ctx) -> float:
    """One episode from ``task["seed"]``: its return (1.0 when the goal is reached)."""
    env = FrozenLakeEnv(**task.get("options", {}))
    obs = env.reset(int(task["seed"]))
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": obs.text}]
    total = 0.0
    for _ in range(MAX_TURNS):
        response = await ctx.client.chat.completions.create(model=ctx.model, messages=messages,
                                                            stop=list(ACTION_FORMAT.stop))
        answer = response.choices[0].message.content or ""
        ctx.anchor(obs.anchor)  # the state this move was chosen in: GiGPO groups equal states
        action = ACTION_FORMAT.parse(answer + ACTION_FORMAT.stop[0])
        messages.append({"role": "assistant", "content": answer})
        if action is None:
            messages.append({"role": "user", "content": "Answer with one move in action tags.\n\n" + obs.text})
            continue
        result = env.step(action)
        total += result.reward
        obs = result.observation
        if result.done:
            break
        messages.append({"role": "user", "content": obs.text})
    env.close()
    return total
