"""The shared-prefix forward equals the ordinary forward: log-probs and every parameter's
gradient, for Qwen2, Qwen3 and Llama families with grouped-query attention, in float64
and float32, for G in {1, 2, 4, 8}, prefixes of 1 to 300 tokens, padding, prompts that
differ after a common prefix, and rows that share nothing."""

from __future__ import annotations

import types

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from grpo_lab.training.forward import response_logprobs
from grpo_lab.kernels.layouts import RowLayout
from grpo_lab.kernels.packed import packed_attention_reference
from grpo_lab.training.shared_prefix import (
    common_prefix_length,
    enable_shared_prefix,
    groups_by_prompt,
    shared_prefix_logprobs,
)

VOCAB = 97


def _full_precision_rms_norm(self, hidden_states):
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def tiny(arch: str, dtype: torch.dtype, seed: int = 0):
    """A random tiny model. In float64 its RMSNorms also run in float64: stock
    ``transformers`` norms compute in float32 whatever the model's dtype, and the backward
    of that cast rounds each gradient to float32, so the ordinary forward (G copies of the
    prefix, each rounded) and the shared one (one sum, rounded once) would differ by float32
    rounding (about 1e-7) for reasons that have nothing to do with the packing."""
    config = AutoConfig.for_model(arch, vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if dtype == torch.float64:
        for module in model.modules():
            if type(module).__name__.endswith("RMSNorm"):
                module.forward = types.MethodType(_full_precision_rms_norm, module)
    return enable_shared_prefix(model)


def random_group(gen, prefix_len: int, g: int, suffix_max: int = 0):
    prefix = torch.randint(0, VOCAB, (prefix_len,), generator=gen)
    prompts, responses = [], []
    for _ in range(g):
        suffix = torch.randint(0, VOCAB, (int(torch.randint(0, suffix_max + 1, (1,), generator=gen)),), generator=gen)
        prompts.append(torch.cat([prefix, suffix]))
        responses.append(torch.randint(0, VOCAB, (int(torch.randint(1, 9, (1,), generator=gen)),), generator=gen))
    return prompts, responses


def both_ways(model, prompts, responses, groups):
    weights = torch.randn(len(prompts), max(r.numel() for r in responses), dtype=torch.float64)
    results = []
    for fn in ("plain", "shared"):
        model.zero_grad(set_to_none=True)
        if fn == "plain":
            lp, mask, ent = response_logprobs(model, prompts, responses, with_entropy=True)
        else:
            lp, mask, ent = shared_prefix_logprobs(model, prompts, responses, groups=groups, with_entropy=True)
        (lp.double() * weights * mask.double()).sum().backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        results.append((lp.detach(), mask, ent, grads))
    return results


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "llama"])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("g", [1, 2, 4, 8])
def test_equals_ordinary_forward(arch, dtype, tol, g):
    gen = torch.Generator().manual_seed(hash((arch, g)) % 1000)
    model = tiny(arch, dtype)
    prompts, responses, groups = [], [], []
    # several groups of different prefix lengths in one micro-batch (padding), one with
    # member-specific prompt suffixes
    for prefix_len, suffix_max in ((1, 0), (37, 0), (300, 0), (20, 5)):
        p, r = random_group(gen, prefix_len, g, suffix_max)
        groups.append(list(range(len(prompts), len(prompts) + g)))
        prompts += p
        responses += r
    (lp0, m0, e0, g0), (lp1, m1, e1, g1) = both_ways(model, prompts, responses, groups)
    assert torch.equal(m0, m1)
    assert (lp0 - lp1).abs().max() < tol
    assert (e0 - e1).abs().max() < tol * 10
    for name in g0:
        assert (g0[name] - g1[name]).abs().max() < tol * max(1.0, float(g0[name].abs().max())), name


def test_rows_sharing_nothing_fall_back_and_default_grouping():
    model = tiny("qwen2", torch.float64)
    prompts = [torch.tensor([1, 2, 3]), torch.tensor([4, 5]), torch.tensor([1, 2, 3]), torch.tensor([9])]
    responses = [torch.tensor([7, 8]), torch.tensor([6]), torch.tensor([5, 5, 5]), torch.tensor([3])]
    assert groups_by_prompt(prompts) == [[0, 2], [1], [3]]
    plain = response_logprobs(model, prompts, responses)[0]
    shared = shared_prefix_logprobs(model, prompts, responses)[0]
    assert (plain - shared).abs().max() < 1e-10
    # a group whose prompts share no token goes through the ordinary forward
    shared = shared_prefix_logprobs(model, prompts, responses, groups=[[0, 1, 2, 3]])[0]
    assert (plain - shared).abs().max() < 1e-10


def test_model_still_runs_ordinary_forwards_with_padding_masks():
    model = tiny("llama", torch.float32)
    plain = AutoModelForCausalLM.from_config(model.config, attn_implementation="sdpa", dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    ids = torch.randint(0, VOCAB, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    assert torch.allclose(model(input_ids=ids, attention_mask=mask).logits, plain(input_ids=ids, attention_mask=mask).logits)


def test_packed_attention_matches_a_dense_masked_reference():
    """The packed attention equals softmax attention with the explicit segment mask."""
    gen = torch.Generator().manual_seed(3)
    layout = [RowLayout(3, (2, 4, 1)), RowLayout(5, (3,))]
    length, h, hkv, d = 11, 4, 2, 8
    q = torch.randn(2, h, length, d, generator=gen, dtype=torch.float64)
    k = torch.randn(2, hkv, length, d, generator=gen, dtype=torch.float64)
    v = torch.randn(2, hkv, length, d, generator=gen, dtype=torch.float64)
    out = packed_attention_reference(q, k, v, layout)
    for b, row in enumerate(layout):
        segment = torch.full((length,), -1)
        start = row.prefix_len
        for m, n in enumerate(row.member_lens):
            segment[start:start + n] = m
            start += n
        allowed = torch.zeros(length, length, dtype=torch.bool)
        for i in range(row.length):
            for j in range(i + 1):
                allowed[i, j] = segment[j] == -1 or segment[j] == segment[i]
        kk, vv = k[b].repeat_interleave(2, 0), v[b].repeat_interleave(2, 0)
        scores = (q[b] @ kk.transpose(-1, -2)) / d ** 0.5
        scores = scores.masked_fill(~allowed, float("-inf"))
        dense = torch.softmax(scores[:, : row.length, : row.length], -1) @ vv[:, : row.length]
        assert torch.allclose(out[b, :, : row.length], dense, atol=1e-12)
        assert torch.equal(out[b, :, row.length:], torch.zeros_like(out[b, :, row.length:]))


def test_common_prefix_length():
    assert common_prefix_length([torch.tensor([1, 2, 3]), torch.tensor([1, 2, 4, 5])]) == 2
    assert common_prefix_length([torch.tensor([1, 2]), torch.tensor([1, 2, 3])]) == 2
    assert common_prefix_length([torch.tensor([1]), torch.tensor([2])]) == 0


def test_bad_groups_are_rejected():
    model = tiny("qwen2", torch.float32)
    prompts, responses = [torch.tensor([1, 2])] * 2, [torch.tensor([3])] * 2
    with pytest.raises(ValueError, match="exactly once"):
        shared_prefix_logprobs(model, prompts, responses, groups=[[0]])
    with pytest.raises(ValueError, match="at least one token"):
        shared_prefix_logprobs(model, prompts, [torch.tensor([3]), torch.tensor([], dtype=torch.long)])
