"""A ``Backend`` on Hugging Face ``generate``, for small models and CPU runs.

It keeps its own copy of the model (like a separate inference engine would), so the
trainer must push weights after each update with :meth:`HFBackend.load_weights`.

Requests with a ``seed`` are sampled by the Gumbel-max trick with one generator per
request (:class:`SeededSampler`): ``argmax(logits / T + Gumbel noise)`` over the top-p
set is an exact sample of the same distribution ``generate`` samples from, and it
depends on the request's seed alone, not on the batch it shares.

Log-probs are those of the distribution sampled from (after temperature and top-p;
:func:`~grpo_lab.rollout.backend.sampling_logprobs`), as vLLM's ``processed_logprobs``.
"""

from __future__ import annotations

import copy
import threading
from typing import Iterable, Sequence

import torch
from torch import Tensor
from transformers import (GenerationConfig, LogitsProcessor, LogitsProcessorList, PreTrainedModel, PreTrainedTokenizerBase,
                          StoppingCriteria, StoppingCriteriaList)

from ...modeling import frozen
from ..backend import BatchStream, Completion, SamplingParams, per_request, sampling_logprobs, top_p_mask


class Interrupted(StoppingCriteria):
    """Ends every row of a ``generate`` once ``event`` is set (a weight swap is waiting
    with ``interrupt``: :meth:`~grpo_lab.endpoint.engine.GenerationQueue.paused`)."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: Tensor, scores: Tensor, **kwargs) -> Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class SeededSampler(LogitsProcessor):
    """Turns greedy decoding into per-row seeded sampling (Gumbel-max).

    Row ``i`` draws its noise from ``torch.Generator().manual_seed(seeds[i])``, one ``[V]``
    draw per generated token, so its tokens depend on its own seed and logits only.
    """

    def __init__(self, seeds: Sequence[int], temperature: float, top_p: float) -> None:
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.temperature, self.top_p = temperature, top_p

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        logits = scores.float() / self.temperature
        logits = logits.masked_fill(top_p_mask(logits, self.top_p), float("-inf"))
        u = torch.stack([torch.rand(logits.shape[-1], generator=g, dtype=torch.float64) for g in self.generators])
        gumbel = -torch.log(-torch.log(u.clamp(min=1e-300)))
        return logits + gumbel.to(device=logits.device, dtype=logits.dtype)


class HFBackend:
    """Batched sampling with ``model.generate`` on left-padded prompts.

    Args:
        model: a causal LM; it is deep-copied unless ``copy_model=False`` (then its
            ``generation_config`` is replaced by a neutral one: sampling here is
            temperature and top-p only, whatever defaults a checkpoint ships).
        tokenizer: its tokenizer (pad and EOS ids, stop-string matching).
        max_batch_size: prompts per ``generate`` call.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        max_batch_size: int = 64,
        copy_model: bool = True,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.model = frozen(copy.deepcopy(model) if copy_model else model)
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if self.pad_id is None:
            raise ValueError("the tokenizer has neither a pad token nor an EOS token")
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        # ``generate`` fills every unset field from the model's generation config and then
        # from global defaults (top_k 50; a checkpoint's repetition_penalty, min_p, ...),
        # which would sample from another distribution than the one the log-probs report:
        # this backend's copy gets a neutral config, and every call sets top_k=0.
        self.model.generation_config = GenerationConfig(eos_token_id=sorted(self.eos_ids) or None, pad_token_id=self.pad_id)
        self._params = dict(self.model.named_parameters(remove_duplicate=False))  # tied aliases too
        self.version: int | None = None  # of the weights loaded last
        self.interrupt = threading.Event()  # set: generation in progress ends now, its answers "abort"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def stream(self) -> BatchStream:
        """A request stream: each step generates everything queued, in batches."""
        return BatchStream(self, self.max_batch_size, padded=True)

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams]) -> list[Completion]:
        """``params`` may differ between prompts (``max_tokens`` capped to the context
        left, seeds): prompts that share all but their seed are generated together, in
        batches of ``max_batch_size``; completions come back in the order of ``prompts``."""
        each = per_request(params, len(prompts))
        by_params: dict[SamplingParams, list[int]] = {}
        for i, sp in enumerate(each):
            by_params.setdefault(sp.with_seed(None), []).append(i)
        out: list[Completion | None] = [None] * len(prompts)
        for idx in by_params.values():
            for start in range(0, len(idx), self.max_batch_size):
                chunk = idx[start:start + self.max_batch_size]
                for i, comp in zip(chunk, self._generate_batch([prompts[i] for i in chunk], [each[i] for i in chunk])):
                    out[i] = comp
        return out  # type: ignore[return-value]

    def _generate_batch(self, prompts: Sequence[Sequence[int]], each: list[SamplingParams]) -> list[Completion]:
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        params = each[0]
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            input_ids[i, width - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
            attention[i, width - len(p) :] = 1
        greedy = params.temperature == 0
        processors = LogitsProcessorList()
        seeded = not greedy and any(sp.seed is not None for sp in each)
        if seeded:  # unseeded rows of a seeded batch draw a seed from the global generator
            seeds = [sp.seed if sp.seed is not None else int(torch.randint(2**62, ())) for sp in each]
            processors.append(SeededSampler(seeds, params.temperature, params.top_p))
        config = GenerationConfig(
            do_sample=not greedy and not seeded,
            temperature=None if greedy or seeded else params.temperature,
            top_p=None if greedy or seeded else params.top_p,
            top_k=0,  # no top-k: the sampled distribution is temperature and top-p only
            max_new_tokens=params.max_tokens,
            pad_token_id=self.pad_id,
            eos_token_id=sorted(self.eos_ids) or None,
            stop_strings=list(params.stop) or None,
            output_logits=True,
            return_dict_in_generate=True,
        )
        result = self.model.generate(
            input_ids=input_ids.to(self.device),
            attention_mask=attention.to(self.device),
            generation_config=config,
            logits_processor=processors,
            stopping_criteria=StoppingCriteriaList([Interrupted(self.interrupt)]),
            tokenizer=self.tokenizer,
        )
        generated = result.sequences[:, width:].cpu()
        logits = torch.stack(result.logits, dim=1).float().cpu()  # [B, L, V], raw (before any processor)
        logprobs = sampling_logprobs(logits, generated, params.temperature, params.top_p)
        completions = []
        for i in range(len(prompts)):
            ids = generated[i].tolist()
            end, reason = self._end_of(ids, params)
            completions.append(
                Completion(
                    token_ids=ids[:end],
                    logprobs=logprobs[i, :end].tolist(),
                    finish_reason=reason,
                    text=self.tokenizer.decode(ids[:end], skip_special_tokens=True),
                    version=self.version,
                )
            )
        return completions

    def _end_of(self, ids: list[int], params: SamplingParams) -> tuple[int, str]:
        """Length of the real completion in ``ids`` (generate pads finished rows) and why
        it ended; ``"abort"``: :attr:`interrupt` cut it short."""
        for k, tok in enumerate(ids):
            if tok in self.eos_ids:
                return k + 1, "stop"
            if params.stop:
                text = self.tokenizer.decode(ids[: k + 1], skip_special_tokens=True)
                if any(s in text for s in params.stop):
                    return k + 1, "stop"
        cut_short = len(ids) < params.max_tokens and self.interrupt.is_set()  # set until its answers are delivered
        return len(ids), "abort" if cut_short else "length"

    @torch.no_grad()
    def load_weights(self, named_tensors: Iterable[tuple[str, Tensor]], version: int | None = None) -> None:
        """Copy tensors into the parameters of the same names; unknown names raise. The
        completions generated after carry ``version``."""
        for name, tensor in named_tensors:
            if name not in self._params:
                raise KeyError(f"backend model has no parameter {name!r}")
            target = self._params[name]
            if target.shape != tensor.shape:
                raise ValueError(f"parameter {name!r}: shape {tuple(tensor.shape)} does not match {tuple(target.shape)}")
            target.copy_(tensor.detach().to(device=target.device, dtype=target.dtype))
        self.version = version

    @torch.no_grad()
    def load_adapter(self, tensors: dict[str, Tensor], peft_config, version: int | None = None) -> None:
        """Copy a LoRA adapter into this backend's PEFT model (the trainer's model was a
        PEFT model when the backend copied it; a backend serving a base model, as an
        engine process does, wraps it in ``peft_config`` at the first push); only the adapter's tensors move. The
        completions generated after carry ``version``."""
        from peft import PeftModel, get_peft_model, set_peft_model_state_dict

        if not isinstance(self.model, PeftModel):
            self.model = frozen(get_peft_model(self.model, copy.deepcopy(peft_config)))
            self._params = dict(self.model.named_parameters(remove_duplicate=False))
        result = set_peft_model_state_dict(self.model, tensors)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise KeyError(f"adapter tensors the backend's model does not have: {unexpected[:5]}")
        self.version = version

    def sleep(self) -> None:
        """Nothing to free: ``generate`` keeps no cache between calls."""

    def wake(self) -> None:
        """See :meth:`sleep`."""
