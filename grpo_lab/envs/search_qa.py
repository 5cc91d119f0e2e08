"""Question answering with a search tool: the setting of the Tree-GRPO paper (multi-turn).

Each episode asks one question. The agent may write ``<search>query</search>``, and sees
the ``top_k`` passages that BM25 (``bm25s``) ranks highest for the query over a local
corpus; it ends the episode with ``<answer>...</answer>``. Passages that share no term
with the query are not shown. The reward is the exact match of the answer with the gold
answer (SQuAD normalisation: case, punctuation, articles and spacing ignored), or its
token F1 with ``reward="f1"``; ``info`` carries both, and ``won`` is the exact match.

The corpus and questions are a synthetic knowledge base by default
(:mod:`grpo_lab.envs.knowledge`, from ``kb_seed``: single- and multi-hop questions with
verifiable answers, no download), or your own files: ``corpus_path`` (JSONL with a
``text`` field per passage, optionally ``title``) and ``questions_path`` (JSONL with
``question`` and ``answer``, a string or a list of accepted strings).

Departures from the paper's setup (Search-R1's): a BM25 index over a small local corpus
instead of an E5 dense retriever over Wikipedia, and no ``<think>`` block (the tiny
default model has no room for one; a real model may still write text before its tag).

``refine=True`` plays AutoRefine's search-and-refine protocol (Shi et al. 2025, "Search and
Refine During Think"; official code syr-cn/AutoRefine): after each search's passages the
agent writes ``<refine>the evidence that matters</refine>`` before it searches again or
answers (any other action then is invalid), and the observation keeps its refined
evidence. Its reward, as the official ``compute_reward``: the answer's score (exact match,
or F1) when it is positive, else ``retrieval_reward`` (the paper's 0.1) when the refined
evidence holds a gold answer (normalised containment, its ``cover_em``), else 0; the
format bonus the code allows is 0 in the paper's runs and is not built.
``info["rewards"]`` holds ``answer`` and ``retrieval`` (1 when the refined evidence holds
the answer), logged as ``reward/answer`` and ``reward/retrieval``. Every step's
``info["metrics"]`` counts whether it was a search (``searches``), a refine (``refines``)
and a refine block that holds a gold answer (``refines_with_answer``); logged per episode
as ``env/<name>``. Departure, stated: a turn is one action (one tag), so
search, refine and answer are turns of their own, not one generation with documents
inserted.

The anchor is the question and every result list seen so far: ``(question index,
((doc ids of search 1), (doc ids of search 2), ...))``. An answer without a search or
answer element is invalid (the state stays). ``legal_actions()`` returns random searches
and random answers (entity names drawn from the corpus titles, or words of the corpus),
not good ones.
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import re
import string
import sys
from collections import Counter
from pathlib import Path
from typing import Sequence

from .base import Observation, StepResult, TextFormat
from .knowledge import build_knowledge_base

INSTRUCTION = (
    "Answer the question. You can search a knowledge base: write <search>words</search> to see the passages that "
    "match best. When you know the answer, write <answer>short answer</answer>."
)
REFINE_INSTRUCTION = (
    "Answer the question. You can search a knowledge base: write <search>words</search> to see the passages that "
    "match best. After each search, write <refine>the facts that matter</refine>. When you know the answer, write "
    "<answer>short answer</answer>."
)
ACTION_RE = re.compile(r"^<(search|refine|answer)>(.*)</\1>$", re.DOTALL)


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, single spaces."""
    text = str(text).lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match_score(answer: str, golds: Sequence[str]) -> float:
    return float(any(normalize_answer(answer) == normalize_answer(g) for g in golds))


def covers_answer(text: str, golds: Sequence[str]) -> bool:
    """Whether a normalised gold answer occurs in normalised ``text`` (AutoRefine's ``cover_em``)."""
    found = normalize_answer(text)
    return any(normalize_answer(g) in found for g in golds if normalize_answer(g))


def f1_score(answer: str, golds: Sequence[str]) -> float:
    """The best token F1 of ``answer`` against any gold answer (SQuAD's definition)."""
    best = 0.0
    pred = normalize_answer(answer).split()
    for gold in golds:
        ref = normalize_answer(gold).split()
        common = sum((Counter(pred) & Counter(ref)).values())
        if common:
            precision, recall = common / len(pred), common / len(ref)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


def _read_jsonl(path: str, fields: Sequence[str]) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path} line {n}: not JSON ({err})") from None
            missing = [k for k in fields if k not in row]
            if missing:
                raise ValueError(f"{path} line {n}: missing field(s) {missing}")
            rows.append(row)
    if not rows:
        raise ValueError(f"{path} has no rows")
    return rows


def import_bm25s():
    """``bm25s`` on its numpy backend. It imports numba whenever numba is installed (vLLM
    installs it), and numba's llvmlite objects break the scan of ``sys.modules`` that vLLM
    runs when it starts an engine in the same process: numba is hidden while bm25s loads."""
    try:
        if "numba" in sys.modules or "bm25s" in sys.modules:
            import bm25s
        else:
            sys.modules["numba"] = None  # type: ignore[assignment]  # "import numba" raises ImportError
            try:
                import bm25s
            finally:
                del sys.modules["numba"]
    except ImportError as err:
        raise ImportError(f"search_qa needs bm25s ({err}): pip install bm25s") from err
    return bm25s


class SearchIndex:
    """BM25 over passages (``bm25s``, English stop words removed)."""

    def __init__(self, texts: Sequence[str]) -> None:
        self._bm25s = import_bm25s()
        bm25s = self._bm25s
        # numpy, not numba: numba's llvmlite objects break vLLM's scan of sys.modules when both share a process
        self.retriever = bm25s.BM25(backend="numpy")
        self.retriever.index(bm25s.tokenize(list(texts), stopwords="en", show_progress=False), show_progress=False)
        self.size = len(texts)

    def search(self, query: str, k: int) -> list[int]:
        """Ids of the ``k`` best passages with a positive score, best first."""
        tokens = self._bm25s.tokenize([query], stopwords="en", show_progress=False, return_ids=False)
        if not tokens[0]:
            return []
        docs, scores = self.retriever.retrieve(tokens, k=min(k, self.size), show_progress=False, backend_selection="numpy")
        return [int(d) for d, s in zip(docs[0], scores[0]) if s > 0]


@functools.lru_cache(maxsize=4)
def load_knowledge(kb_seed: int, num_people: int, max_hops: int, corpus_path: str | None, questions_path: str | None):
    """(passage texts, questions as (text, (answers...)), index, words for random actions):
    built once per process."""
    if (corpus_path is None) != (questions_path is None):
        raise ValueError("give both corpus_path and questions_path, or neither (the synthetic knowledge base)")
    if corpus_path is None:
        kb = build_knowledge_base(kb_seed, num_people=num_people, max_hops=max_hops)
        passages = [dict(p) for p in kb.passages]
        questions = [(q.question, (q.answer,)) for q in kb.questions]
    else:
        passages = _read_jsonl(corpus_path, ["text"])
        questions = []
        for row in _read_jsonl(questions_path, ["question", "answer"]):
            golds = row["answer"] if isinstance(row["answer"], list) else [row["answer"]]
            questions.append((str(row["question"]), tuple(str(g) for g in golds)))
    texts = [f"{p['title']}: {p['text']}" if p.get("title") and p["title"] not in p["text"] else p["text"]
             for p in passages]
    titles = {p["title"] for p in passages if p.get("title")}
    vocabulary = sorted(titles) or sorted({w for t in texts[:200] for w in t.split()})  # random actions draw from it
    return tuple(texts), tuple(questions), SearchIndex(texts), tuple(vocabulary)


class SearchQAEnv:
    """See the module docstring. One instance runs one episode at a time."""

    instruction = INSTRUCTION
    text_format = TextFormat(tags=("search", "answer"), keep_tags=True)

    def __init__(self, top_k: int = 3, reward: str = "em", kb_seed: int = 0, num_people: int = 40, max_hops: int = 2,
                 corpus_path: str | None = None, questions_path: str | None = None,
                 max_passage_chars: int = 300, refine: bool = False, retrieval_reward: float = 0.0) -> None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if reward not in ("em", "f1"):
            raise ValueError(f"reward must be 'em' or 'f1', got {reward!r}")
        if max_passage_chars < 20:
            raise ValueError(f"max_passage_chars must be >= 20, got {max_passage_chars}")
        if not 0 <= retrieval_reward < 1 or (retrieval_reward and not refine):
            raise ValueError(f"retrieval_reward must be in [0, 1) (below a right answer's reward) and needs refine=true, "
                             f"got {retrieval_reward} with refine={refine}")
        self.refine, self.retrieval_reward = bool(refine), float(retrieval_reward)
        if self.refine:
            self.instruction = REFINE_INSTRUCTION
            self.text_format = TextFormat(tags=("search", "refine", "answer"), keep_tags=True)
        self.refined: list[str] = []
        self.pending = False  # a search's passages wait for their refine
        self.texts, self.questions, self.index, self._vocabulary = load_knowledge(kb_seed, num_people, max_hops, corpus_path,
                                                                         questions_path)
        self.top_k, self.reward, self.max_passage_chars = top_k, reward, max_passage_chars
        self.qid = -1
        self.seed = 0
        self.searches: list[tuple[int, ...]] = []
        self.last = "No search yet."
        self.done = True

    @property
    def question(self) -> str:
        return self.questions[self.qid][0]

    def reset(self, seed: int) -> Observation:
        self.seed = int(seed)
        self.qid = self.seed % len(self.questions)
        self.searches, self.last, self.done = [], "No search yet.", False
        self.refined, self.pending = [], False
        return self._observe()

    def legal_actions(self) -> list[str]:
        self._check_running()
        rng = random.Random(self.seed * 1_000_003 + len(self.searches) + 7 * len(self.refined))
        picks = rng.sample(self._vocabulary, min(4, len(self._vocabulary)))
        if self.pending:
            return [f"<refine>{w}</refine>" for w in picks]
        return [f"<search>{w}</search>" for w in picks[:2]] + [f"<answer>{w}</answer>" for w in picks[2:]]

    def step(self, action: str) -> StepResult:
        self._check_running()
        match = ACTION_RE.match(action.strip())
        kind, text = (match.group(1), match.group(2).strip()) if match else ("", "")
        if not text or (kind == "refine") != self.pending:  # a refine after a search's passages, and only then
            return StepResult(self._observe(), 0.0, False, self._info(valid=False))
        if kind == "refine":
            self.refined.append(text)
            self.pending, self.last = False, "Refined."
            return StepResult(self._observe(), 0.0, False, self._info(refine=text))
        if kind == "search":
            hits = tuple(self.index.search(text, self.top_k))
            self.searches.append(hits)
            if hits:
                shown = [self.texts[d] if len(self.texts[d]) <= self.max_passage_chars
                         else self.texts[d][:self.max_passage_chars] + "..." for d in hits]
                self.last = f"Results for \"{text}\":\n" + "\n".join(f"[{i}] {t}" for i, t in enumerate(shown, 1))
            else:
                self.last = f"Results for \"{text}\": no passage matches."
            self.pending = self.refine
            return StepResult(self._observe(), 0.0, False, self._info(searched=True))
        golds = self.questions[self.qid][1]
        em, f1 = exact_match_score(text, golds), f1_score(text, golds)
        self.done = True
        self.last = f"You answered: {text}"
        score = em if self.reward == "em" else f1
        info = {**self._info(), "won": em == 1.0, "exact_match": em, "f1": f1, "searches": len(self.searches)}
        if self.refine:
            retrieved = float(covers_answer(" ".join(self.refined), golds))
            info["rewards"] = {"answer": score, "retrieval": retrieved}
            score = score if score > 0 else self.retrieval_reward * retrieved
        return StepResult(self._observe(), score, True, info)

    def _info(self, valid: bool = True, searched: bool = False, refine: str | None = None) -> dict:
        """A step's info: validity and this step's counts (``metrics``)."""
        metrics = {"searches": float(searched)}
        if self.refine:
            holds = refine is not None and covers_answer(refine, self.questions[self.qid][1])
            metrics.update(refines=float(refine is not None), refines_with_answer=float(holds))
        return {"won": False, "valid_action": valid, "metrics": metrics}

    def _observe(self) -> Observation:
        if not self.refine:
            return Observation(f"Question: {self.question}\n{self.last}", (self.qid, tuple(self.searches)))
        notes = "\n".join(f"- {r}" for r in self.refined) or "nothing yet"
        return Observation(f"Question: {self.question}\nRefined evidence:\n{notes}\n{self.last}",
                           (self.qid, tuple(self.searches), tuple(self.refined)))

    def _check_running(self) -> None:
        if self.done:
            raise RuntimeError("the episode is over or was never started: call reset(seed) first")


def write_corpus(directory: str, kb_seed: int = 0, num_people: int = 40, max_hops: int = 2) -> tuple[Path, Path]:
    """Write the synthetic knowledge base as ``corpus.jsonl`` and ``questions.jsonl`` in
    ``directory`` (the files ``corpus_path`` and ``questions_path`` read)."""
    kb = build_knowledge_base(kb_seed, num_people=num_people, max_hops=max_hops)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    corpus, questions = out / "corpus.jsonl", out / "questions.jsonl"
    corpus.write_text("".join(json.dumps(p) + "\n" for p in kb.passages), encoding="utf-8")
    questions.write_text("".join(json.dumps({"question": q.question, "answer": q.answer, "hops": q.hops}) + "\n"
                                 for q in kb.questions), encoding="utf-8")
    return corpus, questions


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m grpo_lab.envs.search_qa",
                                     description="Write the synthetic knowledge base of search_qa as JSONL.")
    parser.add_argument("--write", metavar="DIR", required=True, help="directory for corpus.jsonl and questions.jsonl")
    parser.add_argument("--kb-seed", type=int, default=0)
    parser.add_argument("--num-people", type=int, default=40)
    parser.add_argument("--max-hops", type=int, default=2)
    args = parser.parse_args(argv)
    corpus, questions = write_corpus(args.write, args.kb_seed, args.num_people, args.max_hops)
    print(f"wrote {corpus} and {questions}")


if __name__ == "__main__":
    main()
