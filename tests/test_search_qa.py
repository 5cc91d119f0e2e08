"""search_qa: every generated question is answerable from the corpus by following its
hops, BM25 search shows the matching passages, exact match and F1 as SQuAD defines them,
anchors that are the questions and the results seen, and your own corpus files."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from grpo_lab.envs import make_env
from grpo_lab.envs.knowledge import build_knowledge_base
from grpo_lab.envs.search_qa import SearchQAEnv, exact_match_score, f1_score, normalize_answer, write_corpus


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_every_question_is_answered_by_a_chain_of_passages_of_its_hop_count(seed):
    """Independent of how questions are made: start at the passage of the entity the
    question names, follow passages whose titles the current one mentions, and find the
    answer within ``hops`` passages."""
    kb = build_knowledge_base(seed, max_hops=3)
    by_title = {p["title"]: p["text"] for p in kb.passages}
    titles = sorted(by_title, key=len, reverse=True)
    for q in kb.questions:
        subject = next(t for t in titles if t in q.question)
        frontier = {subject}
        found = False
        for _ in range(q.hops):
            texts = [by_title[t] for t in frontier]
            if any(q.answer in text.replace(f"{t}", "", 1) for t, text in zip(frontier, texts)):
                found = True
                break
            frontier = {t for t in titles for text in texts if t in text} - frontier
        assert found, q
    assert {q.hops for q in kb.questions} == {1, 2, 3}


def test_the_knowledge_base_is_a_function_of_its_seed():
    assert build_knowledge_base(3) == build_knowledge_base(3)
    assert build_knowledge_base(3) != build_knowledge_base(4)


def test_a_search_shows_the_passage_of_the_entity_searched_for():
    env = SearchQAEnv()
    env.reset(0)
    question, (gold,) = env.questions[env.qid]
    result = env.step(f"<search>{question}</search>")
    assert result.info == {"won": False, "valid_action": True, "metrics": {"searches": 1.0}} and not result.done and result.reward == 0.0
    lines = result.observation.text.splitlines()
    assert lines[0] == f"Question: {question}" and lines[1].startswith("Results for")
    assert len(lines) == 2 + env.top_k
    subject = next(t for t in sorted({p for p in env._vocabulary}, key=len, reverse=True) if t in question)
    assert subject in lines[2]  # the best passage is the entity's own


def test_a_query_without_a_known_word_shows_no_passage():
    env = SearchQAEnv()
    env.reset(0)
    result = env.step("<search>zzqx wvvk</search>")
    assert result.observation.text.endswith("no passage matches.") and result.observation.anchor == (env.qid, ((),))


def test_the_answer_ends_the_episode_with_exact_match_or_f1():
    env = SearchQAEnv()
    env.reset(5)
    gold = env.questions[env.qid][1][0]
    won = env.step(f"<answer>the {gold.upper()}!</answer>")
    assert won.done and won.reward == 1.0 and won.info == {"won": True, "valid_action": True, "exact_match": 1.0, "f1": 1.0,
                                                           "searches": 0, "metrics": {"searches": 0.0}}
    f1_env = SearchQAEnv(reward="f1")
    f1_env.reset(5)
    partial = f1_env.step(f"<answer>{gold} city</answer>")
    n = len(gold.split())  # precision n / (n + 1), recall 1
    assert partial.reward == pytest.approx(2 * n / (2 * n + 1)) and not partial.info["won"]


@pytest.mark.parametrize("answer, golds, em, f1", [
    ("The Eiffel Tower", ["eiffel tower"], 1.0, 1.0),
    ("eiffel", ["Eiffel Tower"], 0.0, 2 * (1.0 * 0.5) / 1.5),
    ("tower eiffel tower", ["Eiffel Tower"], 0.0, 2 * (2 / 3 * 1.0) / (2 / 3 + 1.0)),
    ("Paris", ["Lyon", "paris."], 1.0, 1.0),
    ("", ["x"], 0.0, 0.0),
])
def test_squad_exact_match_and_f1(answer, golds, em, f1):
    assert exact_match_score(answer, golds) == em
    assert f1_score(answer, golds) == pytest.approx(f1)


def test_normalisation_drops_case_punctuation_articles_and_spacing():
    assert normalize_answer("  The  Quick, brown fox!") == "quick brown fox"


@pytest.mark.parametrize("action", ["search for X", "<search> </search>", "<lookup>x</lookup>"])
def test_answers_without_a_search_or_answer_element_are_invalid_and_change_nothing(action):
    env = SearchQAEnv()
    before = env.reset(2)
    parsed = env.text_format.parse(action)
    assert parsed is None  # the loop never steps these
    result = env.step(action)
    assert result.info["valid_action"] is False and result.observation == before


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.lists(st.sampled_from(["Fen", "city", "born", "company", "zzz", "Labs"]), max_size=3))
def test_the_same_seed_and_searches_give_the_same_states(seed, queries):
    a, b = make_env("search_qa"), make_env("search_qa")
    assert a.reset(seed) == b.reset(seed)
    for q in queries:
        assert a.step(f"<search>{q}</search>") == b.step(f"<search>{q}</search>")
    assert a.legal_actions() == b.legal_actions()
    assert a._observe().anchor == (a.qid, tuple(a.searches)) and len(a.searches) == len(queries)


def test_legal_actions_are_well_formed_searches_and_answers():
    env = SearchQAEnv()
    env.reset(1)
    actions = env.legal_actions()
    assert [a.split(">")[0] for a in actions] == ["<search", "<search", "<answer", "<answer"]
    assert all(env.text_format.parse(a) == a for a in actions)


def test_your_own_corpus_files_play_like_the_generated_one(tmp_path):
    corpus, questions = write_corpus(str(tmp_path), kb_seed=0)
    generated, own = SearchQAEnv(), SearchQAEnv(corpus_path=str(corpus), questions_path=str(questions))
    for seed in range(5):
        assert generated.reset(seed) == own.reset(seed)
        assert generated.step("<search>Fen city</search>") == own.step("<search>Fen city</search>")
    with pytest.raises(ValueError, match="give both"):
        SearchQAEnv(corpus_path=str(corpus))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q"}\n')
    with pytest.raises(ValueError, match="bad.jsonl line 1: missing field"):
        SearchQAEnv(corpus_path=str(corpus), questions_path=str(bad))


def test_the_corpus_writer_command(tmp_path):
    out = subprocess.run([sys.executable, "-m", "grpo_lab.envs.search_qa", "--write", str(tmp_path / "kb")],
                         capture_output=True, text=True, check=True).stdout
    assert "corpus.jsonl" in out and (tmp_path / "kb" / "questions.jsonl").read_text().count("\n") > 100


def test_the_index_does_not_load_numba_which_would_break_a_vllm_engine_in_the_process():
    code = ("import sys\nfrom grpo_lab.envs import make_env\ne = make_env('search_qa'); e.reset(0); e.step('<search>city</search>')\n"
            "print('llvmlite' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
