"""The trie-packed forward equals the per-row forward.

- ``build_trie`` (hypothesis): every row reads back its own tokens and positions; the
  packed sequence holds each distinct prefix once; a token attends to exactly the
  tokens whose prefix is a prefix of its own; subtrees are contiguous.
- The PyTorch attention equals SDPA under the dense block mask.
- Log-probs, entropies and every parameter gradient equal the plain forward's, in float64,
  for Qwen2, Qwen3, Llama and NanoChat, on what the pipeline makes: groups, conversation
  episodes of 10 turns from the real agent loop, and tree-sampled batches; through the
  update step (``packing="trie"`` against ``"none"``).
- The Triton kernel, in the interpreter, against the reference on fresh random tries with
  poisoned buffers, and inside a model.
"""

from __future__ import annotations

import random
import types

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoConfig, AutoModelForCausalLM

from grpo_lab.envs import FrozenLakeEnv
from grpo_lab.rollout import AgentLoopConfig, PromptEncoder, SamplingParams
from grpo_lab.rollout.backends.hf import HFBackend
from grpo_lab.rollout.tree import TreeSamplerConfig, sample_trees
from grpo_lab.training.forward import response_logprobs
from grpo_lab.kernels.attention import masked_attention
from grpo_lab.training.shared_prefix import enable_shared_prefix
from grpo_lab.training.verify import verify_shared_prefix
from grpo_lab.kernels.layouts import TrieLayout
from grpo_lab.training.trie import build_trie, trie_logprobs

FAMILIES = ["qwen2", "qwen3", "llama", "nanochat"]


# ----------------------------------------------------------------------------- the trie
@st.composite
def row_sets(draw):
    """Rows over a 3-token alphabet that branch off one another at random depths."""
    rows = [draw(st.lists(st.integers(0, 2), min_size=1, max_size=12))]
    for _ in range(draw(st.integers(0, 7))):
        src = draw(st.sampled_from(rows))
        cut = draw(st.integers(0, len(src)))
        tail = draw(st.lists(st.integers(0, 2), min_size=0 if cut else 1, max_size=8))
        rows.append(src[:cut] + tail)
    return [torch.tensor(r) for r in rows]


@settings(max_examples=200, deadline=None)
@given(row_sets())
def test_trie_holds_every_distinct_prefix_once_and_each_row_reads_itself_back(rows):
    packed = build_trie(rows)
    layout = packed.layout
    for row, index in zip(rows, packed.index):
        assert torch.equal(packed.input_ids[index], row)
        assert torch.equal(packed.positions[index], torch.arange(row.numel()))
    prefixes = {tuple(r[:k].tolist()) for r in rows for k in range(1, r.numel() + 1)}
    assert layout.length == len(prefixes)
    # the packed token at each position is the last token of one distinct prefix
    prefix_of = {}
    for row, index in zip(rows, packed.index):
        for k, at in enumerate(index.tolist()):
            assert prefix_of.setdefault(at, tuple(row[:k + 1].tolist())) == tuple(row[:k + 1].tolist())
    # attention: query i sees key j iff j's prefix is a prefix of i's
    mask = layout.dense_mask()
    for i in range(layout.length):
        for j in range(layout.length):
            a, b = prefix_of[i], prefix_of[j]
            assert bool(mask[i, j]) == (len(b) <= len(a) and a[: len(b)] == b)
    # pre-order: a node's subtree is one contiguous range
    ends = layout.subtree_end()
    for v in range(layout.num_nodes):
        p = layout.parent[v]
        if p >= 0:
            assert layout.node_start[p] < layout.node_start[v] < ends[p] and ends[v] <= ends[p]


def test_a_conversation_chain_and_a_group_make_the_expected_nodes():
    prompt = torch.tensor([1, 2, 3])
    turns = [torch.tensor([1, 2, 3, 4]), torch.tensor([1, 2, 3, 4, 5, 6]), torch.tensor([1, 2, 3, 4, 5, 6, 7])]
    layout = build_trie(turns).layout
    assert layout.node_len == (7,)  # turns that extend one another: one node, no branch
    group = build_trie([torch.cat([prompt, torch.tensor([r])]) for r in (8, 9, 8)]).layout
    assert group.node_len == (3, 1, 1) and group.parent == (-1, 0, 0)  # identical rows share their node


def test_bad_layouts_and_rows_are_named():
    with pytest.raises(ValueError, match="back to back"):
        TrieLayout((0, 5), (3, 2), (-1, 0), (0, 3))
    with pytest.raises(ValueError, match="parent must come before"):
        TrieLayout((0, 3), (3, 2), (1, -1), (0, 0))
    with pytest.raises(ValueError, match=r"at least one token; rows \[1\] are empty"):
        build_trie([torch.tensor([1]), torch.tensor([], dtype=torch.long)])
    with pytest.raises(ValueError, match="no rows"):
        build_trie([])


@settings(max_examples=60, deadline=None)
@given(row_sets(), st.sampled_from([(2, 2), (4, 2)]))
def test_reference_attention_equals_sdpa_under_the_dense_block_mask(rows, heads):
    from grpo_lab.kernels.trie_attention import trie_attention_reference

    layout = build_trie(rows).layout
    h, hkv = heads
    q, k, v = (torch.randn(layout.length, n, 8, dtype=torch.float64) for n in (h, hkv, hkv))
    got = trie_attention_reference(q, k, v, layout)
    kk, vv = (x.repeat_interleave(h // hkv, 1).transpose(0, 1) for x in (k, v))
    want = masked_attention(q.transpose(0, 1), kk, vv, layout.dense_mask()).transpose(0, 1)
    assert torch.allclose(got, want, atol=1e-12)


# ----------------------------------------------------------------------------- models
def _full_precision_rms_norm(self, hidden_states):
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def family_model(arch: str, vocab: int, dtype=torch.float64):
    """A tiny random model of ``arch`` (float64 norms: see tests/test_shared_prefix.py)."""
    config = AutoConfig.for_model(arch, vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                  max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon"):
            module.forward = types.MethodType(_full_precision_rms_norm, module)
        elif type(module).__name__.endswith("RMSNorm") and hasattr(module, "eps"):  # NanoChat's, without a weight
            module.forward = types.MethodType(
                lambda self, x: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps), module)
    return enable_shared_prefix(model)


def both_ways(model, prompts, responses, attention="reference"):
    """(log-probs, entropy, {name: grad}) of the plain and the trie forward, under one
    random weighting of the tokens."""
    weights = torch.randn(len(prompts), max(r.numel() for r in responses), dtype=torch.float64)
    out = []
    for trie in (False, True):
        model.zero_grad(set_to_none=True)
        fn = trie_logprobs if trie else response_logprobs
        kw = {"attention": attention} if trie else {}
        lp, mask, ent = fn(model, prompts, responses, with_entropy=True, entropy_grad=True, **kw)
        ((lp.double() + 0.1 * ent.double()) * weights * mask.double()).sum().backward()
        out.append((lp.detach(), ent.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                                 if p.grad is not None}))
    return out


def assert_same(plain, trie, tol=1e-10):
    (lp0, e0, g0), (lp1, e1, g1) = plain, trie
    assert float((lp0 - lp1).abs().max()) < tol
    assert float((e0 - e1).abs().max()) < tol * 10
    assert g0.keys() == g1.keys()
    for name in g0:
        assert float((g0[name] - g1[name]).abs().max()) < tol * max(1.0, float(g0[name].abs().max())), name


@pytest.fixture(scope="module")
def conversation_rows():
    """Rows of 10-turn conversation episodes from the real loop (2 groups of 2)."""
    from chat_templates import chat_tokenizer

    from grpo_lab.modeling import build_tiny_model
    from grpo_lab.rollout import run_episodes

    tok = chat_tokenizer("chatml")
    sampler = build_tiny_model(tok, hidden_size=64, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64)
    config = AgentLoopConfig(group_size=2, max_steps=10, sampling=SamplingParams(max_tokens=5),
                             episode_format="conversation", request_seed=3)
    batch = run_episodes(HFBackend(sampler, tok), PromptEncoder(tok), FrozenLakeEnv, [11, 12], config)
    assert int(batch.step.max()) == 9
    return len(tok), batch


@pytest.fixture(scope="module")
def tree_rows(tokenizer):
    """Rows of Tree-GRPO trees from the real tree sampler (memory-format prompts)."""
    from grpo_lab.modeling import build_tiny_model

    sampler = build_tiny_model(tokenizer, hidden_size=64, num_layers=1, num_heads=2, num_kv_heads=1,
                               intermediate_size=64)
    config = AgentLoopConfig(max_steps=4, history_window=2, sampling=SamplingParams(max_tokens=5), request_seed=5)
    tree = TreeSamplerConfig(trees_per_prompt=2, rounds=1, nodes_per_round=2)
    batch, _ = sample_trees(HFBackend(sampler, tokenizer), PromptEncoder(tokenizer), FrozenLakeEnv, [1, 2], config,
                            tree, random.Random(0))
    return len(tokenizer), batch


@pytest.fixture(scope="module")
def conversation_tree_rows():
    """Rows of Tree-GRPO trees of conversation episodes (branches continue their
    ancestors' tokens)."""
    from chat_templates import chat_tokenizer

    from grpo_lab.modeling import build_tiny_model

    tok = chat_tokenizer("llama3")
    sampler = build_tiny_model(tok, hidden_size=64, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64)
    config = AgentLoopConfig(max_steps=5, sampling=SamplingParams(max_tokens=5), request_seed=9,
                             episode_format="conversation")
    tree = TreeSamplerConfig(trees_per_prompt=2, rounds=2, nodes_per_round=2)
    batch, _ = sample_trees(HFBackend(sampler, tok), PromptEncoder(tok), FrozenLakeEnv, [3, 4], config, tree,
                            random.Random(1))
    return len(tok), batch


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_conversation_trees_equal_the_plain_forward(arch, conversation_tree_rows):
    vocab, batch = conversation_tree_rows
    packed = build_trie([torch.cat([p, r]) for p, r in zip(batch.prompt_ids, batch.response_ids)])
    assert packed.layout.length * 3 < packed.row_tokens
    assert_same(*both_ways(family_model(arch, vocab), batch.prompt_ids, batch.response_ids))


@pytest.mark.parametrize("arch", FAMILIES)
def test_groups_equal_the_plain_forward(arch):
    gen = torch.Generator().manual_seed(1)
    prompts, responses = [], []
    for prefix_len, g in ((1, 3), (40, 4), (9, 1)):
        prefix = torch.randint(3, 90, (prefix_len,), generator=gen)
        for _ in range(g):
            prompts.append(prefix)
            responses.append(torch.randint(3, 90, (int(torch.randint(1, 7, (1,), generator=gen)),), generator=gen))
    responses[1] = responses[0].clone()  # identical rows read the same positions
    model = family_model(arch, 97)
    assert_same(*both_ways(model, prompts, responses))


@pytest.mark.parametrize("arch", FAMILIES)
def test_conversation_episodes_equal_the_plain_forward(arch, conversation_rows):
    vocab, batch = conversation_rows
    packed = build_trie([torch.cat([p, r]) for p, r in zip(batch.prompt_ids, batch.response_ids)])
    assert packed.layout.length * 4 < packed.row_tokens  # 10 turns share most of their tokens
    assert_same(*both_ways(family_model(arch, vocab), batch.prompt_ids, batch.response_ids))


@pytest.mark.parametrize("arch", FAMILIES)
def test_tree_batches_equal_the_plain_forward(arch, tree_rows):
    vocab, batch = tree_rows
    packed = build_trie([torch.cat([p, r]) for p, r in zip(batch.prompt_ids, batch.response_ids)])
    assert packed.layout.length < packed.row_tokens
    assert_same(*both_ways(family_model(arch, vocab), batch.prompt_ids, batch.response_ids))


def test_update_step_with_trie_packing_gives_the_plain_gradient(conversation_rows):
    """Policy loss, entropy bonus and KL penalty (the reference packed alike)."""
    from grpo_lab.config import AlgoConfig
    from grpo_lab.training.step import policy_gradient_backward

    vocab, batch = conversation_rows
    model = family_model("qwen2", vocab)
    ref = family_model("qwen2", vocab)  # a KL reference that differs from the policy
    with torch.no_grad():
        for p in ref.parameters():
            p.mul_(1.01)
    adv = torch.randn(len(batch), dtype=torch.float64).float()
    algo = AlgoConfig(entropy_coef=0.01, kl_coef=0.1)
    grads = {}
    for mode, micro, tokens in (("none", 64, None), ("trie", 64, None), ("trie", 7, None), ("trie", 64, 300),
                                ("group", 64, None), ("auto", 64, None), ("auto", 3, None)):
        model.zero_grad(set_to_none=True)
        policy_gradient_backward(model, batch, torch.arange(len(batch)), adv, None, algo.objective(), micro_batch_size=micro,
                                 micro_batch_tokens=tokens, max_tokens=5, packing=mode, ref_model=ref)
        grads[(mode, micro, tokens)] = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    base = grads[("none", 64, None)]
    for key, g in grads.items():
        assert float((g - base).abs().max()) < 1e-9 * float(base.abs().max()), key


def test_the_trainer_probe_accepts_the_trie_and_refuses_a_model_that_drops_the_layout():
    model = family_model("qwen2", 97)
    verify_shared_prefix(model, "reference", "trie")
    with pytest.raises(NotImplementedError, match="did not reach every attention layer"):
        nemotron = family_model("nemotron", 97)
        trie_logprobs(nemotron, [torch.tensor([5, 6, 7])] * 2, [torch.tensor([8]), torch.tensor([9, 10])])


# ----------------------------------------------------------------------------- kernel
@pytest.fixture()
def poisoned(monkeypatch):
    """Every buffer the kernel allocates starts as NaN: an element it does not write fails
    (the kernel tests need triton; on a CPU conftest.py has switched on its interpreter)."""
    pytest.importorskip("triton")
    from grpo_lab.kernels import shared_prefix_attention as spa

    monkeypatch.setattr(spa, "alloc", lambda like, shape=None, dtype=None: torch.full(
        shape if shape is not None else like.shape, float("nan"), device=like.device, dtype=dtype or like.dtype))


def random_trie(rng: random.Random):
    base = [rng.randrange(3) for _ in range(rng.randint(1, 40))]
    rows: list[list[int]] = []
    for _ in range(rng.randint(1, 6)):
        src = rng.choice(rows) if rows and rng.random() < 0.7 else base
        cut = rng.randint(0, len(src))
        rows.append(src[:cut] + [rng.randrange(3) for _ in range(rng.randint(0 if cut else 1, 30))])
    return build_trie([torch.tensor(r) for r in rows]).layout


@pytest.mark.parametrize("h, hkv, softcap", [(2, 2, None), (4, 2, None), (2, 1, 2.0)])
def test_kernel_matches_reference_on_fresh_random_tries_in_interpreter(h, hkv, softcap, poisoned):
    from grpo_lab.kernels import trie_attention as ta

    seed = random.SystemRandom().randrange(2**31)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    for _ in range(2):
        layout = random_trie(rng)
        total = layout.length + 3  # tokens past the trie get zeros
        q = torch.randn(total, h, 16, requires_grad=True)
        k, v = (torch.randn(total, hkv, 16, requires_grad=True) for _ in range(2))
        dout = torch.randn(total, h, 16)
        results = []
        for fn in (lambda *a: ta.trie_attention_reference(*a, softcap=softcap),
                   lambda *a: ta.trie_attention(*a, block_m=16, block_n=16, softcap=softcap)):
            out = fn(q, k, v, layout)
            results.append((out.detach(), *torch.autograd.grad(out, (q, k, v), dout)))
        for name, a, b in zip(("out", "dq", "dk", "dv"), *results):
            assert not torch.isnan(b).any(), f"{name}: unwritten elements (seed {seed})"
            assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), (name, float((a - b).abs().max()), seed, layout)


def test_model_forward_through_the_kernel_equals_the_plain_forward(conversation_rows, poisoned):
    vocab, batch = conversation_rows
    model = family_model("qwen2", vocab, torch.float32)
    rows = [i for i in range(len(batch)) if int(batch.group_id[i]) == int(batch.group_id[0])][:12]
    prompts, responses = [batch.prompt_ids[i] for i in rows], [batch.response_ids[i] for i in rows]
    plain, trie = both_ways(model, prompts, responses, attention="triton")
    assert float((plain[0] - trie[0]).abs().max()) < 1e-4
    for name in plain[2]:
        assert float((plain[2][name] - trie[2][name]).abs().max()) < 1e-3 * max(1.0, float(plain[2][name].abs().max()))


def test_micro_batches_cut_by_tokens_count_what_the_trie_adds():
    from types import SimpleNamespace

    from grpo_lab.training.step import split_micro_batches

    t = torch.tensor
    # a conversation's turns (each extends the last), then another episode
    prompts = [t([1, 2, 3]), t([1, 2, 3, 4, 5, 6]), t([1, 2, 3, 4, 5, 6, 7, 8]), t([9, 9])]
    responses = [t([4]), t([7]), t([9]), t([1])]
    batch = SimpleNamespace(prompt_ids=prompts, response_ids=responses)
    rows = torch.arange(4)
    # trie costs: 4, then 3 (7 tokens, 4 shared), then 2 (9, 7 shared), then 3 (shares nothing)
    assert [m.tolist() for m in split_micro_batches(batch, rows, 64, 9, "trie")] == [[0, 1, 2], [3]]
    # row 2 opens a micro-batch with all its 9 tokens (over the budget: alone)
    assert [m.tolist() for m in split_micro_batches(batch, rows, 64, 8, "trie")] == [[0, 1], [2], [3]]
    assert [m.tolist() for m in split_micro_batches(batch, rows, 2, 100, "trie")] == [[0, 1], [2, 3]]
    # per-row costs 4, 7, 9, 3; a row over the budget goes alone
    assert [m.tolist() for m in split_micro_batches(batch, rows, 64, 11, "none")] == [[0, 1], [2], [3]]
    assert [m.tolist() for m in split_micro_batches(batch, rows, 64, 5, "none")] == [[0], [1], [2], [3]]
    assert [m.tolist() for m in split_micro_batches(batch, rows, 3)] == [[0, 1, 2], [3]]
    assert split_micro_batches(batch, rows[:0], 3) == []


def test_old_logprobs_of_several_passes_come_through_the_trie_and_equal_the_plain_ones(conversation_rows):
    from grpo_lab.losses import POLICY_LOSSES, Objective
    from grpo_lab.training.packing import PACKINGS
    from grpo_lab.training.update import PolicyUpdate

    vocab, batch = conversation_rows
    model = family_model("llama", vocab)
    out = {}
    for mode in ("none", "trie", "group", "auto"):
        update = PolicyUpdate(model, torch.optim.SGD(model.parameters(), lr=0.0), None, Objective(POLICY_LOSSES["ppo_clip"]),
                              PACKINGS[mode], 0, torch.device("cpu"), micro_batch_size=16, micro_batch_tokens=500)
        out[mode] = update.logprobs_no_grad(batch)
    for mode in ("trie", "group", "auto"):
        assert [x.shape for x in out["none"]] == [x.shape for x in out[mode]]
        assert max(float((a - b).abs().max()) for a, b in zip(out["none"], out[mode])) < 1e-10, mode


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype, tol", [(torch.float16, 2e-3), (torch.bfloat16, 1.5e-2)])
@pytest.mark.parametrize("d", [64, 128])
def test_kernel_on_gpu_against_a_float64_reference(dtype, tol, d, poisoned):
    """Tries of the sizes training makes (a 1k-token prompt, 8 conversations of 10 turns),
    16-bit inputs, the tuned tile shapes; relative error against float64."""
    from grpo_lab.kernels import trie_attention as ta

    gen = random.Random(d)
    first = [gen.randrange(1000) for _ in range(1024)]
    rows = []
    for _ in range(8):
        ctx = list(first)
        for _ in range(10):
            ans = [gen.randrange(1000) for _ in range(gen.randint(16, 96))]
            rows.append(torch.tensor(ctx + ans))
            ctx += ans + [gen.randrange(1000) for _ in range(gen.randint(32, 128))]
    layout = build_trie(rows).layout
    q = torch.randn(layout.length, 8, d, device="cuda", dtype=dtype, requires_grad=True)
    k, v = (torch.randn(layout.length, 2, d, device="cuda", dtype=dtype, requires_grad=True) for _ in range(2))
    dout = torch.randn_like(q)
    got = ta.trie_attention(q, k, v, layout)
    got_grads = torch.autograd.grad(got, (q, k, v), dout)
    ref_in = [x.detach().double().requires_grad_(True) for x in (q, k, v)]
    ref = ta.trie_attention_reference(*ref_in, layout)
    ref_grads = torch.autograd.grad(ref, ref_in, dout.double())
    for name, a, b in zip(("out", "dq", "dk", "dv"), (ref, *ref_grads), (got, *got_grads)):
        error = float((b.double() - a).norm() / a.norm())
        assert error < tol, (name, error)

