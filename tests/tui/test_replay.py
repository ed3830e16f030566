"""`replay`: the app on a recording, with no engine behind it.

The fixture (tests/fixtures/fake_session.jsonl, made by tests/fixtures/make_recording.py) holds a
paged run, a flash run and a three-way race of the fake engine. Keys, as a user presses them:
space play/pause, ← → one token back/forward, − + speed, home/end.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from rich.console import Console
from textual.widgets import DataTable, Input

from engine.player import Player
from engine.recording import read_recording
from tui.app import MiniLLMApp, Settings
from tui.screens.race import RaceScreen
from tui.widgets.attention import AttentionPane
from tui.widgets.kv_cache import KVCachePane
from tui.widgets.latency import LatencyPane
from tui.widgets.race_lanes import RaceLanes
from tui.widgets.status_bar import StatusBar
from tui.widgets.token_stream import TokenStream

from .conftest import make_app, ready, wait_for

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "fixtures" / "fake_session.jsonl"
SIZE = (150, 45)


def replay_app(path=FIXTURE, speed: float = 1.0, playing: bool = True) -> MiniLLMApp:
    rec = read_recording(str(path))
    settings = Settings()
    settings.take(rec.header)
    return MiniLLMApp(settings, source=Player(rec, speed=speed, playing=playing),
                      color_depth="truecolor")


def screen_lines(app: MiniLLMApp) -> list[str]:
    """The screen as styled text, one string per row (what export_screenshot draws, as ANSI)."""
    app.query_one(LatencyPane).redraw()          # the chart timer may not have fired yet
    width, height = app.size
    console = Console(width=width, height=height, file=io.StringIO(), force_terminal=True,
                      color_system="truecolor", record=True, legacy_windows=False,
                      safe_box=False)
    console.print(app.screen._compositor.render_update(
        full=True, screen_stack=app._background_screens))
    return console.export_text(styles=True).splitlines()


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
        from tui.app import MiniLLMApp, Settings
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
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "replayed None"


async def test_replay_plays_every_pane_at_the_recorded_pace():
    app = replay_app(speed=4.0)
    async with app.run_test(size=SIZE) as pilot:
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
        assert [run[0] for run in latency.runs] == ["paged/sdpa", "kv/flash", "naive/sdpa",
                                                    "kv/sdpa", "paged/sdpa"]
        assert all(len(run[1]) == 8 for run in latency.runs)
        # the layer/head/view keys work on the recorded rows
        att = app.query_one(AttentionPane)
        await pilot.press("right_square_bracket", "right_curly_bracket", "m")
        assert (att.shown_layer, att.shown_head, att.mode) == (1, 1, "matrix")
        assert "▀" in str(att.render())


async def test_stepping_back_restores_the_panes():
    app = replay_app(playing=False)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        await pilot.press("right", "right", "right")   # token 3 of the paged run
        await settle(pilot)
        at_three = screen_lines(app)
        stream = app.query_one(TokenStream)
        assert stream.text == "Deep learning is the model reads"
        assert app.query_one(KVCachePane).stats.tokens == 6
        assert app.query_one(LatencyPane).runs[-1][1] == [3, 4, 5]
        assert "⏸ replay 1× · token 3/40" in app.query_one(StatusBar).replay
        await pilot.press("right", "right", "right", "right", "right", "right")   # into run 2
        await settle(pilot)
        assert app.query_one(LatencyPane).runs[-1][0] == "kv/flash"
        await pilot.press("left", "left", "left", "left", "left", "left")
        await settle(pilot)
        assert screen_lines(app) == at_three          # every pane as it was at token 3
        await pilot.press("home")
        await settle(pilot)
        assert stream.text == "" and app.query_one(KVCachePane).stats is None


async def test_jumping_while_playing_keeps_the_events_in_order():
    """A jump from the keyboard and the player's own deliveries interleave; the panes must end
    as if the recording had been delivered in order (regression: a batch overtook another)."""
    screens = []
    for playing in (True, False):
        app = replay_app(playing=playing)
        async with app.run_test(size=SIZE) as pilot:
            if playing:
                await wait_for(pilot, lambda: app.source.state.cursor > app.source._first + 3,
                               what="some tokens")
            await pilot.press("end")
            await wait_for(pilot, lambda: isinstance(app.screen, RaceScreen), what="the end")
            await settle(pilot)
            screens.append(screen_lines(app))
    assert screens[0][:-2] == screens[1][:-2]


async def test_replay_keys_and_no_engine_keys():
    app = replay_app(playing=False)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        player = app.source
        await pilot.press("plus", "plus")
        assert player.speed == 4.0
        await pilot.press("minus", "minus", "minus", "minus")
        assert player.speed == 0.5
        await pilot.press("s", "b", "enter", "R", "slash")    # engine keys do nothing here
        assert app.settings.strategy == "kv" and not app.racing      # (the header's settings)
        assert not isinstance(app.focused, Input) and not player.state.token
        bindings = {b.binding.action for b in app.active_bindings.values()}
        assert "replay('toggle')" in bindings and "run" not in bindings
        # (Pilot waits for the app to be idle after a key, and a playing replay keeps it busy
        # until the end; so while it plays, the key's action is called directly.)
        await pilot.press("space")                 # play …
        assert player.state.cursor > player._first
        await pilot.press("home", "space")
        app.action_replay("toggle")                # … and pause: nothing moves any more
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
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.source.state.at_end, what="the end of what is left")
        assert any("cut off" in n.message for n in app._notifications)
        assert app.query_one(TokenStream).generated_text


async def test_a_live_race_recorded_and_replayed_ends_on_the_same_screen(tmp_path):
    path = tmp_path / "race.jsonl.gz"
    live = make_app(max_new_tokens=6, diverge={"paged/sdpa": 3}, record=str(path))
    async with live.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await wait_for(pilot, lambda: live.recorder is not None, what="the recording")
        await pilot.press("R")
        await wait_for(pilot, lambda: isinstance(live.screen, RaceScreen), what="the race")
        await settle(pilot)
        live_screen = screen_lines(live)
    assert live.recorder is None                    # closed with the app

    app = replay_app(path, speed=4.0)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: isinstance(app.screen, RaceScreen), what="the replay")
        await settle(pilot)
        replay_screen = screen_lines(app)
    if os.environ.get("MINILLM_SHOW_SCREENS"):
        print("\n".join(live_screen), "\n".join(replay_screen), sep="\n")
    # Everything but the status bar (live: "● rec", replay: its position) and the footer
    # (each shows its own keys) is the same, character for character, colour for colour.
    assert len(replay_screen) == SIZE[1]
    assert replay_screen[:-2] == live_screen[:-2]
    assert "identical" not in replay_screen[-2] and "tokens differ" in replay_screen[-2]


async def test_record_key_writes_a_replayable_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    app = make_app(max_new_tokens=4)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await pilot.press("r")                  # start recording (a file named by the time)
        assert app.query_one(StatusBar).recording
        await pilot.press("enter")
        await wait_for(pilot, lambda: app.finished, what="the run")
        await pilot.press("r")                  # stop
        assert app.recorder is None and not app.query_one(StatusBar).recording
        await pilot.pause()
        assert any("python main.py replay" in n.message for n in app._notifications)
    (path,) = tmp_path.glob("minillm-*.jsonl.gz")
    rec = read_recording(str(path))
    assert rec.notice is None and rec.header["command"] == "app"
    assert [type(e.event).__name__ for e in rec.envelopes][:3] == ["Ready", "Started", "Prefill"]
