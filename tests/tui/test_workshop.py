"""Workshop sizes: the ten problems a presenter met at 80×24 and 100×30, each driven here at the
size where it showed, plus zoom and the latency chart's history.

Every test runs the real app on the fake engine and reads what a user would see: which widget
has the focus and where it is on screen, the footer's keys, the panes' rendered lines, the
notifications.
"""

from __future__ import annotations

import pytest
from rich.cells import cell_len
from textual.geometry import Region
from textual.widgets import Button, DataTable, Input

from tui.screens.race import RaceScreen
from tui.screens.settings import SettingsScreen
from tui.widgets.attention import AttentionPane
from tui.widgets.kv_cache import KVCachePane
from tui.widgets.latency import LatencyPane
from tui.widgets.prompt import PromptInput
from tui.widgets.race_lanes import RaceLanes
from tui.widgets.status_bar import StatusBar
from tui.widgets.token_stream import TokenStream

from .conftest import drive, finished, make_app, ready, wait_for

SMALL, MEDIUM = (80, 24), (100, 30)


def lines(widget) -> list[str]:
    """The widget as drawn on screen, one string per row (its public render_lines)."""
    return ["".join(seg.text for seg in strip)
            for strip in widget.render_lines(Region(0, 0, *widget.outer_size))]


def footer_keys(app) -> list[str]:
    """The footer's keys that are on screen (not cut off at the right)."""
    width = app.size.width
    return [k.key for k in app.screen.query("FooterKey")
            if k.region.width and k.region.right <= width]


# 1 ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [SMALL, MEDIUM])
async def test_1_every_pane_reachable_and_footer_and_badge_fit(size):
    app = make_app(max_new_tokens=5)
    async with drive(app, size) as (pilot, seen):
        await ready(pilot)
        visited = []
        for _ in range(4):                       # Tab walks the panes (never the prompt) …
            await pilot.press("tab")
            focused = app.focused
            visited.append(focused.id)
            assert app.screen.region.contains_region(focused.region), focused.id   # … in view
        assert set(visited) == {"tokens", "attention", "kv", "latency"}
        for key, pane in (("3", KVCachePane), ("4", LatencyPane), ("1", TokenStream)):
            await pilot.press(key)               # or a digit jumps to one
            assert isinstance(app.focused, pane)
            assert app.screen.region.contains_region(app.focused.region)
        assert {"question_mark", "q"} <= set(footer_keys(app))   # help and quit never cut off
        await pilot.press("enter")
        await finished(pilot, seen)
        await pilot.press("s", "enter")          # the same prompt, paged: compared
        await finished(pilot, seen, 2)
        bar = app.query_one(StatusBar)
        text = str(bar.render())
        assert bar.identical is True and "✓" in text
        assert cell_len(text) <= bar.content_region.width


# 2 ---------------------------------------------------------------------------------------
async def test_2_latency_chart_keeps_every_racer_once_from_zero_with_a_legend_below():
    prompt = " ".join(["word"] * 60)             # a long prompt: positions start at 60
    app = make_app(max_new_tokens=6, prompt=prompt)
    async with drive(app, SMALL) as (pilot, seen):
        await ready(pilot)
        await pilot.press("enter")
        await finished(pilot, seen)
        await pilot.press("R")                   # every contestant, kv/sdpa among them again
        await wait_for(pilot, lambda: isinstance(app.screen, RaceScreen), what="the race")
        latency = app.query_one(LatencyPane)
        labels = [s.label for s in latency.series]
        contestants = len(app.query_one(RaceLanes).lanes)       # 8 on the fake engine
        assert len(labels) == len(set(labels)) == contestants and labels[0] == "naive/sdpa"
        assert all(s.xs == [1, 2, 3, 4, 5] for s in latency.series)   # generated tokens
        latency.redraw()
        legend = str(latency.query_one("#legend").render())
        assert all(label in legend for label in labels)
        chart = "\n".join(lines(latency.query_one("PlotextPlot")))
        ticks = [float(line.split("┤")[0]) for line in chart.splitlines() if "┤" in line]
        assert ticks[-1] == 0 and ticks[0] > 0   # the y-axis starts at zero
        assert not any(label in chart for label in labels)   # no legend over the plot


# 3 ---------------------------------------------------------------------------------------
async def test_3_token_stream_loses_no_character_under_its_scrollbar():
    app = make_app(max_new_tokens=300)
    async with drive(app, SMALL) as (pilot, seen):
        await ready(pilot)
        await pilot.press("enter")
        await finished(pilot, seen)
        stream = app.query_one(TokenStream)
        assert stream.max_scroll_y > 0           # long enough for the scrollbar
        shown = []
        stream.scroll_home(animate=False)
        while True:
            await pilot.pause()
            shown += [line.rstrip("▁▂▃▄▅▆▇█ ").strip("│ ") for line in lines(stream)[1:-1]]
            if stream.scroll_y >= stream.max_scroll_y:
                break
            stream.scroll_page_down(animate=False)
        text = " ".join(" ".join(shown).split())
        for word in stream.generated_text.split()[-30:]:
            assert word in text


# 4 ---------------------------------------------------------------------------------------
async def test_4_settings_take_typing_at_once_and_fit_in_24_rows():
    app = make_app()
    async with drive(app, SMALL) as (pilot, seen):
        await ready(pilot)
        await pilot.press("o")
        assert isinstance(app.screen, SettingsScreen)
        assert isinstance(app.focused, Input) and app.focused.id == "temperature"
        for button in app.screen.query(Button):
            assert app.screen.region.contains_region(button.region), button.id
        await pilot.press("end", *["backspace"] * 5, *"0.5", "enter")   # no Tab first
        assert not isinstance(app.screen, SettingsScreen)
        assert app.settings.sampling["temperature"] == 0.5


# 5 ---------------------------------------------------------------------------------------
async def test_5_letters_never_land_in_the_prompt_unless_asked():
    app = make_app(max_new_tokens=3)
    async with drive(app, SMALL) as (pilot, seen):
        await ready(pilot)
        prompt = app.query_one(PromptInput)
        for _ in range(6):
            await pilot.press("tab")
            assert not isinstance(app.focused, PromptInput)
        await pilot.press("o")                   # the settings, not a letter in the prompt
        assert isinstance(app.screen, SettingsScreen) and prompt.value == "Deep learning is"
        await pilot.press("escape", "slash")     # `/` edits …
        assert app.focused is prompt
        await pilot.press(*" a lot", "escape")   # … typing appends (nothing selected) …
        assert prompt.value == "Deep learning is a lot" and app.focused is not prompt
        await pilot.press("tab", "tab", "tab", "tab", "tab")
        assert app.focused is not prompt         # … and Tab still skips it afterwards


# 6 ---------------------------------------------------------------------------------------
async def test_6_no_stale_or_misleading_numbers():
    app = make_app(delay=0.03, max_new_tokens=30, backend="flash")
    async with drive(app, MEDIUM) as (pilot, seen):
        await ready(pilot)
        latency, bar = app.query_one(LatencyPane), app.query_one(StatusBar)
        await pilot.press("enter")
        await finished(pilot, seen)
        assert "reached max tokens" in latency.metrics and "TPOT 2" in latency.metrics
        await pilot.press("enter")               # the same run again: compared …
        await wait_for(pilot, lambda: "running" in latency.metrics, what="the second run")
        assert "tok/s" not in latency.metrics    # … and the old numbers are not shown
        await finished(pilot, seen, 2)
        assert bar.identical is True
        await pilot.press("slash", "x", "escape")  # the prompt changed: the badge goes
        assert bar.identical is None and "no comparison" in str(bar.render())
        kv = app.query_one(KVCachePane)
        assert "per token: 1.0 KiB = K and V in 4 layers × 256 B" in "\n".join(lines(kv))
        att = app.query_one(AttentionPane)
        await pilot.press("2")
        text = str(att.render())
        assert "layer 0 of 0–3" in text and "each row's own max" in text
        assert att.flash.layer == 0                # the fake engine traces layer 0
        await pilot.press("right_square_bracket")
        assert "flash tiles are traced in layer 0 only" in str(att.render())
        await pilot.press("m", "m")                # the tile view: its layer, said once
        assert att.shown_layer == 0 and "layer 0 head 0" in str(att.render())


async def test_6_race_table_says_how_fast_what_differs_and_what_memory_means():
    app = make_app(max_new_tokens=6, fast="int8", diverge={"kv/sdpa +int8": 3, "paged/sdpa": 2})
    async with drive(app, (140, 40)) as (pilot, seen):
        await ready(pilot)
        await pilot.press("R")
        await wait_for(pilot, lambda: isinstance(app.screen, RaceScreen), what="the race")
        table = app.screen.query_one(DataTable)
        columns = [str(c.label) for c in table.columns.values()]
        assert "× vs naive" in columns and "peak mem" not in columns
        rows = {" ".join(map(str, table.get_row_at(i)[:2])): [str(v) for v in
                                                              table.get_row_at(i)]
                for i in range(table.row_count)}
        assert rows["naive sdpa"][6] == "1.0×" and rows["kv sdpa +c"][6].endswith("×")
        assert rows["kv sdpa +int8"][-2].startswith("≈ @3 expected")   # lossy: expected
        assert rows["paged sdpa"][-2] == "✗ @2"                        # exact: a bug
        assert rows["kv sdpa +c"][-2] == "✓"
        assert [r[-2] for r in rows.values()].count("ref") == 1
        note = str(app.screen.query_one(".note").render())
        assert "2 tokens untimed first" in note and "high-water mark" in note
        assert "reached max tokens" in rows["naive sdpa"]


# 7 ---------------------------------------------------------------------------------------
async def test_7_a_stopped_race_reports_what_ran_and_compares_what_it_could():
    app = make_app(delay=0.03, max_new_tokens=40)
    async with drive(app, SMALL) as (pilot, seen):
        await ready(pilot)
        await pilot.press("R")
        lanes = app.query_one(RaceLanes)
        await wait_for(pilot, lambda: len(lanes.lanes[1].ids) > 5, timeout=20,
                       what="the second contestant under way")
        await pilot.press("x")
        await wait_for(pilot, lambda: isinstance(app.screen, RaceScreen), what="the table")
        table = app.screen.query_one(DataTable)
        same = [str(table.get_row_at(i)[-2]) for i in range(table.row_count)]
        assert same[0] == "ref" and same[1].startswith("✓ (its ") and same.count("ref") == 1
        assert table.row_count == 2             # the others never ran
        assert seen.said("stopped, compared on its") and not seen.said("nothing to compare")
        await pilot.press("escape")
        assert [lane.state for lane in lanes.lanes][2:] == ["skipped"] * (len(lanes.lanes) - 2)


# 8 ---------------------------------------------------------------------------------------
async def test_8_a_failed_load_refuses_cleanly_and_nothing_wedges():
    app = make_app(load_error="model path not found: /nope.gguf")
    async with drive(app, SMALL) as (pilot, seen):
        await wait_for(pilot, lambda: seen.said("did not load"))
        before = len(seen.notes)
        await pilot.press("R")                  # one refusal, no lanes
        await pilot.pause()
        assert len(seen.notes) == before + 1 and seen.said("no model is loaded", "--model")
        assert not app.query_one(RaceLanes).lanes and not app.source.requests
        await pilot.press("enter", "x")
        await pilot.pause()
        assert seen.said("nothing is running") and not seen.said("still loading")


# 9 ---------------------------------------------------------------------------------------
async def test_9_paged_grid_heatmap_scale_and_latency_colours_explain_themselves():
    app = make_app(max_new_tokens=40, strategy="paged")
    async with drive(app, (90, 50)) as (pilot, seen):
        await ready(pilot)
        await pilot.press("enter")
        await finished(pilot, seen)
        kv = app.query_one(KVCachePane)
        grid = str(kv.render()).splitlines()[1]
        assert grid.startswith("███████ ███████ ")   # 3 blocks, each 7 columns and a gap
        legend = next(line for line in kv.render().split("\n") if "seq 0" in line.plain)
        swatch = [span for span in legend.spans if legend.plain[span.start:span.end] == "██"]
        assert swatch and swatch[0].style != kv.get_component_rich_style("kv--label")
        att = app.query_one(AttentionPane)
        assert "0 " in str(att.render()) and "each row's own max" in str(att.render())
        stream = app.query_one(TokenStream)
        await pilot.press("1", "c")
        assert "fast ≤" in str(stream.border_subtitle) and seen.said("latency")
        await pilot.press("c", "k")
        assert seen.said("token shades off") and "off" in str(stream.border_subtitle)


# 10 --------------------------------------------------------------------------------------
async def test_10_screenshot_key_saves_to_the_shots_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))      # no ~/Downloads on a server
    monkeypatch.setenv("MINILLM_CACHE", str(tmp_path / "cache"))
    app = make_app()
    async with drive(app, SMALL) as (pilot, seen):
        await ready(pilot)
        await pilot.press("S")
        await wait_for(pilot, lambda: seen.said("saved"), what="the screenshot")
        (shot,) = (tmp_path / "cache" / "screenshots").glob("minillm-*.svg")
        assert seen.said(str(shot)) and shot.read_text().startswith("<svg")
        assert (tmp_path / "cache" / "screenshots").stat().st_mode & 0o077 == 0
    app = make_app(shots=str(tmp_path / "shots"))
    async with drive(app, SMALL) as (pilot, seen):
        app.deliver_screenshot()                # the palette's Screenshot does the same
        assert len(list((tmp_path / "shots").glob("*.svg"))) == 1


def test_10_at_256_colours_the_app_suggests_truecolor(monkeypatch):
    import asyncio
    from tui.app import MiniLLMApp
    from tui.fake_engine import FakeSource
    from tui.settings import Settings
    from .conftest import drive as drive_
    monkeypatch.setenv("TERM", "xterm-256color")
    monkeypatch.delenv("COLORTERM", raising=False)

    async def main():
        app = MiniLLMApp(Settings(), source=FakeSource())
        async with drive_(app, SMALL) as (pilot, seen):
            await pilot.pause()
            assert app.query_one(AttentionPane).depth == "256"
            assert seen.said("256 colours", "--truecolor")
    asyncio.run(main())


# zoom ------------------------------------------------------------------------------------
async def test_zoom_any_pane_full_screen_with_larger_cells():
    app = make_app(max_new_tokens=20, strategy="paged")
    async with drive(app, SMALL) as (pilot, seen):
        await ready(pilot)
        await pilot.press("enter")
        await finished(pilot, seen)
        att = app.query_one(AttentionPane)
        await pilot.press("2")
        normal = str(att.render()).splitlines()[1]
        await pilot.press("z")
        assert app.screen.maximized is att and att.size.width >= 76
        zoomed = str(att.render()).splitlines()[1]
        assert len(zoomed) - 4 == 2 * (len(normal) - 4)  # every cell two columns wide
        await pilot.press("z")
        assert app.screen.maximized is None
        kv = app.query_one(KVCachePane)
        await pilot.press("3")
        normal = str(kv.render()).splitlines()[1].split(" ")[0]
        await pilot.press("z")
        assert app.screen.maximized is kv
        assert len(str(kv.render()).splitlines()[1].split(" ")[0]) > len(normal) # larger blocks
        await pilot.press("escape", "4", "z")
        latency = app.query_one(LatencyPane)
        plot = latency.query_one("PlotextPlot")
        assert app.screen.maximized is latency and plot.size.height >= 24 - 2 - 6
        await pilot.press("delete")              # clear the chart's history
        assert latency.series == [] and seen.said("cleared")


def test_a_race_before_the_model_is_ready_is_refused_with_the_reason():
    """Which backends and fast paths race depends on what runs here, known once loaded."""
    from engine.config import ConfigError
    from tui.settings import Settings
    with pytest.raises(ConfigError, match="still loading"):
        Settings().race(1, iter(range(2, 20)), None)
