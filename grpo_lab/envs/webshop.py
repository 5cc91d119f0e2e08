"""WebShop (Yao et al., 2022), the shopping task of the GiGPO paper, through its HTTP server.

Start the server first (it needs Java 11 and its product data)::

    git clone https://github.com/princeton-nlp/WebShop && cd WebShop
    ./setup.sh -d small && ./run_dev.sh        # serves http://127.0.0.1:3000

Episode ``seed`` asks for goal ``goal_offset + seed % num_goals`` (the server's fixed
goals, session ``fixed..._<goal>``; verl-agent evaluates on goals 0-499 and trains on the
rest), in a session of its own, so the members of a group never share server state.

The observation is the page as text: the instruction on the first page, then the page's
text with every clickable element in brackets, and the available actions. Actions are
WebShop's: ``search[query]`` on a page with a search bar, and ``click[element]`` for a
button, a product id or an option on the page (case aside). Any other action is invalid
and is not sent. Buying ends the episode; the server's score in [0, 1] is ``info["score"]``
and the reward is verl-agent's, 10 for a full score and 0 otherwise (``reward="score"``:
the score itself). The anchor is the goal and the page: ``(goal, page address without the
session)``, which holds the search words, the page number, the product and the options.

Needs ``pip install 'grpo_lab[webshop]'`` (requests, beautifulsoup4).
"""

from __future__ import annotations

import random
import re
import uuid
from dataclasses import dataclass, field
from typing import Callable
from urllib.parse import quote, urlsplit

from .base import Observation, StepResult

START_SERVER = ("start the WebShop server: git clone https://github.com/princeton-nlp/WebShop && cd WebShop && "
                "./setup.sh -d small && ./run_dev.sh")
INSTRUCTION = (
    "WebShop: buy the product that the instruction describes. Answer with one available action in <action></action>: "
    "search[words] or click[element], for example <action>search[red running shoes]</action>."
)
ACTION_RE = re.compile(r"^(search|click)\[(.+)\]$", re.DOTALL)
ONCLICK_URL = re.compile(r"location\.href\s*=\s*'([^']+)'")
WIN_REWARD = 10.0

#: ``(method, url, form) -> (final url, html)``: the HTTP transport (tests pass a fake one).
Transport = Callable[[str, str, "dict[str, str] | None"], "tuple[str, str]"]


class WebShopUnavailable(ValueError):
    """The WebShop server cannot be reached at the configured address."""


@dataclass
class Page:
    """A WebShop page: its address, its text lines, and where each clickable leads:
    ``clickables[lower-case text] = (method, url)``."""

    url: str
    lines: list[str] = field(default_factory=list)
    clickables: dict[str, tuple[str, str]] = field(default_factory=dict)
    has_search: bool = False
    search_url: str | None = None
    instruction: str | None = None
    score: float | None = None


def parse_page(url: str, html: str) -> Page:
    """The text and the clickables of a WebShop page (its templates' structure: buttons in
    forms, ``a.product-link``, option radios, ``#search_input``, ``#reward pre``)."""
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(html, "html.parser")
    page = Page(url)
    head = soup.select_one("#instruction-text")
    if head is not None:
        text = " ".join(head.get_text(" ").split())
        page.instruction = text.split("Instruction:", 1)[-1].strip()
        head.decompose()
    reward = soup.select_one("#reward pre")
    if reward is not None:
        page.score = float(reward.get_text().strip())
    search = soup.select_one("#search_input")
    if search is not None:
        form = search.find_parent("form")
        page.has_search, page.search_url = True, form.get("action") if form is not None else None
    for tag in soup.find_all(["style", "script", "head", "title", "meta"]):
        tag.decompose()
    for element in soup.find_all(["button", "a", "input", "label"]):
        if element.name == "button":
            form = element.find_parent("form")
            name = element.get_text(" ", strip=True)
            if name.lower() != "search" and form is not None and form.get("action"):
                page.clickables[name.lower()] = (form.get("method", "get").upper(), form["action"])
            element.replace_with(f"[{name}]")
        elif element.name == "a" and "product-link" in (element.get("class") or []):
            name = element.get_text(strip=True)
            page.clickables[name.lower()] = ("GET", element.get("href", ""))
            element.replace_with(f"[{name}]")
        elif element.name == "input" and element.get("type") == "radio":
            target = element.get("data-url") or next(iter(ONCLICK_URL.findall(element.get("onclick", ""))), None)
            if target:
                page.clickables[str(element.get("value", "")).lower()] = ("GET", target)
        elif element.name == "label":
            element.replace_with(f"[{element.get_text(strip=True)}]")
    page.lines = [" ".join(t.split()) for t in soup.get_text("\n").split("\n") if t.strip()]
    return page


def requests_transport(timeout_s: float) -> Transport:
    import requests

    session = requests.Session()

    def send(method: str, url: str, form: dict[str, str] | None) -> tuple[str, str]:
        response = session.request(method, url, data=form, timeout=timeout_s, allow_redirects=True)
        response.raise_for_status()
        return response.url, response.text

    return send


class WebShopEnv:
    """See the module docstring. One instance runs one episode at a time."""

    instruction = INSTRUCTION

    def __init__(self, url: str = "http://127.0.0.1:3000", num_goals: int = 500, goal_offset: int = 0,
                 reward: str = "success", timeout_s: float = 10.0, transport: Transport | None = None) -> None:
        if num_goals < 1 or goal_offset < 0:
            raise ValueError(f"num_goals must be >= 1 and goal_offset >= 0, got {num_goals} and {goal_offset}")
        if reward not in ("success", "score"):
            raise ValueError(f"reward must be 'success' or 'score', got {reward!r}")
        if transport is None:
            try:
                import bs4  # noqa: F401
                import requests  # noqa: F401
            except ImportError as err:
                raise ImportError(f"env=webshop needs {err.name}: pip install 'grpo_lab[webshop]'") from None
            transport = requests_transport(timeout_s)
        self.url, self.num_goals, self.goal_offset, self.reward = url.rstrip("/"), num_goals, goal_offset, reward
        self._send = transport
        self._probe()
        self.goal = -1
        self.session = ""
        self.task = ""
        self.page: Page | None = None
        self.done = True

    def _probe(self) -> None:
        try:
            self._send("GET", f"{self.url}/", None)
        except Exception as err:  # connection refused, timeout, HTTP error
            raise WebShopUnavailable(f"no WebShop server at {self.url} ({type(err).__name__}: {err}); {START_SERVER}, "
                                     "or set env.kwargs.url") from None

    def _go(self, method: str, target: str, form: dict[str, str] | None = None) -> Page:
        url = target if target.startswith("http") else f"{self.url}/{target.lstrip('/')}"
        final, html = self._send(method, url, form)
        return parse_page(final, html)

    def reset(self, seed: int) -> Observation:
        self.goal = self.goal_offset + int(seed) % self.num_goals
        self.session = f"fixed{uuid.uuid4().hex[:12]}_{self.goal}"  # "fixed..._<i>" asks the server for goal i
        self.page = self._go("GET", quote(self.session))
        self.task = self.page.instruction or ""
        self.done = False
        return self._observe()

    def available_actions(self) -> list[str]:
        """The actions the page offers, as the observation lists them (``search[<words>]``
        stands for any search)."""
        self._check_running()
        return (["search[<words>]"] if self.page.has_search else []) + [f"click[{c}]" for c in self.page.clickables]

    def legal_actions(self) -> list[str]:
        """Concrete legal actions: every click, and on a page with a search bar two
        searches for random words of the page (the format warm-up's answers)."""
        self._check_running()
        searches = []
        if self.page.has_search:
            words = sorted({w.strip(",.").lower() for w in " ".join([self.task, *self.page.lines]).split() if w.isalpha()})
            rng = random.Random(f"{self.goal}:{self.page.url}")
            searches = [f"search[{' '.join(rng.sample(words, min(2, len(words))))}]" for _ in range(2)] if words else []
        return searches + [f"click[{c}]" for c in self.page.clickables]

    def step(self, action: str) -> StepResult:
        self._check_running()
        match = ACTION_RE.match(action.strip())
        kind, arg = (match.group(1), " ".join(match.group(2).split())) if match else (None, "")
        if kind == "search" and self.page.has_search and arg and arg != "<words>":
            self.page = self._go("POST", self.page.search_url or quote(self.session), {"search_query": arg})
        elif kind == "click" and arg.lower() in self.page.clickables:
            self.page = self._go(*self.page.clickables[arg.lower()])
        else:
            return StepResult(self._observe(), 0.0, False, {"won": False, "valid_action": False})
        if self.page.score is None:
            return StepResult(self._observe(), 0.0, False, {"won": False, "valid_action": True})
        self.done = True
        won = self.page.score >= 1.0
        reward = (WIN_REWARD if won else 0.0) if self.reward == "success" else self.page.score
        return StepResult(self._observe(), reward, True, {"won": won, "valid_action": True, "score": self.page.score})

    def _observe(self) -> Observation:
        page = self.page
        text = f"Instruction: {self.task}\n" + "\n".join(page.lines)
        if not self.done:
            text += "\nAvailable actions: " + ", ".join(self.available_actions())
        return Observation(text, (self.goal, self._address(page.url)))

    def _address(self, url: str) -> str:
        """The page's address without the server and the session id."""
        path = urlsplit(url).path
        return path.replace(quote(self.session), "S").replace(self.session, "S")

    def close(self) -> None:
        self.page, self.done = None, True

    def _check_running(self) -> None:
        if self.done or self.page is None:
            raise RuntimeError("the episode is over or was never started: call reset(seed) first")
