"""A synthetic knowledge base whose questions have verifiable answers (for ``search_qa``).

Invented people, companies, cities and countries, linked by five relations: a person is
*born in* a city (in a year) and *works for* a company; a company is *headquartered in*
a city; a city *lies in* a country; a country has a *capital*. Each entity gets one
passage stating its facts, and questions follow chains of relations: one hop ("In which
city was Mira Tolven born?") to three ("In which country is the headquarters of the
company that Mira Tolven works for?"). The names are made up, so a model cannot answer
from memory and must search; every answer is checked against the facts.

Everything is a function of the seed: ``python -m grpo_lab.envs.search_qa --write DIR``
writes the corpus and the questions as JSONL.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

SYLLABLES = ("ka", "lo", "mir", "ven", "tor", "sa", "bel", "qui", "dra", "no", "fen", "ris", "ul", "mo", "tha",
             "zen", "co", "var", "ely", "pra", "gus", "hal", "ion", "bre", "dun", "ost", "ya", "wen", "lur", "te")
PROFESSIONS = ("engineer", "painter", "chemist", "teacher", "architect", "pilot", "botanist", "composer")
SECTORS = ("shipping", "software", "textiles", "mining", "publishing", "robotics", "insurance", "ceramics")


@dataclass(frozen=True)
class Question:
    """A question, its answer, and how many relations it chains."""

    question: str
    answer: str
    hops: int


@dataclass(frozen=True)
class KnowledgeBase:
    """Passages (``[{"id", "title", "text"}]``) and the questions they answer."""

    passages: tuple[dict, ...]
    questions: tuple[Question, ...]


def _names(rng: random.Random, count: int, parts: tuple[int, int], taken: set[str]) -> list[str]:
    out = []
    while len(out) < count:
        name = "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(*parts))).capitalize()
        if name not in taken and len(name) >= 4:
            taken.add(name)
            out.append(name)
    return out


def build_knowledge_base(seed: int = 0, num_people: int = 40, num_companies: int = 12, num_cities: int = 15,
                         num_countries: int = 5, max_hops: int = 3) -> KnowledgeBase:
    """The knowledge base of ``seed`` (see the module docstring); questions of
    ``1..max_hops`` hops, each answer unique in the facts."""
    if min(num_people, num_companies, num_cities, num_countries) < 1:
        raise ValueError("every entity count must be >= 1")
    if num_cities < num_countries:
        raise ValueError(f"num_cities ({num_cities}) must be >= num_countries ({num_countries}): each country needs a capital")
    if not 1 <= max_hops <= 3:
        raise ValueError(f"max_hops must be 1, 2 or 3, got {max_hops}")
    rng = random.Random(seed)
    taken: set[str] = set()
    countries = _names(rng, num_countries, (2, 3), taken)
    cities = _names(rng, num_cities, (2, 3), taken)
    companies = [f"{n} {rng.choice(('Works', 'Labs', 'Group', 'Holdings'))}" for n in _names(rng, num_companies, (2, 2), taken)]
    firsts = _names(rng, num_people, (2, 2), taken)
    lasts = _names(rng, num_people, (2, 3), taken)
    people = [f"{f} {l}" for f, l in zip(firsts, lasts)]

    country_of = {c: countries[i % num_countries] if i < num_countries else rng.choice(countries) for i, c in enumerate(cities)}
    capital = {k: next(c for c in cities if country_of[c] == k) for k in countries}
    hq = {c: rng.choice(cities) for c in companies}
    sector = {c: rng.choice(SECTORS) for c in companies}
    founded = {c: rng.randint(1890, 2015) for c in companies}
    born_in = {p: rng.choice(cities) for p in people}
    born_year = {p: rng.randint(1940, 2002) for p in people}
    works_for = {p: rng.choice(companies) for p in people}
    profession = {p: rng.choice(PROFESSIONS) for p in people}

    passages = []
    for p in people:
        passages.append((p, f"{p} is a {profession[p]} born in {born_in[p]} in {born_year[p]}. {p} works for {works_for[p]}."))
    for c in companies:
        passages.append((c, f"{c} is a {sector[c]} company founded in {founded[c]}, headquartered in {hq[c]}."))
    for c in cities:
        passages.append((c, f"{c} is a city in {country_of[c]}."))
    for k in countries:
        passages.append((k, f"{k} is a country; its capital is {capital[k]}."))
    rng.shuffle(passages)

    questions = []
    for p in people:
        questions += [Question(f"In which city was {p} born?", born_in[p], 1),
                      Question(f"In which year was {p} born?", str(born_year[p]), 1),
                      Question(f"Which company does {p} work for?", works_for[p], 1)]
        if max_hops >= 2:
            questions += [Question(f"In which country was {p} born?", country_of[born_in[p]], 2),
                          Question(f"In which city is the company that {p} works for headquartered?", hq[works_for[p]], 2)]
        if max_hops >= 3:
            questions.append(Question(f"In which country is the headquarters of the company that {p} works for?",
                                      country_of[hq[works_for[p]]], 3))
    for c in companies:
        questions.append(Question(f"In which city is {c} headquartered?", hq[c], 1))
        if max_hops >= 2:
            questions.append(Question(f"In which country is {c} headquartered?", country_of[hq[c]], 2))
    for c in cities:
        questions.append(Question(f"In which country is {c}?", country_of[c], 1))
    for k in countries:
        questions.append(Question(f"What is the capital of {k}?", capital[k], 1))
    rng.shuffle(questions)
    return KnowledgeBase(
        passages=tuple({"id": i, "title": title, "text": text} for i, (title, text) in enumerate(passages)),
        questions=tuple(questions),
    )
