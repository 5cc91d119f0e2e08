"""The search agent of ``search_agent.py`` written with LangGraph: a prebuilt ReAct graph
over LangChain's ``ChatOpenAI``, pointed at the episode's endpoint. It trains unchanged
(``pip install langgraph langchain-openai``)::

    python -m grpo_lab.train env=agent env.kwargs.entry=examples.agents.langgraph_agent:run \\
        env.kwargs.tasks=examples/agents/search_tasks.jsonl model.name_or_path=Qwen/Qwen2.5-1.5B-Instruct
"""

from __future__ import annotations

from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from langgraph.prebuilt import create_react_agent

from examples.agents.search_agent import MAX_CALLS, SYSTEM, search
from grpo_lab.envs.search_qa import exact_match_score


@tool("search")
def search_tool(query: str) -> str:
    """Search the knowledge base; returns the best matching passages."""
    return search(query)


async def run(task: dict, ctx) -> float:
    """Exact match of the graph's final answer with ``task["answer"]``."""
    model = ChatOpenAI(base_url=ctx.base_url, api_key=ctx.api_key, model=ctx.model, max_retries=0)
    graph = create_react_agent(model, [search_tool], prompt=SYSTEM)
    state = await graph.ainvoke({"messages": [("user", task["question"])]},
                                {"recursion_limit": 2 * MAX_CALLS + 1})
    return exact_match_score(state["messages"][-1].content or "", [task["answer"]])
