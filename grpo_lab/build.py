"""A run's parts, built from its config: :func:`build_run` turns a validated
:class:`~grpo_lab.config.Config` into :class:`RunParts` (the process group, the
environment pool, the policy and its tokenizer, the packed forward checked against the
plain one, the rollout backend, the optimizer and schedule inside the update, the
samplers and their random generators), so that the trainer receives them and only runs
the loop. Every setting a part cannot take is refused here, as a
:class:`~grpo_lab.errors.ConfigError` naming the key, before a step runs."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from .advantages import AdvantagePipeline
from .config import Config, ConfigError, plays_own_episodes
from .envs import env_options, make_env
from .envs.base import Env
from .modeling import build_tiny_model, load_pretrained, text_config, torch_dtype, train_tokenizer
from .rollout import AgentLoopConfig, LengthPredictor, PromptEncoder, SamplingParams, SchedulerConfig
from .rollout.adaptive import ReuseBuffer
from .rollout.r3 import TaskHistory
from .rollout.backends import BACKENDS, EngineSettings
from .rollout.conversation import TemplateError
from .rollout.demonstrations import format_demonstrations, prompt_corpus
from .rollout.env_pool import EnvRunner, EnvSpec
from .rollout.formats import EPISODE_FORMATS, EpisodeFormat
from .rollout.samplers import RolloutContext, Sampler, get_sampler
from .training.kl_reward import KLInReward
from .training import distributed as dp
from .training.packing import PACKINGS, Packing
from .training.shared_prefix import check_attention_backend, enable_shared_prefix
from .training.update import PolicyUpdate, build_lr_scheduler, build_optimizer, enable_gradient_checkpointing
from .training.verify import verify_shared_prefix

log = logging.getLogger("grpo_lab")


@dataclass
class RunParts:
    """What a run is made of (:func:`build_run`)."""

    config: Config  # validated
    dist: dp.DistContext  # this process's place in the run
    device: torch.device
    output_dir: Path  # rank 0's, the same on every rank
    mixed_precision: str  # no | fp16 | bf16
    envs: EnvRunner  # the environment pool (worker processes with rollout.env_workers > 0)
    model: torch.nn.Module  # the policy (with its LoRA adapter under model.lora_r > 0)
    tokenizer: Any
    pad_id: int
    packing: Packing  # the training forward of the policy, the reference and the old log-probs
    encoder: PromptEncoder
    episode_format: EpisodeFormat
    backend: Any  # a grpo_lab.rollout.Backend: generates with the policy's weights
    advantages: AdvantagePipeline  # the estimator and its modifiers
    policy_update: PolicyUpdate  # the optimizer, its schedule and the objective
    loop: AgentLoopConfig  # how one episode is played
    rollout: RolloutContext  # what the sampler draws with, and its state
    sampler: Sampler
    task_rng: random.Random  # the step's task seeds: the same on every rank, each plays its slice
    eval_seeds: list[int]
    kl_reward: KLInReward | None = None  # algo.kl_reward_coef > 0: the reward's KL penalty and its coefficient

    @property
    def lora(self) -> bool:
        return self.config.model.lora_r > 0

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.policy_update.optimizer

    @property
    def lr_scheduler(self) -> Any:
        return self.policy_update.scheduler

    @property
    def max_context(self) -> int | None:
        """Tokens a prompt and its answer may take together."""
        return self.loop.max_context


def build_run(config: Config, output_dir: str | Path | None = None, model: torch.nn.Module | None = None,
              tokenizer=None) -> RunParts:
    """The parts of the run ``config`` describes, in the order their random draws
    require (the same seed gives the same run).

    Args:
        output_dir: where the run writes (default ``trainer.output_dir``, else ``outputs``).
        model, tokenizer: use these instead of building or loading ``config.model``.
    """
    cfg = config.validate()
    tc = cfg.trainer
    if (model is None) != (tokenizer is None):
        raise ValueError("pass both model and tokenizer, or neither")
    mixed_precision = check_launch(cfg)
    dist, rank_device = dp.init_distributed(tc.strategy, tc.device)
    if dist.rank > 0:  # rank 0 speaks for the run
        log.setLevel(max(log.getEffectiveLevel(), logging.WARNING))
    # rank 0's directory for all (Hydra names one per process, by the second it started)
    out = Path(dp.broadcast_object(dist, str(output_dir or tc.output_dir or "outputs")))
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(tc.seed)
    task_rng = random.Random(tc.seed)
    device = rank_device or resolve_device(tc.device)
    envs = start_envs(cfg)
    try:  # a part that cannot be built stops the environment workers already started
        if model is None:
            model, tokenizer = build_model(cfg, envs)
        model = model.to(device)
        packing = PACKINGS.get(tc.packing)
        if packing.shares_prefixes:
            check_packing(cfg, model, packing)
        source = save_engine_source(cfg, model, tokenizer, out, dist)
        model = adapt_model(cfg, model)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        encoder, episode_format = episode_encoding(cfg, tokenizer)
        backend = build_backend(cfg, model, tokenizer, source, out, dist)  # before sharding: HF copies the model
        if dist.rank > 0:  # ranks sample differently; rank 0 draws as a single process does
            torch.manual_seed(tc.seed + 7919 * dist.rank)
        try:
            train_module = dp.wrap_model(dist, model, device, mixed_precision)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        policy_update = build_update(cfg, train_module, model, packing, pad_id, device, mixed_precision, dist)
        loop = AgentLoopConfig(
            group_size=cfg.algo.group_size, max_steps=cfg.env.max_steps, history_window=cfg.rollout.history_window,
            sampling=SamplingParams(max_tokens=cfg.rollout.max_new_tokens, temperature=cfg.rollout.temperature,
                                    top_p=cfg.rollout.top_p, stop=envs.text_format.stop),
            request_seed=tc.seed if cfg.rollout.request_seeds else None, max_context=context_length(cfg, model),
            overlong=cfg.rollout.overlong_prompt, env_threads=cfg.rollout.env_workers, episode_format=episode_format,
            max_episode_tokens=cfg.rollout.max_episode_tokens)
    except BaseException:
        envs.close()
        raise
    eval_rng = random.Random(tc.seed + 1_000_003)
    rollout = rollout_context(cfg, backend, encoder, envs, loop, dist.rank)
    rollout.episodes = episode_player(cfg, envs, backend, tokenizer, loop)
    return RunParts(
        config=cfg, dist=dist, device=device, output_dir=out, mixed_precision=mixed_precision, envs=envs, model=model,
        tokenizer=tokenizer, pad_id=pad_id, packing=packing, encoder=encoder, episode_format=episode_format,
        backend=backend, advantages=cfg.algo.advantages(), policy_update=policy_update, loop=loop,
        rollout=rollout, sampler=get_sampler(cfg.rollout.sampler),
        task_rng=task_rng, eval_seeds=[eval_rng.randrange(2**31) for _ in range(tc.eval_episodes)],
        kl_reward=cfg.algo.kl_in_reward())


def check_launch(config: Config) -> str:
    """The resolved ``trainer.mixed_precision``; settings that cannot run under this
    launch (mixed precision without float32 master weights; under several processes, a
    split of the tasks that breaks groups, FSDP with LoRA, tensor-parallel engines) are
    refused."""
    tc = config.trainer
    try:
        mixed_precision = dp.resolve_mixed_precision(tc.mixed_precision)
    except ValueError as err:
        raise ConfigError(f"trainer.mixed_precision={tc.mixed_precision!r}: {err}") from None
    if mixed_precision != "no" and config.model.dtype != "float32":
        raise ConfigError(f"trainer.mixed_precision={mixed_precision!r} needs model.dtype=float32 (the master "
                          f"weights), got model.dtype={config.model.dtype!r}")
    world = dp.launched_world_size()
    if world == 1:
        return mixed_precision
    if tc.tasks_per_step % world:
        raise ConfigError(f"trainer.tasks_per_step={tc.tasks_per_step} must be divisible by the {world} processes "
                          "(each rank plays whole groups of an equal share of the step's tasks)")
    if dp.resolve_strategy(tc.strategy, world) == "fsdp" and config.model.lora_r > 0:
        raise ConfigError(f"model.lora_r={config.model.lora_r} with trainer.strategy=fsdp: a LoRA run trains only its "
                          "adapter; use trainer.strategy=ddp")
    if config.rollout.vllm_tensor_parallel_size > 1:
        raise ConfigError(f"rollout.vllm_tensor_parallel_size={config.rollout.vllm_tensor_parallel_size} under {world} "
                          "training processes: each rank runs its own one-GPU engine; tensor-parallel engines are "
                          "supported in single-process runs only")
    return mixed_precision


def start_envs(config: Config) -> EnvRunner:
    """The episodes' environment pool, started (in worker processes with
    ``rollout.env_workers > 0``), after one environment built here has checked
    ``env.kwargs``."""
    env_factory_from(config)  # bad env.kwargs stop here, named
    try:
        envs = EnvRunner(EnvSpec.from_registry(config.env.name, dict(config.env.kwargs)), config.rollout.env_workers,
                         config.env.step_timeout_s)
        envs.start()
    except (ValueError, RuntimeError) as err:
        raise ConfigError(f"rollout.env_workers={config.rollout.env_workers}: {err}") from None
    return envs


def packed_lengths(config: Config, model: torch.nn.Module, packing: Packing) -> tuple[int | None, int | None]:
    """``(longest row, longest packed sequence)`` the update may see (``None``: no
    bound): rows within the context and ``rollout.max_episode_tokens``; a micro-batch of
    ``trainer.micro_batch_size`` of them, or under a prefix-sharing packing
    ``trainer.micro_batch_tokens`` encoded (one row past it goes alone)."""
    bounds = [b for b in (context_length(config, model), config.rollout.max_episode_tokens) if b is not None]
    if not bounds:
        return None, None
    row = min(bounds)
    packed = config.trainer.micro_batch_size * row
    if config.trainer.micro_batch_tokens is not None and packing.shares_prefixes:
        packed = min(packed, max(config.trainer.micro_batch_tokens, row))
    return row, packed


def check_packing(config: Config, model: torch.nn.Module, packing: Packing) -> None:
    """Enable the packed attention on ``model`` and refuse a model the packed forward
    cannot be exact for (:func:`~grpo_lab.training.verify.verify_shared_prefix`), before
    any rollout."""
    tc = config.trainer
    try:
        check_attention_backend(tc.attention_backend)
    except RuntimeError as err:
        raise ConfigError(f"trainer.attention={tc.attention!r}: {err}") from None
    try:
        enable_shared_prefix(model)
        verify_shared_prefix(model, tc.attention_backend, packing, *packed_lengths(config, model, packing))
    except NotImplementedError as err:
        raise ConfigError(f"trainer.packing={tc.packing}: {err}") from None


def save_engine_source(config: Config, model: torch.nn.Module, tokenizer, output_dir: Path,
                       dist: dp.DistContext) -> str | None:
    """Where an engine that loads from disk (vLLM, or engine processes) finds a model built
    in memory: ``initial_model/`` in the run's directory, written by rank 0 (``None`` when
    the engine takes the model in process, or loads ``model.name_or_path``)."""
    rc = config.rollout
    if not (BACKENDS.get(rc.backend).from_disk or rc.engines) or config.model.name_or_path:
        return None
    source = str(output_dir / "initial_model")
    if dist.is_main:
        model.save_pretrained(source)
        tokenizer.save_pretrained(source)
    dp.barrier(dist)
    return source


def adapt_model(config: Config, model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with its LoRA adapter (``model.lora_r > 0``) and gradient checkpointing
    (``trainer.gradient_checkpointing``)."""
    mc = config.model
    if mc.lora_r > 0:
        from .training.lora import apply_lora

        try:
            model = apply_lora(model, mc.lora_r, mc.lora_alpha, mc.lora_dropout, mc.lora_target_modules)
        except ImportError as err:
            raise ConfigError(str(err)) from None
    if config.trainer.gradient_checkpointing:
        try:
            enable_gradient_checkpointing(model)
        except ValueError as err:
            raise ConfigError(f"trainer.gradient_checkpointing=true: {err}") from None
    return model


def episode_encoding(config: Config, tokenizer) -> tuple[PromptEncoder, EpisodeFormat]:
    """The prompt encoder and the episode format, whose chat template is checked now, not
    at the first turn."""
    chat = {"auto": "auto", "true": True, "false": False}[str(config.rollout.use_chat_template).lower()]
    encoder = PromptEncoder(tokenizer, chat, config.rollout.system_prompt)
    episode_format = EPISODE_FORMATS.get(config.rollout.episode_format)
    try:
        episode_format.check(encoder)
    except TemplateError as err:
        raise ConfigError(f"rollout.episode_format={episode_format.name}: {err}") from None
    return encoder, episode_format


def build_update(config: Config, module: torch.nn.Module, model: torch.nn.Module, packing: Packing, pad_id: int,
                 device: torch.device, mixed_precision: str, dist: dp.DistContext) -> PolicyUpdate:
    """The update phase: AdamW over ``model``'s trainable parameters and its schedule,
    the objective ``algo`` names, the forward through ``module`` (the DDP/FSDP wrapping)."""
    tc = config.trainer
    optimizer = build_optimizer(model, tc.lr, tc.weight_decay)
    scheduler = build_lr_scheduler(optimizer, tc.lr_scheduler, tc.lr_warmup_steps, tc.optimizer_steps())
    return PolicyUpdate(
        module, optimizer, scheduler, config.algo.objective(), packing, pad_id, device, epochs=tc.epochs_per_batch,
        minibatches=tc.minibatches_per_epoch, micro_batch_size=tc.micro_batch_size,
        micro_batch_tokens=tc.micro_batch_tokens, max_grad_norm=tc.max_grad_norm,
        max_tokens=config.rollout.max_new_tokens, temperature=config.rollout.temperature,
        attention=tc.attention_backend, seed=tc.seed, mixed_precision=mixed_precision, dist=dist,
        mask_truncated=config.algo.mask_truncated_completions, entropy_control=config.algo.entropy_control())


def episode_player(config: Config, envs: EnvRunner, backend, tokenizer, loop: AgentLoopConfig):
    """What plays the episodes of an environment that plays its own (``env=agent``: a
    user's agent function behind the endpoint), or ``None``: the turn loop plays them."""
    if not plays_own_episodes(config.env.name):
        return None
    from .endpoint.app import ServeSettings

    sc, sampling = config.serve, loop.sampling
    settings = ServeSettings(model=config.served_model_name(), max_tokens=sampling.max_tokens,
                             max_context=loop.max_context, temperature=sampling.temperature, top_p=sampling.top_p,
                             fixed_sampling=True, roles=tuple(sc.roles))
    return envs.spec.make().episode_player(backend, tokenizer, settings, sc.host, sc.tool_parser)


def rollout_context(config: Config, backend, encoder: PromptEncoder, envs: EnvRunner, loop: AgentLoopConfig,
                    rank: int) -> RolloutContext:
    """What the sampler draws with; its random generators are seeded per rank."""
    rc, seed = config.rollout, config.trainer.seed + 104729 * rank
    scheduler = None if rc.scheduler == "full" else SchedulerConfig(
        mode=rc.scheduler, max_inflight=rc.max_inflight, micro_group_size=rc.micro_group_size, order=rc.order,
        env_workers=rc.env_workers)
    return RolloutContext(backend=backend, encoder=encoder, envs=envs, loop=loop, rollout=rc, scheduler=scheduler,
                          length_predictor=LengthPredictor(), reuse_buffer=ReuseBuffer(rc.adaptive.buffer_size,
                                                                                        random.Random(seed + 17)),
                          tree_rng=random.Random(seed + 29),
                          history=TaskHistory(rc.r3.capacity, rc.r3.max_tasks) if rc.sampler == "r3" else None)

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


def build_backend(config: Config, model: torch.nn.Module, tokenizer, source: str | None = None,
                  logs: Path | None = None, dist: dp.DistContext = dp.SINGLE):
    """The rollout engine ``rollout.backend`` names (:data:`~grpo_lab.rollout.backends.BACKENDS`),
    started from ``model`` (and, for an engine that loads from disk, from
    ``model.name_or_path`` or ``source``, the in-memory model saved); engine processes
    write their logs into ``logs``."""
    rc = config.rollout
    if rc.engines or rc.engine_urls:
        return remote_backend(config, source, logs or Path("outputs"), dist)
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


def remote_backend(config: Config, source: str | None, logs: Path, dist: dp.DistContext = dp.SINGLE):
    """Engines in their own processes: ``rollout.engines`` started here (``python -m
    grpo_lab.serve`` on ``model.name_or_path`` or ``source``, each logging to its own file;
    by rank 0 under several trainer processes, which all use them, rank 0 pushing the
    weights), or those at ``rollout.engine_urls``."""
    import secrets
    import sys

    from .rollout.backends.remote import EngineProcesses, RemoteBackend
    from .rollout.backends.weight_stream import address_toward

    rc, mc = config.rollout, config.model
    name = config.served_model_name()
    interrupt, keep_partial = rc.PARTIAL_ROLLOUTS[rc.partial_rollout]
    engines, started = None, None
    if rc.engine_urls:
        started = ("ok", list(rc.engine_urls), rc.engine_api_key)
    elif dist.is_main:
        key = "sk-engine-" + secrets.token_hex(16)
        path = mc.name_or_path or source
        command = [sys.executable, "-m", "grpo_lab.serve", f"model.name_or_path={path}", "serve.port=0",
                   f"serve.api_key={key}", f"serve.model_name={name}", f"rollout.backend={rc.backend}",
                   f"rollout.max_new_tokens={rc.max_new_tokens}", f"model.dtype={mc.dtype}",
                   f"trainer.seed={config.trainer.seed}", f"rollout.max_batch_size={rc.max_batch_size}"]
        if mc.lora_r > 0:  # a vLLM engine starts with LoRA enabled at this rank; an HF engine takes the adapter's config
            command.append(f"model.lora_r={mc.lora_r}")
        try:
            engines = EngineProcesses.start([command] * rc.engines,
                                            [logs / f"engine_{i}.log" for i in range(rc.engines)],
                                            timeout_s=rc.engine_timeout_s)
            started = ("ok", engines.urls, key)
        except RuntimeError as err:
            started = ("error", f"rollout.engines={rc.engines}: {err}", None)
    started = dp.broadcast_object(dist, started)  # rank 0's engines, or its failure, on every rank
    if started[0] == "error":
        raise ConfigError(started[1])
    _, urls, key = started
    share = (lambda obj: dp.broadcast_object(dist, obj)) if dist.enabled else None
    weight_host = rc.weight_host or address_toward(urls[0])
    backend = RemoteBackend(urls, key, name, rc.engine_timeout_s, weight_host=weight_host,
                            max_batch_size=rc.max_batch_size if rc.engines else None, interrupt=interrupt,
                            keep_partial=keep_partial, pusher=dist.is_main, share=share,
                            retain=dist.strategy != "fsdp")
    backend.processes = engines
    return backend


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
