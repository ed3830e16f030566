"""The app attached to a server (`python main.py --endpoint URL`): a remote lane races beside the
local ones, the engine compares its tokens, and a server that goes away is one line in its lane.

The first test is real throughout: our own `serve` in its own process on a free port
(tests/serve/conftest.py starts it), the app's engine in its spawned process, both on the tiny
random Llama in float64 — where batching cannot flip a near-tie, so the server's greedy tokens
must be the local engine's, id for id. The others race the fake engine (a real session over
synthetic events) against a scripted server (tests/engine/test_remote_race.py) that streams the
tokens a test chooses.
"""

from __future__ import annotations

import pytest

from engine.config import GenerationConfig
from engine.events import RaceFinished, Token
from tests.serve.conftest import start_server
from tests.tui.conftest import drive, make_app, ready, wait_for
from tui.fake_engine import fake_generate
from tui.widgets.status_bar import StatusBar
from tui.app import MiniLLMApp
from tui.screens.race import RaceScreen
from tui.settings import Settings



@pytest.fixture(scope="module")
def server(tiny_folder):
    srv = start_server(["--model", str(tiny_folder), "--dtype", "float64", "--threads", "1"])
    yield srv
    srv.stop()


def last_race(seen) -> RaceFinished:
    return [e.event for b in seen.batches for e in b.envelopes
            if isinstance(e.event, RaceFinished)][-1]


async def race(pilot, seen, n: int):
    """Press R and wait for the n-th race table."""
    await pilot.press("R")
    await wait_for(pilot, lambda: isinstance(pilot.app.screen, RaceScreen) and sum(
        isinstance(e.event, RaceFinished) for b in seen.batches for e in b.envelopes) >= n,
        timeout=240, what=f"race {n} to finish")
    return last_race(seen)


@pytest.mark.slow                      # two processes start: ~30 s on the 2-core machine
async def test_a_remote_lane_races_beside_local_lanes_then_its_server_goes_away(
        server, tiny_folder, monkeypatch):
    from tui.bridge import ProcessSource
    monkeypatch.delenv("MINILLM_API_KEY", raising=False)    # this server asks for none
    settings = Settings(model=str(tiny_folder), device="cpu", dtype="float64",
                        max_new_tokens=8, endpoint=server.base)
    app = MiniLLMApp(settings, source=ProcessSource(str(tiny_folder), "cpu", "float64"))
    async with drive(app) as (pilot, seen):
        await wait_for(pilot, lambda: app.info is not None, timeout=180, what="the engine")
        host = server.base.split("//")[1].removesuffix("/v1")

        fin = await race(pilot, seen, 1)
        lanes = app.query_one("#lanes")
        labels = [lane.label for lane in lanes.lanes]
        assert labels[0] == "naive/sdpa" and labels[-1] == f"remote/{host}"
        remote = fin.rows[-1]
        assert remote.label == labels[-1] and remote.error is None
        assert remote.same_tokens is True and remote.comparison == "token ids"
        assert list(remote.tokens) == list(fin.rows[0].tokens)       # the server's = ours
        assert remote.server_metrics is not None                     # its own clock, beside
        table = app.screen
        assert "all" in str(table.query_one("#verdict").render()) and \
            "identical tokens" in str(table.query_one("#verdict").render())
        note = str(table.query_one(".remote").render())
        assert note.startswith(f"remote/{host}: client: TTFT") and "server: TTFT" in note
        assert "compared by token ids" in note
        # the lane says ✓ as the engine decided, with its client TTFT and the server's
        await pilot.press("escape")
        lane_text = lanes.render().plain
        line = next(l for l in lane_text.splitlines() if f"remote/{host}" in l)
        assert line.startswith("✓") and "TTFT" in line and "(server" in line
        # the panes that need the engine's insides say a server does not expose them
        assert "does not expose its attention" in app.query_one("#attention").render().plain
        assert "does not expose its KV cache" in app.query_one("#kv").render().plain

        server.stop()                     # the server goes away: the race goes on without it
        fin = await race(pilot, seen, 2)
        remote = fin.rows[-1]
        assert remote.reason == "error" and "cannot reach" in remote.error
        assert not fin.cancelled and all(r.same_tokens for r in fin.rows[1:-1])
        await pilot.press("escape")
        line = [l for l in lanes.render().plain.splitlines() if f"remote/{host}" in l]
        error = lanes.render().plain.split(line[0])[1].splitlines()[1].strip()
        assert line[0].startswith("error") and error.startswith("cannot reach")
        assert app.is_running and app.query_one("#lanes").lanes[-1].state == "error"


def fake_tokens(prompt: str, n: int) -> list[tuple[int, str]]:
    """What the fake engine generates for `prompt`: what a server "with its model" streams."""
    return [(e.id, e.text) for e in fake_generate(None, None, prompt,
                                                  GenerationConfig(max_new_tokens=n))
            if isinstance(e, Token)]


async def test_a_server_that_differs_is_named_but_leaves_the_local_verdict(scripted):
    """Another server's model, dtype or kernels may pick other tokens: its ✗@i is shown, and
    the badge still speaks for the local optimisations."""
    tokens = fake_tokens("Deep learning is", 8)
    tokens[2] = (99, " writes")
    server = scripted(tokens)
    host = server.url.split("//")[1].removesuffix("/v1")
    app = make_app(max_new_tokens=8, endpoint=server.url)
    async with drive(app) as (pilot, seen):
        await ready(pilot)
        assert f"kv/sdpa · races remote/{host} │" in app.query_one(StatusBar).render().plain
        await pilot.press("R")
        await wait_for(pilot, lambda: isinstance(app.screen, RaceScreen), what="race table")
        verdict = str(app.screen.query_one("#verdict").render())
        assert verdict.startswith("✓ every local contestant produced identical tokens")
        assert f"remote/{host} differs from token 2 (the server's own model" in verdict
        assert app.query_one(StatusBar).identical is True
        assert "compared by token ids" in str(app.screen.query_one(".remote").render())
        await pilot.press("escape")
        lines = app.query_one("#lanes").render().plain.splitlines()
        assert next(l for l in lines if f"remote/{host}" in l).startswith("✗@2")
        assert seen.said("every local contestant")


async def test_a_sampled_race_shows_the_server_uncompared(scripted):
    server = scripted(fake_tokens("Deep learning is", 6))
    app = make_app(max_new_tokens=6, endpoint=server.url, sampling=dict(temperature=0.7))
    async with drive(app) as (pilot, seen):
        await ready(pilot)
        await pilot.press("R")
        await wait_for(pilot, lambda: isinstance(app.screen, RaceScreen), what="race table")
        note = str(app.screen.query_one(".remote").render())
        assert "not compared: sampled — the server draws its own random numbers" in note
        assert server.bodies[-1]["temperature"] == 0.7 and server.bodies[-1]["seed"] == 0
        await pilot.press("escape")
        lines = app.query_one("#lanes").render().plain.splitlines()
        assert next(l for l in lines if "remote/" in l).startswith("—")


def test_endpoint_settings_are_checked_before_the_app_starts():
    from cli.parser import build_parser
    args = build_parser().parse_args(
        ["ui", "--endpoint", "gpu-box:8000", "--endpoint-model", "m"])
    s = Settings.from_args(args)
    assert (s.endpoint, s.endpoint_model, s.error()) == ("gpu-box:8000", "m", None)
    assert "http(s) URL" in Settings(endpoint="ftp://x").error()
    assert "needs --endpoint" in Settings(endpoint_model="m").error()
