"""The shared-prefix and trie forwards on many model families: exact where they can be, refused with
the model type named where it cannot (never wrong numbers), soft-capped attention
(Gemma2) on every path, and sliding windows accepted only where they mask nothing."""

from __future__ import annotations

import logging
import types

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from grpo_lab.training.forward import response_logprobs
from grpo_lab.training.shared_prefix import enable_shared_prefix, shared_prefix_logprobs
from grpo_lab.training.verify import verify_shared_prefix
from grpo_lab.training.trie import trie_logprobs

VOCAB = 97
BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, pad_token_id=0, bos_token_id=1,
            eos_token_id=2)
SPECIAL = {
    "falcon": dict(head_dim=None),
    "deepseek_v3": dict(head_dim=None, num_key_value_heads=4, kv_lora_rank=32, q_lora_rank=48, qk_nope_head_dim=16,
                        qk_rope_head_dim=8, v_head_dim=16),
    "gpt_oss": dict(head_dim=None),
    "gemma2": dict(attn_logit_softcapping=1.0),  # a cap small enough to matter
}
# exact in float64 (norms that upcast to float32 leave ~1e-8 of rounding in the gradients)
FLOAT64 = ["qwen2", "qwen3", "llama", "mistral", "phi3", "phi", "olmo", "olmo2", "olmo3", "granite", "starcoder2",
           "gpt_neox", "glm", "glm4", "helium", "smollm3", "exaone4", "ernie4_5", "seed_oss", "arcee", "apertus",
           "hunyuan_v1_dense", "bitnet", "persimmon", "jetmoe", "opt", "gpt2", "lfm2", "gemma", "gemma2", "gemma3_text",
           "cohere", "cohere2", "deepseek_v3"]
FLOAT32 = ["mixtral", "qwen2_moe", "qwen3_moe", "granitemoe"]  # grouped matmuls of MoE layers have no float64
# refused when enabled: attention outside transformers' registry, or token mixers outside attention
REFUSED_AT_ENABLE = ["stablelm", "falcon", "bloom", "mpt", "gptj", "codegen", "falcon_h1", "jamba", "qwen3_next"]
# refused at the forward: decoder layers that drop the layout (nemotron), linear-attention layers (minimax),
# attention sinks (gpt_oss)
REFUSED_AT_FORWARD = ["nemotron", "minimax", "gpt_oss"]


def _full_precision_rms_norm(self, hidden_states):
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def build(arch: str, dtype: torch.dtype = torch.float64, **extra):
    kwargs = {**BASE, **SPECIAL.get(arch, {}), **extra}
    config = AutoConfig.for_model(arch, **{k: v for k, v in kwargs.items() if v is not None})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if dtype == torch.float64:  # see tests/test_shared_prefix.py: stock RMSNorms round to float32
        for module in model.modules():
            if type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon"):
                module.forward = types.MethodType(_full_precision_rms_norm, module)
    return model.eval()


def rows(prefix_len: int = 30):
    g = torch.Generator().manual_seed(1)
    prefix = torch.randint(3, VOCAB, (prefix_len,), generator=g)
    prompts = [prefix] * 3 + [torch.cat([prefix, torch.tensor([5, 6])]), torch.randint(3, VOCAB, (7,), generator=g)]
    responses = [torch.randint(3, VOCAB, (n,), generator=g) for n in (4, 2, 6, 3, 5)]
    return prompts, responses


def logprobs_and_grads(model, prompts, responses, packed: bool | str, attention: str = "reference"):
    model.zero_grad(set_to_none=True)
    if packed == "trie":
        lp, mask, _ = trie_logprobs(model, prompts, responses, attention=attention)
    elif packed:
        lp, mask, _ = shared_prefix_logprobs(model, prompts, responses, groups=[[0, 1, 2, 3], [4]], attention=attention)
    else:
        lp, mask, _ = response_logprobs(model, prompts, responses)
    (lp * mask).sum().backward()
    return lp.detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@pytest.fixture(autouse=True)
def _quiet():
    level = logging.getLogger("transformers").level
    logging.getLogger("transformers").setLevel(logging.ERROR)
    yield
    logging.getLogger("transformers").setLevel(level)


@pytest.mark.parametrize("arch, dtype", [(a, torch.float64) for a in FLOAT64] + [(a, torch.float32) for a in FLOAT32])
def test_family_is_exact(arch, dtype):
    model = enable_shared_prefix(build(arch, dtype))
    prompts, responses = rows()
    plain = logprobs_and_grads(model, prompts, responses, packed=False)
    lp_tol, grad_tol = (1e-12, 1e-6) if dtype == torch.float64 else (2e-6, 2e-5)
    for mode in (True, "trie"):  # Prefix Grouper's layout, and the trie
        packed = logprobs_and_grads(model, prompts, responses, packed=mode)
        assert float((plain[0] - packed[0]).abs().max()) < lp_tol, (arch, mode)
        assert float((plain[1] - packed[1]).norm() / plain[1].norm()) < grad_tol, (arch, mode)
    bounds = dict(max_row=BASE["max_position_embeddings"], max_packed=64 * BASE["max_position_embeddings"])
    verify_shared_prefix(model, **bounds)  # the trainer's probes accept it, at the lengths a run may pack
    verify_shared_prefix(model, mode="trie", **bounds)


@pytest.mark.parametrize("arch", REFUSED_AT_ENABLE)
def test_family_is_refused_when_enabled(arch):
    with pytest.raises(NotImplementedError, match=f"'{arch}' model.*trainer.packing=none"):
        enable_shared_prefix(build(arch, torch.float32))


@pytest.mark.parametrize("arch", REFUSED_AT_FORWARD)
def test_family_is_refused_at_the_forward_and_by_the_probe(arch):
    model = enable_shared_prefix(build(arch, torch.float32))
    prompts, responses = rows()
    with pytest.raises(NotImplementedError, match="trainer.packing=none|another attention implementation"):
        shared_prefix_logprobs(model, prompts, responses)
    with pytest.raises(NotImplementedError):
        verify_shared_prefix(model)


def test_a_decoder_that_drops_the_layout_is_caught_even_if_it_claims_support():
    """StableLM's decoder layers call attention without the keyword arguments; with its
    registry flag forced on, the receipt (not the flag) is what refuses it."""
    model = build("stablelm", torch.float32)
    model._supports_attention_backend = True
    enable_shared_prefix(model)
    prompts, responses = rows()
    with pytest.raises(NotImplementedError, match="'stablelm'.*0 of 2 layers got the packed layout"):
        shared_prefix_logprobs(model, prompts, responses)


def test_gemma2_soft_cap_matches_eager_attention_grouped_or_not():
    """The model's own eager attention applies the cap; the ordinary (ungrouped) path and the
    packed path through grpo_lab's attention both match it, so whether rows are grouped
    never changes the numbers. (Eager attention takes its softmax in float32, hence 1e-6.)"""
    eager = build("gemma2", attn_implementation="eager")
    with torch.no_grad():  # random init gives logits far below the cap of 1: scale them up to where it bites
        for name, p in eager.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(20)
    ours = enable_shared_prefix(build("gemma2"))
    ours.load_state_dict(eager.state_dict())
    prompts, responses = rows()
    truth = logprobs_and_grads(eager, prompts, responses, packed=False)
    for packed in (False, True):
        got = logprobs_and_grads(ours, prompts, responses, packed=packed)
        assert float((truth[0] - got[0]).abs().max()) < 1e-6, packed
        assert float((truth[1] - got[1]).norm() / truth[1].norm()) < 1e-6, packed
    uncapped = build("gemma2", attn_logit_softcapping=None, attn_implementation="eager")
    uncapped.load_state_dict(eager.state_dict())
    assert float((truth[0] - logprobs_and_grads(uncapped, prompts, responses, False)[0]).abs().max()) > 1e-2


def test_gemma2_soft_cap_through_the_kernel_in_the_interpreter():
    pytest.importorskip("triton")
    model = enable_shared_prefix(build("gemma2", torch.float32))
    prompts, responses = rows()
    plain = logprobs_and_grads(model, prompts, responses, packed=False)
    kernel = logprobs_and_grads(model, prompts, responses, packed=True, attention="triton")
    assert float((plain[0] - kernel[0]).abs().max()) < 1e-4
    assert float((plain[1] - kernel[1]).norm() / plain[1].norm()) < 1e-4


def test_sliding_window_is_accepted_when_every_row_fits_and_refused_with_the_lengths():
    prompts, responses = rows(prefix_len=30)  # the longest packed row: 30 + 6 = 36 tokens
    fits = enable_shared_prefix(build("mistral", sliding_window=36))
    plain = logprobs_and_grads(fits, prompts, responses, packed=False)
    packed = logprobs_and_grads(fits, prompts, responses, packed=True)
    assert float((plain[0] - packed[0]).abs().max()) < 1e-12
    short = enable_shared_prefix(build("mistral", sliding_window=20))
    with pytest.raises(NotImplementedError, match="is 36 tokens, longer than this layer's sliding window of 20"):
        shared_prefix_logprobs(short, prompts, responses)


def llama4(**extra):
    """A 4-layer Llama-4 text model: layers 0-2 RoPE with chunked attention, layer 3 NoPE
    with the attention temperature; ``floor_scale`` and the chunk small enough for the
    rows here to cross them."""
    settings = dict(num_hidden_layers=4, intermediate_size_mlp=96, floor_scale=8, attn_scale=0.5,
                    attention_chunk_size=16)
    return build("llama4_text", **{**settings, **extra})


def test_llama4_nope_temperature_and_chunked_attention_are_exact_under_the_trie():
    """Llama-4's NoPE layers scale each query by a factor of its index along the sequence
    (past floor_scale), and its RoPE layers attend inside chunks of attention_chunk_size:
    packed, both follow each token's depth, as in the unpacked row (rows of 36 tokens here,
    packed to 94)."""
    model = enable_shared_prefix(llama4())
    assert model.config.layer_types[:3] == ["chunked_attention"] * 3 and model.config.no_rope_layers[3] == 0
    prompts, responses = rows()
    plain = logprobs_and_grads(model, prompts, responses, packed=False)
    packed = logprobs_and_grads(model, prompts, responses, packed="trie")
    assert float((plain[0] - packed[0]).abs().max()) < 1e-12
    assert float((plain[1] - packed[1]).norm() / plain[1].norm()) < 1e-6
    # the group packing takes the temperature too, and refuses rows longer than a chunk by name
    unchunked = enable_shared_prefix(llama4(attention_chunk_size=1000))
    plain = logprobs_and_grads(unchunked, prompts, responses, packed=False)
    grouped = logprobs_and_grads(unchunked, prompts, responses, packed=True)
    assert float((plain[0] - grouped[0]).abs().max()) < 1e-12
    with pytest.raises(NotImplementedError, match="36 tokens, longer than this layer's attention_chunk_size of 16"):
        shared_prefix_logprobs(model, prompts, responses)


def test_without_the_temperature_fix_llama4_packed_is_wrong_and_the_probe_catches_it(monkeypatch):
    """The check that the fix is needed: undone, the packed log-probs differ; and the
    trainer's probe, run at the lengths the run packs (past floor_scale), refuses it,
    while a probe bounded below floor_scale has nothing to find."""
    import grpo_lab.training.shared_prefix as sp

    model = enable_shared_prefix(llama4(attn_scale=4.0, attention_chunk_size=1000))
    prompts, responses = rows()
    plain = logprobs_and_grads(model, prompts, responses, packed=False)
    verify_shared_prefix(model, mode="trie", max_row=64, max_packed=4096)
    monkeypatch.setattr(sp, "undo_packed_query_scaling", lambda module, query, layout: query)
    broken = logprobs_and_grads(model, prompts, responses, packed="trie")
    assert float((plain[0] - broken[0]).abs().max()) > 1e-3
    with pytest.raises(NotImplementedError, match="differs from its ordinary forward"):
        verify_shared_prefix(model, mode="trie", max_row=64, max_packed=4096)
    verify_shared_prefix(model, mode="trie", max_row=4, max_packed=8)  # the run cannot pack past floor_scale


def test_the_probe_refuses_a_packing_that_cannot_apply_a_window_the_run_reaches():
    """Rows of the run may be longer than the sliding window (or chunk): the probe crosses
    it, and the group packing is refused at start naming the setting; the trie applies
    the window by depth and is accepted. Rows that cannot reach it leave both accepted."""
    model = enable_shared_prefix(build("mistral", sliding_window=20))
    with pytest.raises(NotImplementedError, match="sliding window of 20"):
        verify_shared_prefix(model, mode="group", max_row=64, max_packed=64 * 64)
    verify_shared_prefix(model, mode="trie", max_row=64, max_packed=64 * 64)
    verify_shared_prefix(model, mode="group", max_row=20, max_packed=64 * 20)
    with pytest.raises(NotImplementedError, match="attention_chunk_size of 16"):
        verify_shared_prefix(enable_shared_prefix(llama4()), mode="group", max_row=64, max_packed=64 * 64)


def test_the_trie_applies_a_sliding_window_by_depth():
    prompts, responses = rows(prefix_len=30)  # rows of up to 36 tokens
    model = enable_shared_prefix(build("mistral", sliding_window=20))
    plain = logprobs_and_grads(model, prompts, responses, packed=False)
    packed = logprobs_and_grads(model, prompts, responses, packed="trie")
    assert float((plain[0] - packed[0]).abs().max()) < 1e-12
    assert float((plain[1] - packed[1]).norm() / plain[1].norm()) < 1e-6
