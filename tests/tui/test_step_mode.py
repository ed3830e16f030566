"""Step mode in the app (tui/screens/step.py) on the fake engine: open it, step, pick and force a
token, run to the end, race the fork, stop while paused, leave — legible at 80×24 — and a
step-mode recording replayed without torch.

The fake engine pauses through the engine's own Stepper, so every key here travels the real
command queue and the real serving loop.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from types import SimpleNamespace

from rich.cells import cell_len

from engine.config import GenerationConfig
from engine.recording import Recorder, header
from engine.requests import RunRequest, StepCommand
from tui.fake_engine import FakeSession, fake_generate
from tui.screens.help import HELP
from tui.screens.race import RaceScreen, verdict
from tui.screens.step import StepScreen
from tui.widgets.step_candidates import StepCandidates, token_label
from tui.widgets.step_lens import StepLens
from tui.widgets.token_stream import TokenStream

from .conftest import drive, finished, make_app, ready, replays_without_torch, wait_for

ROOT = Path(__file__).resolve().parents[2]
SMALL = (80, 24)


def step_screen(app) -> StepScreen | None:
    return app.screen if isinstance(app.screen, StepScreen) else None


async def paused_at(pilot, index: int):
    """Wait until the step screen shows the pause before token `index`."""
    app = pilot.app
    await wait_for(pilot, lambda: step_screen(app) is not None and step_screen(app).paused
                   and step_screen(app).point.index == index, what=f"the pause at {index}")
    return step_screen(app)


def lines_fit(widget) -> bool:
    """Every line the widget renders fits its content width (nothing wraps or spills)."""
    width = widget.content_region.width
    return all(cell_len(line) <= width for line in widget.render().plain.split("\n"))


async def test_step_force_and_run_to_the_end_at_80x24():
    app = make_app(max_new_tokens=8, sampling=dict(temperature=0.8, top_k=3, seed=1))
    async with app.run_test(size=SMALL) as pilot:
        await ready(pilot)
        await pilot.press("n")                                 # step mode on the prompt
        screen = await paused_at(pilot, 0)
        request = app.source.requests[-1]
        assert request.step and request.run_id == screen.run_id
        candidates, lens = screen.query_one(StepCandidates), screen.query_one(StepLens)
        point = candidates.point
        assert [c.cut for c in point.candidates][3:] == ["top-k"] * 7     # top-k 3 cuts the rest
        assert point.candidates[candidates.cursor].id == point.chosen     # the cursor starts on ◆
        assert "3 of 34 left in the draw" in str(candidates.border_title)
        assert lens.lens.settles_at == 2 and "settles at L2" in str(screen.query_one(
            "#lens-box").border_subtitle)
        # legible at 80×24: every part has room, nothing spills
        assert candidates.region.height >= 2 + 1 + 10 and candidates.region.width >= 40
        assert screen.query_one("#lens-box").region.width >= 28
        assert lines_fit(candidates) and lines_fit(lens)
        assert all(screen.query_one(f"#step-{w}").region.height for w in ("title", "text",
                                                                          "status"))

        await pilot.press("space")                             # the sampler's choice
        screen = await paused_at(pilot, 1)
        assert not screen.forks and len(screen.pieces) == 1
        point = screen.query_one(StepCandidates).point
        await pilot.press("3", "enter")                        # the third candidate: a fork
        screen = await paused_at(pilot, 2)
        fork = screen.forks[0]
        assert fork.index == 1 and fork.token == point.candidates[2].id != point.chosen
        status = str(screen.query_one("#step-status").render())
        assert f"fork at token 1: forced {point.candidates[2].text!r}" in status

        await pilot.press("e")                                 # to the end, no more pauses
        await wait_for(pilot, lambda: screen.finished is not None, what="the run's end")
        assert screen.finished.reason == "length" and len(screen.finished.tokens) == 8
        assert screen.finished.tokens[1] == fork.token
        assert "done: token limit" in str(screen.query_one("#step-status").render())
        assert screen.check_action("race_fork", ()) is True      # now offered in the footer
        assert app.query_one(TokenStream).generated_text == screen.finished.text

        await pilot.press("R")                                 # the fork against the unforced
        await wait_for(pilot, lambda: isinstance(app.screen, RaceScreen), timeout=20,
                       what="the race table")
        race = app.follow.last_race
        assert [r.label for r in race.rows] == ["kv/sdpa", "kv/sdpa fork@1"]
        assert race.rows[1].first_difference == 1 and race.rows[1].forced == fork
        assert f"differs from token 1: forced {fork.text!r} instead of" in verdict(race)


async def test_stop_while_paused_and_leave():
    app = make_app(max_new_tokens=30)
    async with app.run_test(size=SMALL) as pilot:
        await ready(pilot)
        await pilot.press("n")
        await paused_at(pilot, 0)
        await pilot.press("n")
        screen = await paused_at(pilot, 1)
        await pilot.press("x")                                 # stop, while it waits
        await wait_for(pilot, lambda: screen.finished is not None, what="the stop")
        assert screen.finished.reason == "cancelled" and len(screen.finished.tokens) == 1
        assert "done: stopped" in str(screen.query_one("#step-status").render())
        assert not app.follow.busy
        await pilot.press("escape")
        assert step_screen(app) is None


async def test_leaving_lets_the_run_finish_without_stopping_again():
    app = make_app(max_new_tokens=12)
    async with drive(app, size=SMALL) as (pilot, seen):
        await ready(pilot)
        await pilot.press("n")
        await paused_at(pilot, 0)
        await pilot.press("escape")                            # back to the panes
        assert step_screen(app) is None
        fin = await finished(pilot, seen)
        assert len(fin.tokens) == 12 and not app.follow.busy
        assert app.source.requests[-1].step


async def test_the_panes_keys_do_nothing_in_step_mode_and_a_digit_picks():
    app = make_app(max_new_tokens=5)
    async with app.run_test(size=SMALL) as pilot:
        await ready(pilot)
        await pilot.press("n")
        screen = await paused_at(pilot, 0)
        await pilot.press("s", "f", "o")                       # strategy, fast path, settings
        assert app.settings.strategy == "kv" and app.settings.fast == ""
        assert step_screen(app) is screen
        candidates = screen.query_one(StepCandidates)
        await pilot.press("4")
        assert candidates.cursor == 3
        await pilot.pause()                                    # the text previews the pick
        assert str(screen.query_one("#step-text").render()).endswith(
            candidates.point.candidates[3].text)
        await pilot.press("up", "up")
        assert candidates.cursor == 1
        await pilot.press("0")
        assert candidates.cursor == 9
        assert screen.check_action("race_fork", ()) is False   # no finished fork: no R
        await pilot.press("R")                                 # … nor the app's race below
        await pilot.pause()
        assert step_screen(app) is screen and app.follow.last_race is None and not app.follow.race
        await pilot.press("question_mark")
        await pilot.pause()
        assert type(app.screen).__name__ == "HelpScreen"
    assert "## Step mode" in HELP and "`n` step mode" in HELP


async def test_beside_a_lossy_fast_path_the_lens_says_where_it_parts():
    app = make_app(max_new_tokens=3, fast="int8")
    async with app.run_test(size=(200, 50)) as pilot:
        await ready(pilot)
        await pilot.press("n")
        screen = await paused_at(pilot, 0)
        lens = screen.query_one(StepLens)
        assert lens.lens.fast == "int8" and lens.lens.parts_at == 2
        assert screen.query_one("#lens-box").border_subtitle == "int8 parts at L2"
        text = lens.render().plain
        assert "exact" in text and "✗ parts" in text and lines_fit(lens)


def test_token_labels_are_visible_and_fit():
    assert token_label(" the", 8) == "' the'  "
    assert token_label("\n", 6) == "'⏎'   " and token_label("  ", 5) == "'␣␣' "
    assert token_label("\u3000\t", 6) == "'␣⇥'  "
    assert token_label("\x07", 7) == "'\\x07' " and token_label("", 4) == "'∅' "
    assert token_label(" understanding", 8) == "' under…"
    assert cell_len(token_label("中文字符很长", 7)) == 7


def test_a_step_mode_recording_replays_without_torch(tmp_path):
    """Recorded from the fake engine's step-mode run (with a fork); replayed in the app with
    torch (and every model-loading package) unimportable: the step screen opens and follows."""
    session = FakeSession(SimpleNamespace(model=None, tokenizer=None, name="fake"),
                          generate=lambda *a, **k: fake_generate(*a, **k))
    for command in (StepCommand(1, "next"), StepCommand(1, "force", token=20),
                    StepCommand(1, "run")):
        session.step(command)
    path = tmp_path / "step.jsonl"
    rec = Recorder(str(path), header({"prompt": "Deep learning is"}, session.ready(), "test"))
    rec.write([session.envelope(0, session.ready())])
    rec.write(session.run(RunRequest("Deep learning is", GenerationConfig(max_new_tokens=5),
                                     1, step=True)))
    rec.close()
    script = textwrap.dedent(f"""
        import asyncio, sys
        for name in ("torch", "tokenizers", "safetensors", "gguf", "transformers", "triton"):
            sys.modules[name] = None
        from engine.player import Player
        from engine.recording import read_recording
        from tui.app import MiniLLMApp, Settings
        from tui.screens.step import StepScreen
        from tui.widgets.step_candidates import StepCandidates

        async def main():
            app = MiniLLMApp(Settings(), source=Player(read_recording({str(path)!r}),
                                                       playing=False))
            async with app.run_test(size=(80, 24)) as pilot:
                await pilot.pause()
                await pilot.press("right", "right")      # two tokens, each with its next pause
                for _ in range(100):
                    await pilot.pause(0.02)
                    s = app.screen
                    if isinstance(s, StepScreen) and s.point is not None and s.point.index == 2:
                        break
                s = app.screen
                assert isinstance(s, StepScreen), s
                assert s.point.index == 2 and s.forks and s.forks[0].token == 20, s.forks
                assert s.query_one(StepCandidates).live is False      # a replay takes no keys
                await pilot.press("left")                # back one token: rebuilt from the start
                for _ in range(100):
                    await pilot.pause(0.02)
                    if s.point is not None and s.point.index == 1: break
                assert s.point.index == 1 and not s.forks
                await pilot.press("end")
                for _ in range(100):
                    await pilot.pause(0.02)
                    if s.finished is not None: break
                assert s.finished.tokens[1] == 20
            print("replayed", sys.modules["torch"])
        asyncio.run(main())
    """)
    replays_without_torch(script)
