"""The OpenAI-compatible endpoint (``grpo_lab.endpoint``): agents written against the
``openai`` SDK (or any client of that API) call the policy over HTTP, and every call's
tokens are recorded as a training row (:mod:`grpo_lab.endpoint.chat`).

- :mod:`~grpo_lab.endpoint.app`: the ASGI app (FastAPI): ``/v1/models``,
  ``/v1/chat/completions``, ``/v1/completions``; API keys per run and per episode.
- :mod:`~grpo_lab.endpoint.chat`: chat messages to token ids; token capture that reuses a
  previous call's prompt and sampled ids when a call extends its conversation.
- :mod:`~grpo_lab.endpoint.tools`: tool-call parsers (a registry; Hermes-style by default).
- :mod:`~grpo_lab.endpoint.engine`: concurrent requests batched onto one backend.
- :mod:`~grpo_lab.endpoint.server`: the app served by uvicorn in a thread.
- :mod:`~grpo_lab.endpoint.agents`: ``env=agent``, users' agent functions as the episodes of
  a training run (registered here; its web packages load when it is chosen).
"""

from ..envs import register_env

register_env("agent", "grpo_lab.endpoint.agents:AgentTasks")
