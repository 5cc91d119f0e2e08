"""WebShop adapter: pages in WebShop's templates turned into text and clickables, the
search and click actions sent as the site sends them, invalid actions never sent, the
score read from the end page, anchors without the session, and a clear message when no
server runs. A fake transport serves pages built like the server's templates."""

from __future__ import annotations

import re
from urllib.parse import unquote

import pytest

pytest.importorskip("bs4", reason="the optional webshop packages are not installed: pip install 'grpo_lab[webshop]'")

from grpo_lab.envs.webshop import WIN_REWARD, WebShopEnv, WebShopUnavailable, parse_page  # noqa: E402

GOALS = {3: "i need a red mug, and price lower than 20.00 dollars"}


def instruction(sid):
    goal = int(sid.rsplit("_", 1)[-1])
    return f'<div id="instruction-text" class="text-center"><h4>Instruction:<br>{GOALS[goal]}</h4></div>'


def index(sid):
    return (f"<html><head><title>WebShop</title></head><body><h2>WebShop</h2>{instruction(sid)}"
            f'<form method="post" action="/{sid}"><input id="search_input" name="search_query" type="text">'
            '<button type="submit" class="btn btn-primary">Search</button></form></body></html>')


def results(sid, kw):
    return (f"<html><body>{instruction(sid)}"
            f'<form method="post" action="/{sid}"><button type="submit" class="btn btn-success">Back to Search</button></form>'
            "<h3>Page 1 (Total results: 2)</h3>"
            f'<form method="post" action="/search_results/{sid}/{kw}/2"><button class="btn btn-primary">Next &gt;</button></form>'
            f'<h4 class="product-asin"><a class="product-link" href="/item_page/{sid}/B0001/{kw}/1/%7B%7D">B0001</a></h4>'
            '<h4 class="product-title">Ceramic Mug</h4><h5 class="product-price">$12.00</h5>'
            f'<h4 class="product-asin"><a class="product-link" href="/item_page/{sid}/B0002/{kw}/1/%7B%7D">B0002</a></h4>'
            '<h4 class="product-title">Steel Mug</h4><h5 class="product-price">$30.00</h5></body></html>')


def item(sid, asin, kw, options):
    red = f"/item_page/{sid}/{asin}/{kw}/1/%7B%27color%27:%20%27red%27%7D"
    blue = f"/item_page/{sid}/{asin}/{kw}/1/%7B%27color%27:%20%27blue%27%7D"
    return (f"<html><body>{instruction(sid)}"
            f'<form method="post" action="/{sid}"><button class="btn">Back to Search</button></form>'
            f'<form method="post" action="/search_results/{sid}/{kw}/1"><button class="btn">&lt; Prev</button></form>'
            '<h4>color</h4><div class="radio-toolbar">'
            f'<input type="radio" id="radio_color0" name="color" value="red" data-url="{red}"><label for="radio_color0">red</label>'
            f"<input type=\"radio\" id=\"radio_color1\" name=\"color\" value=\"blue\" onclick=\"window.location.href='{blue}';\">"
            '<label for="radio_color1">blue</label></div>'
            "<h2>Ceramic Mug</h2><h4>Price: $12.00</h4>"
            f'<form method="post" action="/done/{sid}/{asin}/{options}"><button class="btn">Buy Now</button></form></body></html>')


def done(options):
    score = 1.0 if "red" in unquote(options) else 0.5
    return f'<html><body><h3 id="reward">Your score (min 0.0, max 1.0)<pre>{score}</pre></h3></body></html>'


class FakeServer:
    """Routes like WebShop's Flask app; records what it was sent."""

    def __init__(self):
        self.requests = []

    def __call__(self, method, url, form):
        self.requests.append((method, url, form))
        path = url.split("127.0.0.1:3000", 1)[-1]
        if path == "/":
            return url + "abc", "<html></html>"
        if m := re.fullmatch(r"/(fixed\w+_\d+)", path):
            if method == "POST":
                kw = "%5B%27" + "%27%2C%20%27".join(form["search_query"].split()) + "%27%5D"
                return f"http://127.0.0.1:3000/search_results/{m[1]}/{kw}/1", results(m[1], kw)
            return url, index(m[1])
        if m := re.fullmatch(r"/search_results/([^/]+)/([^/]+)/(\d+)", path):
            return url, results(m[1], m[2])
        if m := re.fullmatch(r"/item_page/([^/]+)/([^/]+)/([^/]+)/\d+/([^/]+)", path):
            return url, item(m[1], m[2], m[3], m[4])
        if m := re.fullmatch(r"/done/([^/]+)/([^/]+)/([^/]+)", path):
            return url, done(m[3])
        raise AssertionError(f"no route for {path}")


@pytest.fixture()
def server():
    return FakeServer()


def make(server, **kwargs):
    return WebShopEnv(transport=server, num_goals=1, goal_offset=3, **kwargs)


def test_the_first_page_shows_the_instruction_and_a_search_bar(server):
    env = make(server)
    obs = env.reset(7)
    assert env.task == GOALS[3] and obs.text.splitlines()[0] == f"Instruction: {GOALS[3]}"
    assert env.available_actions() == ["search[<words>]"]  # the Search button is the search action itself
    searches = env.legal_actions()  # concrete searches for the format warm-up, drawn from the page's words
    assert len(searches) == 2 and all(re.fullmatch(r"search\[[a-z]+ [a-z]+\]", a) for a in searches)
    assert searches == env.legal_actions()
    assert obs.anchor == (3, "/S")
    assert re.fullmatch(r"fixed[0-9a-f]{12}_3", env.session)


def test_a_search_a_product_an_option_and_buy_now(server):
    env = make(server)
    env.reset(0)
    results_page = env.step("search[red  mug]")
    assert results_page.info == {"won": False, "valid_action": True}
    assert server.requests[-1][0] == "POST" and server.requests[-1][2] == {"search_query": "red mug"}
    assert "[B0001]" in results_page.observation.text and "Ceramic Mug" in results_page.observation.text
    assert env.legal_actions() == ["click[back to search]", "click[next >]", "click[b0001]", "click[b0002]"]
    assert env.available_actions() == env.legal_actions()  # no search bar here
    item_page = env.step("click[B0001]")
    assert set(env.legal_actions()) == {"click[back to search]", "click[< prev]", "click[red]", "click[blue]",
                                        "click[buy now]"}
    assert "[red]" in item_page.observation.text and item_page.observation.anchor[1].startswith("/item_page/S/B0001/")
    env.step("click[red]")
    bought = env.step("click[Buy Now]")
    assert bought.done and bought.reward == WIN_REWARD and bought.info == {"won": True, "valid_action": True, "score": 1.0}
    assert server.requests[-1][0] == "POST" and "/done/" in server.requests[-1][1]


def test_a_partial_score_is_no_win_unless_the_reward_is_the_score(server):
    for reward, expected in (("success", 0.0), ("score", 0.5)):
        env = make(server, reward=reward)
        env.reset(0)
        env.step("search[mug]")
        env.step("click[b0001]")
        env.step("click[blue]")  # an onclick option
        result = env.step("click[buy now]")
        assert result.reward == expected and result.info["score"] == 0.5 and not result.info["won"]


@pytest.mark.parametrize("action", ["click[b0009]", "buy[b0001]", "search[]", "click[next >]", "search[<words>]"])
def test_invalid_actions_are_not_sent(server, action):
    env = make(server)
    start = env.reset(0)
    sent = len(server.requests)
    result = env.step(action)
    assert result.info == {"won": False, "valid_action": False} and result.observation == start
    assert len(server.requests) == sent


def test_group_members_get_sessions_of_their_own_and_equal_anchors(server):
    a, b = make(server), make(server)
    assert a.reset(5) == b.reset(5) and a.session != b.session
    assert a.step("search[red mug]") == b.step("search[red mug]")


def test_parse_page_reads_the_end_score_and_drops_scripts():
    page = parse_page("http://x/done/s/a/%7B%7D", '<html><head><script>var x;</script></head><body>'
                      '<h3 id="reward">Your score (min 0.0, max 1.0)<pre> 0.75 </pre></h3></body></html>')
    assert page.score == 0.75 and not page.clickables and not any("var x" in line for line in page.lines)


def test_no_server_is_explained_with_the_commands_that_start_one():
    def refused(method, url, form):
        raise ConnectionRefusedError(111, "Connection refused")

    with pytest.raises(WebShopUnavailable, match=r"no WebShop server at http://127.0.0.1:3000 .*run_dev.sh"):
        WebShopEnv(transport=refused)
    with pytest.raises(ValueError, match="reward must be"):
        WebShopEnv(transport=FakeServer(), reward="points")


def test_a_real_server_when_one_runs():
    try:
        env = WebShopEnv(timeout_s=2.0)
    except (WebShopUnavailable, ImportError) as err:
        pytest.skip(f"no WebShop server here: {str(err).splitlines()[0]}")
    obs = env.reset(0)
    assert env.task and env.available_actions()[0] == "search[<words>]" and obs.anchor[1] == "/S"
