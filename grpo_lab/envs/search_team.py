"""Multi-hop question answering by a planner and an executor (two roles, M-GRPO's setting).

The multi-agent form of ``search_qa`` over the same knowledge base (Hong et al. 2025,
"Multi-Agent Deep Research: Training Multi-Agent Systems with M-GRPO": a main agent that
plans and delegates, a sub-agent that searches). Role 0, the **planner**, sees the
question and what the executor found so far; it writes ``<delegate>sub-question</delegate>``
to hand one hop to the executor, or ``<answer>final answer</answer>`` to end the episode.
Role 1, the **executor**, sees only its sub-question and its own search results; it
writes ``<search>words</search>`` (BM25 over the corpus) and ``<answer>hop answer</answer>``,
which returns control to the planner with the hop's answer added to its findings. Each
delegation is one invocation of the executor (``Observation.invocation``).

The reward is the exact match (or token F1, ``reward="f1"``) of the planner's final
answer with the gold answer, on the planner's last row; the executor's rows carry no
reward of their own (their credit is the planner's, as M-GRPO's). An action of the other
role's kind, a delegation past ``max_delegations`` or a search past ``max_searches`` in
one invocation is invalid and leaves the state as it was. The anchor holds the
question, the acting role and invocation, the findings and the invocation's searches.
"""

from __future__ import annotations

import random
import re

from .base import Observation, StepResult, TextFormat
from .search_qa import exact_match_score, f1_score, load_knowledge

PLANNER = ("You lead a research team. Answer the question. Hand one step of the research to your assistant with "
           "<delegate>a simpler question</delegate>; when you know the answer, write <answer>short answer</answer>.")
EXECUTOR = ("You are a research assistant. Answer the given sub-question. Search a knowledge base with "
            "<search>words</search>; when you know the answer, write <answer>short answer</answer>.")
ACTION_RE = re.compile(r"^<(delegate|search|answer)>(.*)</\1>$", re.DOTALL)
PLANNER_ROLE, EXECUTOR_ROLE = 0, 1


class SearchTeamEnv:
    """See the module docstring. One instance runs one episode at a time."""

    instruction = PLANNER
    role_instructions = (PLANNER, EXECUTOR)
    roles = ("planner", "executor")
    text_format = TextFormat(tags=("delegate", "search", "answer"), keep_tags=True)

    def __init__(self, top_k: int = 3, reward: str = "em", kb_seed: int = 0, num_people: int = 40, max_hops: int = 2,
                 max_delegations: int = 3, max_searches: int = 2, max_passage_chars: int = 200) -> None:
        if top_k < 1 or max_delegations < 1 or max_searches < 1:
            raise ValueError(f"top_k, max_delegations and max_searches must be >= 1, got {top_k}, {max_delegations}, "
                             f"{max_searches}")
        if reward not in ("em", "f1"):
            raise ValueError(f"reward must be 'em' or 'f1', got {reward!r}")
        self.texts, self.questions, self.index, self._vocabulary = load_knowledge(kb_seed, num_people, max_hops, None,
                                                                                  None)
        self.top_k, self.reward, self.max_passage_chars = top_k, reward, max_passage_chars
        self.max_delegations, self.max_searches = max_delegations, max_searches
        self.qid, self.seed, self.done = -1, 0, True
        self.findings: list[tuple[str, str]] = []  # (sub-question, the executor's answer)
        self.sub_question: str | None = None  # the executor's, while it acts
        self.searches: list[tuple[int, ...]] = []
        self.last = ""

    @property
    def role(self) -> int:
        return PLANNER_ROLE if self.sub_question is None else EXECUTOR_ROLE

    def reset(self, seed: int) -> Observation:
        self.seed = int(seed)
        self.qid = self.seed % len(self.questions)
        self.findings, self.sub_question, self.searches, self.last, self.done = [], None, [], "", False
        return self._observe()

    def legal_actions(self) -> list[str]:
        if self.done:
            raise RuntimeError("the episode is over or was never started: call reset(seed) first")
        rng = random.Random(self.seed * 1_000_003 + 7919 * len(self.findings) + len(self.searches))
        picks = rng.sample(self._vocabulary, min(4, len(self._vocabulary)))
        answers = [f"<answer>{w}</answer>" for w in picks[2:]]
        if self.role == PLANNER_ROLE:
            more = len(self.findings) < self.max_delegations
            return ([f"<delegate>{w}</delegate>" for w in picks[:2]] if more else []) + answers
        more = len(self.searches) < self.max_searches
        return ([f"<search>{w}</search>" for w in picks[:2]] if more else []) + answers

    def step(self, action: str) -> StepResult:
        if self.done:
            raise RuntimeError("the episode is over or was never started: call reset(seed) first")
        match = ACTION_RE.match(action.strip())
        kind, text = (match.group(1), match.group(2).strip()) if match else ("", "")
        if self.role == PLANNER_ROLE:
            return self._plan(kind, text)
        return self._execute(kind, text)

    def _invalid(self) -> StepResult:
        return StepResult(self._observe(), 0.0, False, {"won": False, "valid_action": False})

    def _plan(self, kind: str, text: str) -> StepResult:
        if not text or kind == "search" or (kind == "delegate" and len(self.findings) >= self.max_delegations):
            return self._invalid()
        if kind == "delegate":
            self.sub_question, self.searches, self.last = text, [], "No search yet."
            return StepResult(self._observe(), 0.0, False, {"won": False, "valid_action": True})
        golds = self.questions[self.qid][1]
        em, f1 = exact_match_score(text, golds), f1_score(text, golds)
        self.done, self.last = True, f"You answered: {text}"
        info = {"won": em == 1.0, "valid_action": True, "exact_match": em, "f1": f1}
        return StepResult(self._observe(), em if self.reward == "em" else f1, True, info)

    def _execute(self, kind: str, text: str) -> StepResult:
        if not text or kind == "delegate" or (kind == "search" and len(self.searches) >= self.max_searches):
            return self._invalid()
        if kind == "search":
            hits = tuple(self.index.search(text, self.top_k))
            self.searches.append(hits)
            shown = [self.texts[d][:self.max_passage_chars] for d in hits]
            self.last = (f"Results for \"{text}\":\n" + "\n".join(f"[{i}] {t}" for i, t in enumerate(shown, 1))
                         if hits else f"Results for \"{text}\": no passage matches.")
            return StepResult(self._observe(), 0.0, False, {"won": False, "valid_action": True})
        self.findings.append((self.sub_question or "", text))
        self.sub_question, self.searches = None, []
        return StepResult(self._observe(), 0.0, False, {"won": False, "valid_action": True})

    def _observe(self) -> Observation:
        question = self.questions[self.qid][0]
        if self.role == EXECUTOR_ROLE:
            return Observation(f"Sub-question: {self.sub_question}\n{self.last}",
                               (self.qid, EXECUTOR_ROLE, len(self.findings), self.sub_question, tuple(self.searches)),
                               role=EXECUTOR_ROLE, invocation=len(self.findings))
        found = "\n".join(f"- {q} -> {a}" for q, a in self.findings) or "nothing yet"
        text = f"Question: {question}\nFindings:\n{found}" + (f"\n{self.last}" if self.done else "")
        return Observation(text, (self.qid, PLANNER_ROLE, tuple(self.findings)), role=PLANNER_ROLE)
