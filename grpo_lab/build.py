"""Building a run's pieces from its config: the device, the environment factory, the
model and tokenizer, and the rollout backend with its context length."""

from __future__ import annotations

from typing import Callable

import torch

from .config import Config, ConfigError
from .envs import env_options, make_env
from .envs.base import Env
from .modeling import build_tiny_model, load_pretrained, text_config, torch_dtype, train_tokenizer
from .rollout.backends import BACKENDS, EngineSettings
from .rollout.demonstrations import format_demonstrations, prompt_corpus

#: the longest ``rollout.vllm_max_model_len`` taken by default (the KV cache must hold
#: one sequence this long; long-context models would not start at 128k)
DEFAULT_MAX_MODEL_LEN = 8192


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"trainer.device={name!r} but CUDA is not available on this machine")
    return torch.device(name)


def env_factory_from(config: Config) -> Callable[[], Env]:
    """A factory for the configured environment; a bad constructor argument raises a
    ``ConfigError`` naming it (``env.kwargs.KEY``), not the whole ``env.kwargs``."""
    name, kwargs = config.env.name, dict(config.env.kwargs)
    named, takes_any = env_options(name)
    options = [p.name for p in named]
    unknown = [] if takes_any else sorted(set(kwargs) - set(options))
    if unknown:
        raise ConfigError(f"env.kwargs.{unknown[0]} is not an option of env {name!r}"
                          f"{f' (nor are {unknown[1:]})' if len(unknown) > 1 else ''}; its options: {options} "
                          "(python -m grpo_lab.envs --list)")

    def factory() -> Env:
        return make_env(name, **kwargs)

    try:
        factory()
    except (TypeError, ValueError, ImportError, KeyError, FileNotFoundError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        raise ConfigError(f"env={name}: {name_the_option(message, kwargs)}") from err
    return factory


def name_the_option(message: str, kwargs: dict) -> str:
    """An environment's error ``message`` led by the ``env.kwargs`` keys it mentions
    (``env.kwargs.size=1: size must be at least 2``), unless it names them already."""
    import re

    if "env.kwargs." in message:
        return message
    mentioned = [k for k in kwargs if re.search(rf"(?<![\w.]){re.escape(k)}(?!\w)", message)]
    if not mentioned:
        return message
    return ", ".join(f"env.kwargs.{k}={kwargs[k]!r}" for k in mentioned) + f": {message}"


def build_model(config: Config, envs: Callable[[], Env]):
    """``model.name_or_path`` loaded (a hub name or a local directory), or the tiny
    random-weight model with a tokenizer trained on the environment's demonstrations."""
    mc = config.model
    dtype = torch_dtype(mc.dtype)
    if mc.name_or_path:
        return load_pretrained(mc.name_or_path, dtype, mc.trust_remote_code)
    pairs = format_demonstrations(envs, 300, config.env.max_steps, config.rollout.history_window, seed=12345)
    corpus = [prompt + " " + answer for prompt, answer in pairs]
    if not corpus:  # an environment without legal actions: its prompts
        corpus = list(prompt_corpus(envs, 300, seed=12345))
    tokenizer = train_tokenizer(corpus, vocab_size=mc.tokenizer_vocab_size)
    model = build_tiny_model(
        tokenizer,
        architecture=mc.tiny_architecture,
        hidden_size=mc.tiny_hidden_size,
        num_layers=mc.tiny_num_layers,
        num_heads=mc.tiny_num_heads,
        num_kv_heads=mc.tiny_num_kv_heads,
        intermediate_size=mc.tiny_intermediate_size,
        dtype=dtype,
        seed=config.trainer.seed,
    )
    return model, tokenizer


def context_length(config: Config, model: torch.nn.Module) -> int | None:
    """Tokens a prompt and its answer may take together: vLLM's ``max_model_len``, or
    the model's ``max_position_embeddings`` (``None`` when it states none)."""
    if BACKENDS.get(config.rollout.backend).own_context:
        return vllm_max_model_len(config, model)
    positions = getattr(text_config(model), "max_position_embeddings", None)
    return int(positions) if positions else None


def build_backend(config: Config, model: torch.nn.Module, tokenizer, source: str | None = None):
    """The rollout engine ``rollout.backend`` names (:data:`~grpo_lab.rollout.backends.BACKENDS`),
    started from ``model`` (and, for an engine that loads from disk, from
    ``model.name_or_path`` or ``source``, the in-memory model saved)."""
    rc = config.rollout
    spec = BACKENDS.get(rc.backend)
    settings = EngineSettings(
        model, tokenizer, source=config.model.name_or_path or source, dtype=config.model.dtype, seed=config.trainer.seed,
        max_batch_size=rc.max_batch_size, max_model_len=context_length(config, model),
        gpu_memory_utilization=rc.vllm_gpu_memory_utilization, sleep_mode=rc.vllm_sleep_mode,
        enforce_eager=rc.vllm_enforce_eager, tensor_parallel_size=rc.vllm_tensor_parallel_size,
        lora_rank=vllm_lora_rank(config.model.lora_r), request_seeds=rc.request_seeds,
        console_level=config.logger.engine_console_level)
    try:
        return spec.start(settings)
    except ImportError as err:
        raise ConfigError(f"rollout.backend={rc.backend}: {err}") from None


def vllm_max_model_len(config: Config, model: torch.nn.Module) -> int:
    """``rollout.vllm_max_model_len``, or, unset, the model's context length up to
    :data:`DEFAULT_MAX_MODEL_LEN`. A length past the model's positions is refused here,
    before vLLM would fail, unless the model scales its RoPE (then vLLM decides)."""
    configured = config.rollout.vllm_max_model_len
    text = text_config(model)
    positions = getattr(text, "max_position_embeddings", None)
    if configured is None:
        if positions is None:
            raise ConfigError("rollout.vllm_max_model_len=null but the model's config has no max_position_embeddings: "
                              "set rollout.vllm_max_model_len")
        return min(int(positions), DEFAULT_MAX_MODEL_LEN)
    rope = getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None) or {}
    scaled = isinstance(rope, dict) and rope.get("rope_type", rope.get("type", "default")) != "default"
    if positions is not None and configured > positions and not scaled:
        raise ConfigError(f"rollout.vllm_max_model_len={configured} is longer than the model's {positions} positions "
                          f"(max_position_embeddings): set it to at most {positions}, or null for exactly that")
    return configured


def vllm_lora_rank(lora_r: int) -> int | None:
    """vLLM's ``max_lora_rank`` for ``model.lora_r``: the smallest rank it accepts that
    holds it (``None`` without LoRA)."""
    if lora_r <= 0:
        return None
    return next((r for r in (8, 16, 32, 64, 128, 256, 320, 512) if r >= lora_r), lora_r)
