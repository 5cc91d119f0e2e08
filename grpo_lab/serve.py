"""``python -m grpo_lab.serve [overrides]``: the policy behind the OpenAI-compatible
endpoint, alone, so that an agent can be pointed at it and debugged before training.

    python -m grpo_lab.serve model.name_or_path=Qwen/Qwen2.5-0.5B-Instruct rollout.max_new_tokens=512

The overrides are the training run's (``model.*``, ``rollout.*`` for the backend and the
answer budget, ``serve.*`` for the address, key and tool parser). It prints the base URL
and the API key, and serves until interrupted. Calls are answered, not recorded: a
training run opens an episode key per episode and records those.
"""

from __future__ import annotations

import signal
import sys
import threading

from .build import build_backend, build_model, context_length, env_factory_from
from .config import Config, ConfigError
from .endpoint.app import ServeSettings
from .endpoint.server import Endpoint
from .train import compose_config, fail


def start(config: Config) -> Endpoint:
    """The endpoint ``config`` describes, started."""
    import torch

    torch.manual_seed(config.trainer.seed)
    model, tokenizer = build_model(config, env_factory_from(config))
    backend = build_backend(config, model, tokenizer)
    sc, rc = config.serve, config.rollout
    settings = ServeSettings(model=config.served_model_name(), max_tokens=rc.max_new_tokens,
                             max_context=context_length(config, model), temperature=rc.temperature, top_p=rc.top_p,
                             roles=tuple(sc.roles))
    try:
        return Endpoint.start(backend, tokenizer, settings, host=sc.host, port=sc.port, api_key=sc.api_key,
                              tool_parser=sc.tool_parser)
    except RuntimeError as err:
        raise ConfigError(f"serve.port={sc.port}: {err}") from None


def main(argv: list[str] | None = None) -> None:
    try:
        config = compose_config(sys.argv[1:] if argv is None else argv)
        endpoint = start(config)
    except ConfigError as err:
        fail(err)
    settings = endpoint.app.state.settings
    print(f"serving {settings.model!r} at {endpoint.base_url}", flush=True)
    print(f"API key: {endpoint.sessions.run_key}", flush=True)
    print(f"answers of at most {settings.max_tokens} tokens (rollout.max_new_tokens); Ctrl-C stops", flush=True)
    stopped = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopped.set())
    stopped.wait()
    endpoint.stop()


if __name__ == "__main__":
    main()
