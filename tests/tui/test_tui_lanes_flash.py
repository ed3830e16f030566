"""Race lanes and the flash tile animation, driven through the app against the fake engine.

The fake engine's flash events use tiles of 8 keys (so a short run has several tiles) and
compute the running max and sum of made-up scores the way the flash backend does.
"""

from __future__ import annotations

from textual.widgets import DataTable

from tui.screens.race import RaceScreen
from tui.widgets.attention import AttentionPane
from engine.compare import first_difference
from tui.widgets.race_lanes import RaceLanes
from tui.widgets.token_stream import TokenStream

from .conftest import drive, finished, make_app, ready, wait_for


def lanes_text(app) -> str:
    return str(app.query_one(RaceLanes).render())


def test_first_difference():
    assert first_difference([1, 2, 3], [1, 2, 3, 4], reference_done=True, done=False) is None
    assert first_difference([1, 9, 3], [1, 2, 3], reference_done=True, done=False) == 1
    assert first_difference([1, 2, 3, 4], [1, 2, 3], reference_done=True, done=False) == 3
    assert first_difference([1, 2], [1, 2, 3], reference_done=True, done=True) == 2   # stopped short
    assert first_difference([1, 2, 3, 4], [1, 2, 3], reference_done=False, done=False) is None


async def test_race_lanes_stream_side_by_side_and_end_in_the_table():
    app = make_app(delay=0.03, max_new_tokens=12, diverge={"paged/sdpa": 5})
    async with drive(app) as (pilot, seen):
        await ready(pilot)
        await pilot.press("R")                  # race: the lanes take the token stream's place
        lanes = app.query_one(RaceLanes)
        combos = [lane.label for lane in lanes.lanes]
        assert combos == ["naive/sdpa", "kv/sdpa", "paged/sdpa", "kv/naive", "kv/flash",
                          "kv/sdpa +c", "kv/sdpa +c+gguf", "kv/sdpa +fuse+cols"]
        assert lanes.display and not app.query_one(TokenStream).display
        # While the third contestant runs, the first two keep their text and numbers.
        third = lanes.lanes[2]
        await wait_for(pilot, lambda: third.state == "running" and len(third.ids) >= 7,
                       what="the third lane to pass the difference")
        text = lanes_text(app)
        first = lanes.lanes[0]
        assert first.state == "done" and len(first.pieces) == 12
        assert "".join(first.pieces)[-20:] in text        # the reference's text, still shown
        assert "12/12" in text and "tok/s" in text and "TPOT" in text
        assert "ref" in text and "✓" in text             # kv/sdpa agrees with naive/sdpa
        assert "✗@5" in text                              # paged/sdpa differs from token 5 on
        assert "waiting" in text                          # the later contestants
        # The race still ends in the comparison table and the verdict.
        await wait_for(pilot, lambda: isinstance(app.screen, RaceScreen), what="race table")
        assert app.screen.query_one(DataTable).row_count == len(combos)
        assert "paged/sdpa" in str(app.screen.query_one("#verdict").render())
        await pilot.press("escape")             # the table closes; the lanes stay
        assert all(lane.state == "done" and len(lane.ids) == 12 for lane in lanes.lanes)
        assert [lane.same_tokens for lane in lanes.lanes] == [None, True, False] + [True] * (
            len(combos) - 3)
        text = lanes_text(app)
        assert "finished" in text and text.count("12/12") == len(combos)
        await pilot.press("l")                  # back to the token stream …
        assert app.query_one(TokenStream).display and not lanes.display
        await pilot.press("l")                  # … and to the lanes again
        assert lanes.display
        await pilot.press("enter")              # a single run shows the token stream
        assert app.query_one(TokenStream).display and not lanes.display


async def test_race_lanes_fit_an_80x24_terminal():
    app = make_app(max_new_tokens=8, diverge={"kv/flash": 2})
    async with drive(app, size=(80, 24)) as (pilot, seen):
        await ready(pilot)
        await pilot.press("R")
        await wait_for(pilot, lambda: isinstance(app.screen, RaceScreen), what="race table")
        await pilot.press("escape")
        lanes = app.query_one(RaceLanes)
        assert lanes.region.bottom <= 24 - 2     # above the status bar and the footer
        lines = lanes_text(app).splitlines()
        assert len(lines) <= lanes.content_region.height
        assert all(len(line) <= lanes.content_region.width for line in lines)
        for lane in lanes.lanes:                 # every lane has its own line, with its marker
            assert any(lane.label in line for line in lines)
        assert any("kv/flash" in line and "✗@2" in line for line in lines)


async def test_stopping_a_race_marks_the_lanes_that_never_ran():
    # 300 tokens × 30 ms: the first lane cannot finish before the stop, even on a slow machine
    app = make_app(delay=0.03, max_new_tokens=300)
    async with drive(app) as (pilot, seen):
        await ready(pilot)
        await pilot.press("R")
        lanes = app.query_one(RaceLanes)
        await wait_for(pilot, lambda: len(lanes.lanes[0].ids) > 3, what="some tokens")
        await pilot.press("x")
        await wait_for(pilot, lambda: lanes.finished, what="the race to stop")
        assert lanes.lanes[0].state == "stopped"
        assert all(lane.state == "skipped" and not lane.ids for lane in lanes.lanes[1:])
        lines = lanes_text(app).splitlines()[1:]
        assert "stopped" in lines[0] and "not run" in lines[-1]
        assert not any(line.startswith(("✓", "ref")) for line in lines)   # nothing ran to compare


async def test_flash_tiles_animate_with_running_max_and_sum():
    app = make_app(max_new_tokens=40, backend="flash")
    async with drive(app) as (pilot, seen):
        await ready(pilot)
        await pilot.press("enter")
        await finished(pilot, seen)
        att = app.query_one(AttentionPane)
        f = att.flash
        n = len(f.running_max)
        assert f.tile_size == 8 and n == 6      # 3 prompt + 40 new keys in tiles of 8
        text = str(att.render())
        assert f"{n} tiles × 8 keys" in text and "ℓ ← ℓ·e^(m_old − m_new)" in text
        # The timer steps through the tiles on its own.
        seen = {att.flash_tile}
        for _ in range(10):
            await pilot.pause(0.1)
            seen.add(att.flash_tile)
        assert len(seen) >= 3
        await pilot.press("2")                  # the attention pane has the tile keys
        await pilot.press("p")                  # pause: the frame holds still
        held = att.flash_tile
        await pilot.pause(0.4)
        assert att.flash_tile == held and "paused" in str(att.render())
        att.flash_frame = n - 1                 # the last tile …
        await pilot.press("full_stop")          # … step on: every tile consumed
        assert f"all {n} done" in str(att.render())
        await pilot.press("full_stop")          # and round again to tile 0
        text = str(att.render())
        assert "tile 0 of 6" in text and f"m = {f.running_max[0]:.3f}" in text
        assert f"ℓ = Σ e^(s − m) = {f.running_sum[0]:.3f}" in text
        # A tile that raised the max shows the rescale of the sum so far.
        rise = next(i for i in range(1, n) if f.running_max[i] > f.running_max[i - 1])
        att.flash_frame = rise
        text = str(att.render())
        assert f"m {f.running_max[rise - 1]:.3f} → {f.running_max[rise]:.3f}" in text
        assert f"= {f.running_sum[rise]:.3f}" in text
        await pilot.press("m", "m")             # row → matrix → the full flash view
        assert att.mode == "flash" and att.shown_layer == f.layer
        text = str(att.render())
        assert "keys " in text and "row view" not in text
        await pilot.press("m")                  # and back to the heatmap rows
        assert att.mode == "row"


async def test_flash_view_restarts_for_each_run_and_row_view_without_tiles():
    app = make_app(max_new_tokens=20, backend="flash")
    async with drive(app) as (pilot, seen):
        await ready(pilot)
        await pilot.press("enter")
        await finished(pilot, seen)
        att = app.query_one(AttentionPane)
        await pilot.press("2", "m", "m")        # the attention pane, its flash view
        assert att.view == "flash"
        await pilot.press("b", "enter")         # flash → naive backend: no tiles
        await finished(pilot, seen, 2)
        assert att.flash is None and att.view == "row"
        assert "row view: one row per head" in str(att.render())
