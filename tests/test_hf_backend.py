"""The Hugging Face backend: log-probs equal the training forward, weight updates take
effect, and completions are cut where generation really ended."""

import pytest
import torch

from grpo_lab.rollout import HFBackend, SamplingParams
from grpo_lab.training.forward import response_logprobs


def prompts_of(tokenizer):
    texts = ["Now:\n. P . .\nYour answer:", "Frozen lake", "You are at row 2, column 3. The goal is at row 4"]
    return [tokenizer(t)["input_ids"] for t in texts]  # different lengths: left padding is exercised


def test_rollout_logprobs_match_the_training_forward(tiny_model, tokenizer):
    backend = HFBackend(tiny_model, tokenizer)
    prompts = prompts_of(tokenizer)
    for temperature in (1.0, 0.7):
        comps = backend.generate(prompts, SamplingParams(max_tokens=12, temperature=temperature))
        assert all(len(c.token_ids) > 0 for c in comps)
        logp, mask, _ = response_logprobs(
            tiny_model, [torch.tensor(p) for p in prompts], [torch.tensor(c.token_ids) for c in comps],
            temperature=temperature, pad_id=tokenizer.pad_token_id,
        )
        for i, c in enumerate(comps):
            n = len(c.token_ids)
            assert mask[i, :n].all() and not mask[i, n:].any()
            assert torch.allclose(logp[i, :n], torch.tensor(c.logprobs), atol=1e-4), (i, temperature)


def sampler_reference(model, prompts, completions, temperature, top_p):
    """Per completion: each token's log-prob under the distribution it was sampled from
    (temperature, then the top-p set renormalised), from a plain forward of the model."""
    from grpo_lab.rollout.backend import sampling_logprobs

    out = []
    with torch.no_grad():
        for p, c in zip(prompts, completions):
            ids = torch.tensor(list(p) + list(c.token_ids))
            logits = model(input_ids=ids[None]).logits[0, len(p) - 1: len(ids) - 1]
            out.append(sampling_logprobs(logits, ids[len(p):], temperature, top_p))
    return out


def assert_same_quantity(reference, completions, tol=1e-4, share=0.9):
    """Most tokens agree to ``tol``; every token to 0.05 (a token at the edge of the top-p
    set can flip in or out under last-bit differences of the logits, moving the kept mass
    by its own probability). Before/after top-p differ by -log(kept mass), about 0.3 here."""
    diffs = torch.cat([(r - torch.tensor(c.logprobs)).abs() for r, c in zip(reference, completions)])
    assert float((diffs < tol).float().mean()) >= share, diffs
    assert float(diffs.max()) < 0.05, diffs


@pytest.mark.parametrize("seeded", [False, True])
def test_logprobs_with_top_p_are_those_of_the_sampled_distribution(tiny_model, tokenizer, seeded):
    """With top_p < 1 the log-probs are after temperature and top-p, as vLLM reports them
    (the trainer's forward, without top-p, differs from both by the kept mass)."""
    backend = HFBackend(tiny_model, tokenizer)
    prompts = prompts_of(tokenizer)
    params = SamplingParams(max_tokens=12, temperature=0.8, top_p=0.7, seed=11 if seeded else None)
    comps = backend.generate(prompts, params)
    reference = sampler_reference(tiny_model, prompts, comps, 0.8, 0.7)
    assert_same_quantity(reference, comps)
    untruncated = sampler_reference(tiny_model, prompts, comps, 0.8, 1.0)
    assert all(bool((torch.tensor(c.logprobs) - u > 0.05).all()) for c, u in zip(comps, untruncated))


def test_checkpoint_generation_defaults_do_not_change_what_is_sampled(tiny_model, tokenizer):
    """A checkpoint's generation config (here top_k 5 and a repetition penalty of 100) and
    transformers' global default top_k of 50 must not act: greedy decoding is the argmax
    of the model's raw logits, and sampling reaches tokens outside the top 50."""
    tiny_model.generation_config.top_k = 5
    tiny_model.generation_config.repetition_penalty = 100.0
    backend = HFBackend(tiny_model, tokenizer)
    prompts = prompts_of(tokenizer)
    for c, p in zip(backend.generate(prompts, SamplingParams(max_tokens=6, temperature=0.0)), prompts):
        ids = list(p)
        for tok in c.token_ids:
            with torch.no_grad():
                assert tok == int(tiny_model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            ids.append(tok)
    ranks = []
    for seed in (None, 3):  # generate's own sampler and the seeded one
        comps = backend.generate(prompts * 8, SamplingParams(max_tokens=8, temperature=1.0, seed=seed))
        for c, p in zip(comps, prompts * 8):
            ids = list(p)
            for tok in c.token_ids:
                with torch.no_grad():
                    logits = tiny_model(input_ids=torch.tensor([ids])).logits[0, -1]
                ranks.append(int((logits > logits[tok]).sum()))
                ids.append(tok)
        assert max(ranks) >= 50, seed  # the random model's distribution is flat: most draws fall past the top 50


def test_greedy_is_deterministic_and_reports_length(tiny_model, tokenizer):
    backend = HFBackend(tiny_model, tokenizer)
    params = SamplingParams(max_tokens=5, temperature=0.0)
    a = backend.generate(prompts_of(tokenizer), params)
    b = backend.generate(prompts_of(tokenizer), params)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    eos = tokenizer.eos_token_id
    for c in a:
        assert c.finish_reason == ("stop" if c.token_ids[-1] == eos else "length")
        assert all(lp <= 0 for lp in c.logprobs)


def test_weight_update_changes_the_next_generation(tiny_model, tokenizer):
    backend = HFBackend(tiny_model, tokenizer)
    params = SamplingParams(max_tokens=6, temperature=0.0)
    before = backend.generate(prompts_of(tokenizer), params)
    # the backend holds its own copy: changing the trainer's model alone changes nothing
    with torch.no_grad():
        for p in tiny_model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    assert [c.token_ids for c in backend.generate(prompts_of(tokenizer), params)] == [c.token_ids for c in before]
    backend.load_weights(tiny_model.named_parameters())
    after = backend.generate(prompts_of(tokenizer), params)
    assert [c.logprobs for c in after] != [c.logprobs for c in before]
    for name, p in tiny_model.named_parameters():
        assert torch.equal(backend.model.get_parameter(name), p)


def test_load_weights_rejects_unknown_names_and_shapes(tiny_model, tokenizer):
    backend = HFBackend(tiny_model, tokenizer)
    with pytest.raises(KeyError, match="no_such"):
        backend.load_weights([("no_such.weight", torch.zeros(1))])
    name, p = next(iter(tiny_model.named_parameters()))
    with pytest.raises(ValueError, match="shape"):
        backend.load_weights([(name, torch.zeros(p.shape[0] + 1))])


def test_tied_lm_head_alias_is_accepted(tiny_model, tokenizer):
    backend = HFBackend(tiny_model, tokenizer)
    state = dict(tiny_model.state_dict())
    assert "lm_head.weight" in state  # tied to the embedding
    backend.load_weights(state.items())


def test_completion_is_cut_after_the_stop_string(tiny_model, tokenizer):
    backend = HFBackend(tiny_model, tokenizer)
    ids = tokenizer("<action>up</action> trailing words", add_special_tokens=False)["input_ids"]
    end, reason = backend._end_of(ids, SamplingParams(stop=("</action>",)))
    assert tokenizer.decode(ids[:end]) == "<action>up</action>" and reason == "stop"
    end, reason = backend._end_of(ids, SamplingParams())
    assert end == len(ids) and reason == "length"
    with_eos = ids[:3] + [tokenizer.eos_token_id] + ids[3:]
    assert backend._end_of(with_eos, SamplingParams()) == (4, "stop")


@pytest.mark.parametrize("kwargs, match", [({"max_tokens": 0}, "max_tokens"), ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p")])
def test_sampling_params_validate(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_top_p_mask_keeps_the_smallest_set_reaching_p():
    from grpo_lab.rollout.backends.hf import top_p_mask

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]]))
    assert top_p_mask(logits, 0.7).tolist() == [[False, False, True, True], [True, True, False, False]]
    assert top_p_mask(logits, 0.8).tolist() == [[False, False, True, True], [True, True, False, False]]
    assert top_p_mask(logits, 0.81).tolist() == [[False, False, False, True], [True, False, False, False]]
    assert not top_p_mask(logits, 1.0).any()
    assert top_p_mask(logits, 0.01).sum(-1).tolist() == [3, 3]  # the top token always stays


def test_seeded_sampler_samples_the_tempered_distribution():
    """Property: Gumbel-max over logits / T draws tokens with frequencies softmax(logits / T)."""
    from grpo_lab.rollout.backends.hf import SeededSampler

    logits = torch.tensor([[1.0, 0.0, -1.0, 0.5]])
    counts = torch.zeros(4)
    sampler = SeededSampler([123], temperature=0.8, top_p=1.0)
    for _ in range(20000):
        counts[int(sampler(None, logits).argmax())] += 1
    assert (counts / counts.sum() - torch.softmax(logits[0] / 0.8, -1)).abs().max() < 0.012


def test_seeded_requests_do_not_depend_on_their_batch(tiny_model, tokenizer):
    """Property: a seeded request gives the same completion alone or beside others; two
    seeds give different completions."""
    backend = HFBackend(tiny_model, tokenizer)
    prompts = [tokenizer(t)["input_ids"] for t in ("Frozen lake: reach G", "row 2", "Now: . P")]
    base = SamplingParams(max_tokens=12, temperature=1.0)
    together = backend.generate(prompts, [base.with_seed(s) for s in (5, 6, 7)])
    alone = backend.generate(prompts[1:2], base.with_seed(6))
    assert together[1].token_ids == alone[0].token_ids
    again = backend.generate(prompts[:1], base.with_seed(5))
    other = backend.generate(prompts[:1], base.with_seed(99))
    assert again[0].token_ids == together[0].token_ids and other[0].token_ids != together[0].token_ids
    # requests with their own max_tokens (capped to the context left) keep their order and their cap
    mixed = backend.generate(prompts, [base.with_seed(5), base.with_max_tokens(3).with_seed(6), base.with_seed(7)])
    capped = backend.generate(prompts[1:2], base.with_max_tokens(3).with_seed(6))
    assert [c.token_ids for c in mixed[::2]] == [together[0].token_ids, together[2].token_ids]
    assert mixed[1].token_ids == capped[0].token_ids and len(mixed[1].token_ids) <= 3
