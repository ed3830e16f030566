"""The server view (`B`): many requests at once, drawn from the batching engine's events.

The fake engine serves batches with the real BatchEngine on a tiny random model, so the
queues, the pool, the prefix sharing and the figures on screen are the engine's own. Each test
reads what a user would see: the screen, the rendered lines of its panes, the notifications.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
from textual.geometry import Region

import tui.screens.server as server
from engine.config import GenerationConfig
from engine.events import RequestFinished, RequestToken
from engine.recording import Recorder, header
from engine.requests import BatchRequest
from engine.workload import BUILTIN_PROMPTS
from tui.fake_engine import FakeSession, fake_generate
from tui.screens.main import MainScreen
from tui.screens.server import ServerScreen
from tui.settings import Settings
from tui.widgets.block_pool import BlockPool
from tui.widgets.request_lanes import RequestLanes, seconds
from tui.widgets.server_stats import ServerStats

from .conftest import drive, finished, make_app, ready, replays_without_torch, wait_for

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def quick_arrivals(monkeypatch):
    """The app's requests arrive 4 a second (a pace to watch); here, 200 a second."""
    monkeypatch.setattr(server, "ARRIVAL_RATE", 200.0)


def lines(widget) -> list[str]:
    """The widget as drawn on screen, one string per row (its public render_lines)."""
    return ["".join(seg.text for seg in strip)
            for strip in widget.render_lines(Region(0, 0, *widget.outer_size))]


def view(app):
    return server.server_screen(app).view


async def batch_over(pilot, timeout: float = 60.0):
    await wait_for(pilot, lambda: view(pilot.app).over, timeout, "the batch to end")
    await pilot.pause()


async def start(pilot):
    await ready(pilot)
    await pilot.press("B")
    await wait_for(pilot, lambda: isinstance(pilot.app.screen, ServerScreen), what="the screen")


@pytest.mark.parametrize("size", [(80, 24), (200, 50)])
async def test_sixteen_requests_readable_and_nothing_spills(size):
    app = make_app(max_new_tokens=12)
    async with drive(app, size) as (pilot, seen):
        await start(pilot)
        await batch_over(pilot)
        screen, v = app.screen, view(app)
        assert len(v.requests) == 16 and v.summary.finished == 16
        assert seen.said("serving 16 requests")
        # every pane inside the screen, none over another
        regions = [w.region for w in (screen.query_one("#server-title"),
                                      screen.query_one(ServerStats),
                                      screen.query_one("#server-pool"),
                                      screen.query_one("#server-lanes-box"))]
        width, height = size
        assert all(r.right <= width and r.bottom <= height for r in regions)
        assert all(a.bottom <= b.y for a, b in zip(regions, regions[1:]))
        stats = lines(screen.query_one(ServerStats))
        assert f"done: {v.summary.tokens_per_s:.1f} tok/s" in stats[1]   # the engine's figure
        assert "…" not in stats[1]
        assert "contiguous reservation" in stats[2] and "…" not in stats[2]
        assert f"{v.summary.contiguous_fit} of 16" in stats[2]
        pool = screen.query_one(BlockPool)
        drawn = lines(pool)
        cells = sum(line.count("·") + line.count("○") + line.count("██") + line.count("█░")
                    + line.count("×") for line in drawn[:-2])
        assert cells >= v.pool.blocks_total               # every block drawn, legend below
        assert any("shared" in line for line in drawn)
        # every request: in view, or reached by scrolling the lanes
        lanes = screen.query_one(RequestLanes)
        box = screen.query_one("#server-lanes-box")
        rows = lines(lanes)
        per = 2 if height >= 40 else 1
        assert len(rows) == 16 * per
        for i in range(16):
            assert rows[i * per].lstrip().startswith(f"██ r{i} ")
            assert "✓" in rows[i * per] and "TTFT" in rows[i * per]
        if box.max_scroll_y:
            assert height < 40 and "scroll" in box.border_subtitle
            box.focus()
            await pilot.press("end")
            await pilot.pause()
            assert box.scroll_y == box.max_scroll_y
            assert lanes.region.bottom - 1 < box.region.bottom      # the last lane in view
        else:
            assert height >= 40
        # the engine's figures, not the UI's: each finished lane shows its RequestFinished TPOT
        fins = {e.event.request: e.event for b in seen.batches for e in b.envelopes
                if isinstance(e.event, RequestFinished)}
        r3 = next(r for r in rows if r.lstrip().startswith("██ r3 "))
        assert f"{fins[3].ttft_s * 1e3:.0f} ms" in r3


async def test_a_running_request_shows_its_tpot_so_far():
    """While a request runs, its lane shows a TPOT the engine sent with its tokens
    (RequestToken.tpot_s, engine/metrics.py's figure), not "—" until it finishes."""
    app = make_app(delay=0.05, max_new_tokens=40)
    async with drive(app, (200, 50)) as (pilot, seen):
        await start(pilot)

        def sent(request: int) -> set[str]:
            return {seconds(e.event.tpot_s) for b in seen.batches for e in b.envelopes
                    if isinstance(e.event, RequestToken) and e.event.request == request
                    and e.event.tpot_s is not None}

        def a_running_lane_shows_it() -> bool:
            rows = lines(app.screen.query_one(RequestLanes))
            for r in view(app).requests.values():
                row = next((x for x in rows if x.lstrip().startswith(f"██ r{r.request} ")), "")
                figures = sent(r.request)
                if "▶" in row and figures and any(f"TPOT {f:>6}" in row for f in figures):
                    return True
            return False
        await wait_for(pilot, a_running_lane_shows_it, 30, "a running lane with its TPOT")
        await pilot.press("x")
        await batch_over(pilot)


async def test_x_stops_the_batch_and_the_app_is_free_again():
    app = make_app(delay=0.05, max_new_tokens=40)
    async with drive(app, (80, 24)) as (pilot, seen):
        await start(pilot)
        await wait_for(pilot, lambda: view(app).count("running") >= 2, 30, "requests running")
        await pilot.press("x")
        await batch_over(pilot)
        s = view(app).summary
        assert s.interrupted and s.cancelled >= 1
        stats = lines(app.screen.query_one(ServerStats))
        assert f"{s.cancelled} stopped" in stats[0]
        pool = view(app).pool                   # the figures until the stop, not the summary's
        assert f"stopped: {pool.tokens_per_s:.1f} tok/s aggregate until then" in stats[1]
        assert not app.follow.busy
        await pilot.press("enter")            # a run starts again, back on the panes
        fin = await finished(pilot, seen)
        assert isinstance(app.screen, MainScreen)
        assert fin.reason == "length"


async def test_escape_leaves_it_running_b_shows_it_again_then_starts_a_new_batch():
    app = make_app(delay=0.03, max_new_tokens=20)
    async with drive(app, (100, 30)) as (pilot, seen):
        await start(pilot)
        first = view(app).batch_id
        await pilot.press("escape")
        assert isinstance(app.screen, MainScreen)
        await pilot.press("enter")                              # busy: refused, said
        assert seen.said("press x to stop it first")
        await pilot.press("B")
        assert isinstance(app.screen, ServerScreen) and view(app).batch_id == first
        await batch_over(pilot)
        await pilot.press("B")                                  # over: a new batch
        await wait_for(pilot, lambda: view(app).batch_id != first and view(app).started
                       is not None, what="a second batch")
        await batch_over(pilot)
        assert view(app).summary.finished == 16


async def test_prompts_file_is_served_and_a_bad_one_is_one_line(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("first question\n\nsecond question\nthird question\n")
    app = make_app(prompts=str(path), max_new_tokens=4)
    async with drive(app, (80, 24)) as (pilot, seen):
        await start(pilot)
        await batch_over(pilot)
        assert [r.prompt for r in view(app).requests.values()] == [
            "first question", "second question", "third question"]
        path.write_bytes(b"\xff\xfe not text")                 # spoiled after launch
        await pilot.press("B")
        await pilot.pause()
        assert seen.said("is not UTF-8 text")
    (tmp_path / "empty.txt").write_text("\n  \n")
    assert Settings(prompts=str(tmp_path / "empty.txt")).error().startswith("--prompts: no prompts")
    assert "not found" in Settings(prompts=str(tmp_path / "missing.txt")).error()


def test_a_recorded_batch_replays_without_torch(tmp_path):
    """Recorded from the fake session's batch (the real engine on a tiny model); replayed in
    the app with torch (and every model-loading package) unimportable: the server screen opens,
    steps, goes back, and ends with every request done."""
    session = FakeSession(SimpleNamespace(model=None, tokenizer=None, name="fake"),
                          generate=lambda *a, **k: fake_generate(*a, **k))
    path = tmp_path / "batch.jsonl"
    rec = Recorder(str(path), header({}, session.ready(), "test"))
    rec.write([session.envelope(0, session.ready())])
    rec.write(session.batch(BatchRequest(BUILTIN_PROMPTS, GenerationConfig(max_new_tokens=6),
                                         batch_id=1, max_batch=8, reserve_for=3)))
    rec.close()
    script = textwrap.dedent(f"""
        import asyncio, sys
        for name in ("torch", "tokenizers", "safetensors", "gguf", "transformers", "triton"):
            sys.modules[name] = None
        from engine.player import Player
        from engine.recording import read_recording
        from tui.app import MiniLLMApp, Settings
        from tui.screens.server import ServerScreen

        async def until(pilot, condition):
            for _ in range(250):
                await pilot.pause(0.02)
                if condition():
                    return
            raise AssertionError("timed out")

        async def main():
            app = MiniLLMApp(Settings(), source=Player(read_recording({str(path)!r}),
                                                       playing=False))
            async with app.run_test(size=(80, 24)) as pilot:
                await pilot.pause()
                await pilot.press("right", "right", "right")     # three scheduler steps
                await until(pilot, lambda: isinstance(app.screen, ServerScreen)
                            and app.screen.view.step is not None
                            and app.screen.view.step.step == 3)
                s = app.screen
                await pilot.press("left")             # back one step: rebuilt from the start
                await until(pilot, lambda: s.view.step is not None and s.view.step.step == 2)
                await pilot.press("end")
                await until(pilot, lambda: s.view.summary is not None)
                assert s.view.summary.finished == 16, s.view.summary
                assert all(r.state == "done" for r in s.view.requests.values())
            print("replayed", sys.modules["torch"])
        asyncio.run(main())
    """)
    replays_without_torch(script)
