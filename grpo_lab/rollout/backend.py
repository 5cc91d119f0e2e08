"""The ``Backend`` protocol: token ids in, token ids and log-probs out.

The trainer and the agent loop speak to a generation engine only through this protocol;
``backends/hf.py`` implements it with Hugging Face ``generate`` and ``backends/vllm.py``
with vLLM. Schedulers that keep requests in flight across calls use a backend's
:class:`RequestStream` (``backend.stream()``): submit requests one by one, and take each
completion as soon as it is finished.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Hashable, Iterable, Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one completion per prompt.

    ``temperature == 0`` means greedy decoding. Every backend reports each token's
    log-prob under the distribution it was sampled from (:func:`sampling_logprobs`):
    the temperature-scaled distribution, restricted to the top-p set and renormalised.
    With ``top_p = 1`` that is what the training forward computes; with ``top_p < 1`` it
    is higher by ``-log`` of the kept mass, and the trainer's importance weights
    (``algo.tis_cap``) then correct for the truncation.

    ``seed`` makes this one request's sample a function of the seed, the prompt and the
    weights alone: it does not change with what else is in the batch, so any schedule of
    the same requests gives the same completions (up to floating-point effects of
    batching on the logits).
    """

    max_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be None or in [0, 2**63), got {self.seed}")

    def with_seed(self, seed: int | None) -> "SamplingParams":
        return replace(self, seed=seed)

    def with_max_tokens(self, max_tokens: int) -> "SamplingParams":
        return replace(self, max_tokens=max_tokens)


def top_p_mask(logits: Tensor, top_p: float) -> Tensor:
    """``[..., V]`` bool, True on the tokens outside the top-p set of each row (the
    smallest set of most likely tokens whose probability reaches ``top_p``; never empty).
    The same set as Hugging Face's ``TopPLogitsWarper`` and vLLM's top-p sampler."""
    if top_p >= 1:
        return torch.zeros_like(logits, dtype=torch.bool)
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits.float(), dim=-1)
    outside_sorted = probs.cumsum(-1) - probs >= top_p  # mass before this token already reaches top_p
    outside_sorted[..., 0] = False
    return torch.zeros_like(outside_sorted).scatter(-1, order, outside_sorted)


def sampling_logprobs(logits: Tensor, tokens: Tensor, temperature: float, top_p: float) -> Tensor:
    """The log-prob of ``tokens`` ``[...]`` under the distribution a sampler with these
    parameters draws from, given raw ``logits`` ``[..., V]``: ``log_softmax`` of
    ``logits / temperature`` over the top-p set (greedy, ``temperature = 0``: the
    untempered distribution). What :attr:`Completion.logprobs` holds."""
    scaled = logits.float() / temperature if temperature > 0 else logits.float()
    if temperature > 0 and top_p < 1:
        scaled = scaled.masked_fill(top_p_mask(scaled, top_p), float("-inf"))
    return torch.log_softmax(scaled, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def per_request(params: "SamplingParams | Sequence[SamplingParams]", n: int) -> list[SamplingParams]:
    """``n`` per-request parameters from one shared value or a list of ``n``."""
    if isinstance(params, SamplingParams):
        return [params] * n
    params = list(params)
    if len(params) != n:
        raise ValueError(f"{len(params)} sampling parameters for {n} prompts")
    return params


class EngineError(RuntimeError):
    """A generation engine in another process that did not answer, or answered an error
    (the run stops at its last checkpoint with this message)."""


@dataclass
class Completion:
    """One generated response: its token ids, the log-prob of each under the distribution
    it was sampled from (:func:`sampling_logprobs`), and why it ended (``"stop"``:
    end-of-sequence token or a stop string; ``"length"``: ``max_tokens``); ``version``:
    the policy version of the weights that generated it, where the backend reports one
    (engines in their own processes do), else ``None``."""

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str = "stop"
    text: str = field(default="", compare=False)
    version: int | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if len(self.token_ids) != len(self.logprobs):
            raise ValueError(f"{len(self.token_ids)} token ids but {len(self.logprobs)} log-probs")


@runtime_checkable
class Backend(Protocol):
    """A generation engine."""

    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams]
    ) -> list[Completion]:
        """One completion for each prompt (token ids), in order; ``params`` is shared or
        one per prompt."""
        ...

    def load_weights(self, named_tensors: Iterable[tuple[str, Tensor]], version: int | None = None) -> None:
        """Copy new weights (names as in the training model) into the engine; ``version``:
        their policy version (the RL steps applied), which a backend that reports versions
        gives every completion generated from them."""
        ...

    def load_adapter(self, tensors: dict[str, Tensor], peft_config, version: int | None = None) -> None:
        """Serve the base model with this LoRA adapter from now on (tensors named as in
        PEFT's ``adapter_model.safetensors``; ``peft_config`` is its ``LoraConfig``), the
        policy ``version`` (see :meth:`load_weights`)."""
        ...

    def sleep(self) -> None:
        """Free generation memory (KV cache) while the trainer updates the weights."""
        ...

    def wake(self) -> None:
        """Undo ``sleep``."""
        ...


@dataclass
class StreamStats:
    """What a :class:`RequestStream` did.

    - ``engine_steps``: calls into the engine that advance generation (a vLLM scheduler
      step; for a batch backend, one ``generate`` call).
    - ``decode_steps``: forward passes that produced tokens (a vLLM step; for a batch
      backend, the longest completion of each ``generate`` batch).
    - ``generated_tokens``: tokens of all completions.
    - ``peak_inflight_tokens``: the most prompt-plus-generated tokens held by requests in
      flight at one time, a proxy for KV-cache (vLLM) or activation (padded batch) memory
      that does not depend on the machine. A padded batch counts its padding.
    - ``peak_inflight_requests``: the most requests in flight at one time.
    """

    engine_steps: int = 0
    decode_steps: int = 0
    generated_tokens: int = 0
    peak_inflight_tokens: int = 0
    peak_inflight_requests: int = 0


@runtime_checkable
class RequestStream(Protocol):
    """Requests in flight inside an engine, answered as they finish."""

    stats: StreamStats

    def submit(self, key: Hashable, prompt: Sequence[int], params: SamplingParams) -> None:
        """Queue one request; ``key`` comes back with its completion."""
        ...

    def step(self) -> list[tuple[Hashable, Completion]]:
        """Advance generation; the requests that finished, with their completions."""
        ...

    def num_unfinished(self) -> int:
        """Requests submitted and not yet returned."""
        ...


class BatchStream:
    """A :class:`RequestStream` over any :class:`Backend`: each ``step`` generates every
    queued request in one ``generate`` call and returns them all.

    A batch backend (Hugging Face ``generate``) cannot admit a request while a batch is
    decoding, so this is the most it can overlap: requests that arrive during a step wait
    for the next one. ``padded``: count a batch's memory as rows x (longest prompt +
    longest completion), as a padded batch holds it; otherwise the sum of real lengths.
    """

    def __init__(self, backend: Backend, max_batch_size: int | None = None, padded: bool = False) -> None:
        self.backend = backend
        self.max_batch_size = max_batch_size
        self.padded = padded  # the backend pads a batch to its longest prompt and completion
        self.stats = StreamStats()
        self._queue: list[tuple[Hashable, list[int], SamplingParams]] = []

    def submit(self, key: Hashable, prompt: Sequence[int], params: SamplingParams) -> None:
        self._queue.append((key, list(prompt), params))

    def num_unfinished(self) -> int:
        return len(self._queue)

    def step(self) -> list[tuple[Hashable, Completion]]:
        queue, self._queue = self._queue, []
        if not queue:
            return []
        width = self.max_batch_size or len(queue)
        out: list[tuple[Hashable, Completion]] = []
        for start in range(0, len(queue), width):
            chunk = queue[start : start + width]
            comps = self.backend.generate([p for _, p, _ in chunk], [sp for _, _, sp in chunk])
            longest = max(len(c.token_ids) for c in comps)
            st = self.stats
            st.engine_steps += 1
            st.decode_steps += longest
            st.generated_tokens += sum(len(c.token_ids) for c in comps)
            if self.padded:
                held = len(chunk) * (max(len(p) for _, p, _ in chunk) + longest)
            else:
                held = sum(len(p) + len(c.token_ids) for (_, p, _), c in zip(chunk, comps))
            st.peak_inflight_tokens = max(st.peak_inflight_tokens, held)
            st.peak_inflight_requests = max(st.peak_inflight_requests, len(chunk))
            out.extend((key, c) for (key, _, _), c in zip(chunk, comps))
        return out
