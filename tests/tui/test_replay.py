"""`replay`: the app on a recording, with no engine behind it.

The fixture (tests/fixtures/fake_session.jsonl, made by tests/fixtures/make_recording.py) holds a
paged run, a flash run and a three-way race of the fake engine. Keys, as a user presses them:
space play/pause, ← → one token back/forward, − + speed, home/end.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

from textual.geometry import Region
from textual.widgets import DataTable, Input

from engine.player import Player
from engine.recording import read_recording
from tui.app import MiniLLMApp
from tui.screens.race import RaceScreen
from tui.widgets.attention import AttentionPane
from tui.widgets.kv_cache import KVCachePane
from tui.widgets.latency import LatencyPane
from tui.widgets.race_lanes import RaceLanes
from tui.widgets.status_bar import StatusBar
from tui.widgets.token_stream import TokenStream

from tui.settings import Settings

from .conftest import drive, finished, make_app, ready, replays_without_torch, wait_for

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "fixtures" / "fake_session.jsonl"


def replay_app(path=FIXTURE, speed: float = 1.0, playing: bool = True) -> MiniLLMApp:
    rec = read_recording(str(path))
    settings = Settings()
    settings.take(rec.header)
    return MiniLLMApp(settings, source=Player(rec, speed=speed, playing=playing),
                      color_depth="truecolor")


def pane_lines(app: MiniLLMApp) -> list:
    """Every pane as drawn, cell by cell with its style: each visible widget inside the panes
    rendered through its public render_lines (the status bar and footer left out: live and
    replay each show their own)."""
    app.query_one(LatencyPane).redraw()          # the chart timer may not have fired yet
    out = []
    for w in app.main.query("#panes *"):
        if w.display and w.region.area and not w.children:
            size = w.outer_size
            out.append((w.id, w.region, [[(seg.text, seg.style) for seg in strip]
                                         for strip in w.render_lines(Region(0, 0, *size))]))
    return out


async def settle(pilot) -> None:
    pilot.app.clear_notifications()
    pilot.app.query_one(LatencyPane).redraw()
    for _ in range(3):
        await pilot.pause()


def test_replay_needs_neither_torch_nor_the_model():
    """A laptop with only the UI's packages: torch (and every model-loading package) cannot be
    imported at all."""
    script = textwrap.dedent(f"""
        import asyncio, sys
        for name in ("torch", "tokenizers", "safetensors", "gguf", "transformers", "triton"):
            sys.modules[name] = None         # any `import torch` (…) now fails
        from engine.player import Player
        from engine.recording import read_recording
        from tui.app import MiniLLMApp
        from tui.settings import Settings
        from tui.widgets.token_stream import TokenStream
        from tui.widgets.kv_cache import KVCachePane
        from tui.widgets.attention import AttentionPane
        from tui.screens.race import RaceScreen

        async def main():
            rec = read_recording({str(FIXTURE)!r})
            app = MiniLLMApp(Settings(), source=Player(rec, playing=False))
            async with app.run_test(size=(150, 45)) as pilot:
                await pilot.pause()
                await pilot.press("right", "right", "right")      # three tokens
                for _ in range(50):
                    await pilot.pause(0.02)
                    if app.query_one(TokenStream).generated_text: break
                assert app.query_one(TokenStream).text == "Deep learning is the model reads", \\
                    app.query_one(TokenStream).text
                assert app.query_one(KVCachePane).stats.tokens == 6
                assert max(app.query_one(AttentionPane).rows) == 5
                await pilot.press("end")
                for _ in range(100):
                    await pilot.pause(0.02)
                    if isinstance(app.screen, RaceScreen): break
                assert isinstance(app.screen, RaceScreen)
            loaded = [m for m in ("engine.model", "engine.decoding", "engine.session",
                                  "tui.engine_process") if m in sys.modules]
            assert not loaded, loaded
            print("replayed", sys.modules["torch"])
        asyncio.run(main())
    """)
    replays_without_torch(script)


async def test_replay_plays_every_pane_at_the_recorded_pace():
    app = replay_app(speed=4.0)
    async with drive(app) as (pilot, seen):
        await wait_for(pilot, lambda: isinstance(app.screen, RaceScreen), what="the race table")
        assert app.source.state.at_end and not app.source.state.playing
        assert app.query_one(StatusBar).model.startswith("fake-model")
        assert "■ replay 4× · token 40/40" in app.query_one(StatusBar).replay
        assert app.screen.query_one(DataTable).row_count == 3
        assert "paged/sdpa" in str(app.screen.query_one("#verdict").render())
        await pilot.press("escape")
        lanes = app.query_one(RaceLanes)
        assert [lane.state for lane in lanes.lanes] == ["done"] * 3
        assert "✗@4" in str(lanes.render())
        assert app.query_one(KVCachePane).stats.kind == "paged"
        latency = app.query_one(LatencyPane)
        # one line per name: the race's paged/sdpa replaced the first run's
        assert [s.label for s in latency.series] == ["kv/flash", "naive/sdpa", "kv/sdpa",
                                                     "paged/sdpa"]
        assert all(s.xs == list(range(1, 8)) for s in latency.series)
        # the layer/head/view keys work on the recorded rows
        att = app.query_one(AttentionPane)
        await pilot.press("2", "right_square_bracket", "right_curly_bracket", "m")
        assert (att.shown_layer, att.shown_head, att.mode) == (1, 1, "matrix")
        assert "▀" in str(att.render())


async def test_stepping_back_restores_the_panes():
    app = replay_app(playing=False)
    async with drive(app) as (pilot, seen):
        await pilot.pause()
        await pilot.press("right", "right", "right")   # token 3 of the paged run
        await settle(pilot)
        at_three = pane_lines(app)
        stream = app.query_one(TokenStream)
        assert stream.text == "Deep learning is the model reads"
        assert app.query_one(KVCachePane).stats.tokens == 6
        assert app.query_one(LatencyPane).series[-1].xs == [1, 2]
        assert "⏸ replay 1× · token 3/40" in app.query_one(StatusBar).replay
        await pilot.press("right", "right", "right", "right", "right", "right")   # into run 2
        await settle(pilot)
        assert app.query_one(LatencyPane).series[-1].label == "kv/flash"
        await pilot.press("left", "left", "left", "left", "left", "left")
        await settle(pilot)
        assert pane_lines(app) == at_three            # every pane as it was at token 3
        await pilot.press("home")
        await settle(pilot)
        assert stream.text == "" and app.query_one(KVCachePane).stats is None


async def test_jumping_while_playing_keeps_the_events_in_order():
    """A jump from the keyboard and the player's own deliveries interleave; the panes must end
    as if the recording had been delivered in order (regression: a batch overtook another)."""
    screens = []
    for playing in (True, False):
        app = replay_app(playing=playing)
        async with drive(app) as (pilot, seen):
            if playing:
                await wait_for(pilot, lambda: app.source.state.token > 3, what="some tokens")
            await pilot.press("end")
            await wait_for(pilot, lambda: isinstance(app.screen, RaceScreen), what="the end")
            await settle(pilot)
            screens.append(pane_lines(app))
    assert screens[0] == screens[1]


async def test_replay_keys_and_no_engine_keys():
    app = replay_app(playing=False)
    async with drive(app) as (pilot, seen):
        await pilot.pause()
        player = app.source
        await pilot.press("plus", "plus")
        assert player.speed == 4.0
        await pilot.press("minus", "minus", "minus", "minus")
        assert player.speed == 0.5
        await pilot.press("s", "b", "enter", "R", "slash")    # engine keys do nothing here
        assert app.settings.strategy == "kv" and not app.source.state.token   # (the header's)
        assert not isinstance(app.focused, Input) and not app.main.has_class("-lanes")
        bindings = {b.binding.action for b in app.active_bindings.values()}
        assert "steer('toggle')" in bindings and "run" not in bindings
        # (Pilot waits for the app to be idle after a key, and a playing replay keeps it busy
        # until the end; so while it plays, the key's action is called directly.)
        start = player.state.cursor
        await pilot.press("space")                 # play …
        assert player.state.cursor > start
        await pilot.press("home", "space")
        app.main.action_steer("toggle")            # … and pause: nothing moves any more
        held = player.state.cursor
        assert not player.state.playing
        await pilot.pause(0.3)
        assert player.state.cursor == held
        await pilot.press("end")
        await wait_for(pilot, lambda: isinstance(app.screen, RaceScreen), what="the end")
        assert player.state.at_end and "■" in app.query_one(StatusBar).replay


async def test_a_damaged_recording_plays_up_to_the_damage(tmp_path):
    lines = FIXTURE.read_text(encoding="utf-8").splitlines(keepends=True)
    path = tmp_path / "cut.jsonl"
    path.write_text("".join(lines[:40]) + lines[40][:25], encoding="utf-8")
    app = replay_app(path, speed=4.0)
    async with drive(app) as (pilot, seen):
        await wait_for(pilot, lambda: app.source.state.at_end, what="the end of what is left")
        assert seen.said("cut off")
        assert app.query_one(TokenStream).generated_text


async def test_a_live_race_recorded_and_replayed_ends_on_the_same_screen(tmp_path):
    path = tmp_path / "race.jsonl.gz"
    live = make_app(max_new_tokens=6, diverge={"paged/sdpa": 3}, record=str(path))
    async with drive(live) as (pilot, seen):
        await ready(pilot)
        await wait_for(pilot, lambda: live.recording.on, what="the recording")
        await pilot.press("R")
        await wait_for(pilot, lambda: isinstance(live.screen, RaceScreen), what="the race")
        await settle(pilot)
        live_screen = pane_lines(live)
        live_status = str(live.query_one(StatusBar).render())
    assert not live.recording.on                    # closed with the app

    app = replay_app(path, speed=4.0)
    async with drive(app) as (pilot, seen):
        await wait_for(pilot, lambda: isinstance(app.screen, RaceScreen), what="the replay")
        await settle(pilot)
        replay_screen = pane_lines(app)
        replay_status = str(app.query_one(StatusBar).render())
    # Every pane is the same, character for character, colour for colour (the status bar —
    # live: "● rec", replay: its position — and the footer each show their own).
    assert replay_screen == live_screen
    assert "tokens differ" in replay_status and "tokens differ" in live_status


async def test_record_key_writes_a_replayable_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    app = make_app(max_new_tokens=4)
    async with drive(app) as (pilot, seen):
        await ready(pilot)
        await pilot.press("r")                  # start recording (a file named by the time)
        assert app.query_one(StatusBar).recording
        await pilot.press("enter")
        await finished(pilot, seen)
        await pilot.press("r")                  # stop
        assert not app.query_one(StatusBar).recording
        await pilot.pause()
        assert seen.said("python main.py replay")
    (path,) = tmp_path.glob("minillm-*.jsonl.gz")
    rec = read_recording(str(path))
    assert rec.notice is None and rec.header["command"] == "app"
    assert [type(e.event).__name__ for e in rec.envelopes][:3] == ["Ready", "Started", "Prefill"]


async def test_a_batch_after_the_runs_plays_on_the_server_view(tmp_path):
    """A recording may hold a batch (the continuous-batching engine's events) after its runs:
    everything before it still plays, and the batch opens the server view on top."""
    from tui.screens.server import ServerScreen
    import json
    from engine.events import BatchStarted, Envelope
    lines = FIXTURE.read_text(encoding="utf-8").splitlines(keepends=True)
    extra = Envelope(0, 1e9, BatchStarted("m", "cpu", "float32", "sdpa", 4, 64, 16, 8, 1024,
                                          True))
    path = tmp_path / "with_batch.jsonl"
    path.write_text("".join(lines) + json.dumps(extra.to_json()) + "\n", encoding="utf-8")
    app = replay_app(path, speed=4.0)
    async with drive(app) as (pilot, seen):
        await pilot.press("end")
        await wait_for(pilot, lambda: isinstance(app.screen, ServerScreen), what="the end")
        assert any(isinstance(s, RaceScreen) for s in app.screen_stack)
        assert app.source.state.at_end and app.query_one(TokenStream).generated_text
        assert app.screen.view.started.max_batch == 4 and app.screen.view.batch_id == 0
