"""The app against a fake engine: keys, streaming, stop, race, errors, layout.

Each test drives the real `MiniLLMApp` with `run_test()`; the engine is `FakeSource`,
which runs the real serving loop (batching, race comparison) over synthetic events.
"""

from __future__ import annotations

import pytest
from textual.widgets import DataTable, Input

from tui.app import MiniLLMApp
from tui.screens.help import HelpScreen
from tui.screens.race import RaceScreen
from tui.screens.settings import SettingsScreen, parse
from tui.widgets.attention import AttentionPane
from tui.widgets.kv_cache import KVCachePane
from tui.widgets.latency import LatencyPane
from tui.widgets.status_bar import StatusBar
from tui.widgets.token_stream import TokenStream

from .conftest import drive, finished, make_app, ready, wait_for


async def test_ready_shows_model_and_hides_progress():
    app = make_app()
    async with drive(app) as (pilot, seen):
        await ready(pilot)
        assert app.query_one(StatusBar).model.startswith("fake-model")
        assert app.query_one("#loading").has_class("-done")


async def test_keys_cycle_strategy_and_backend():
    app = make_app()
    async with drive(app) as (pilot, seen):
        await ready(pilot)
        bar = app.query_one(StatusBar)
        await pilot.press("s")                  # kv → paged
        assert app.settings.strategy == bar.strategy == "paged"
        await pilot.press("s")                  # paged → naive
        assert bar.strategy == "naive"
        await pilot.press("b")                  # sdpa → flash (triton cannot run: skipped)
        assert app.settings.backend == bar.backend == "flash"
        await pilot.press("b")                  # flash → naive (wraps round)
        assert bar.backend == "naive"
        # an unavailable backend chosen by name is refused with a notification
        app.set_option("backend", "triton")
        assert bar.backend == "naive"
        await pilot.pause()
        assert seen.said("triton", "unavailable")


async def test_run_streams_into_every_pane():
    app = make_app(max_new_tokens=20)
    async with drive(app) as (pilot, seen):
        await ready(pilot)
        await pilot.press("enter")              # run the prompt
        fin = await finished(pilot, seen)
        assert fin.reason == "length" and len(fin.tokens) == 20
        stream = app.query_one(TokenStream)
        assert stream.text.startswith("Deep learning is")
        assert stream.generated_text == fin.text
        kv = app.query_one(KVCachePane)
        await wait_for(pilot, lambda: kv.stats is not None and kv.stats.tokens == 23)
        assert "preallocated buffer" in str(kv.render())
        att = app.query_one(AttentionPane)
        assert len(att.rows) == 20
        assert "most attended" in str(att.render())
        latency = app.query_one(LatencyPane)
        # tokens 1…19 on the chart: the first, which carries the prefill, is the TTFT
        assert latency.series[-1].label == "kv/sdpa" and latency.series[-1].xs == list(range(1, 20))
        assert "tok/s" in latency.metrics and "reached max tokens" in latency.metrics


async def test_tokens_arrive_in_batches_not_one_by_one():
    app = make_app(delay=0.002, max_new_tokens=60)
    async with drive(app) as (pilot, seen):
        await ready(pilot)
        await pilot.press("enter")
        await finished(pilot, seen)
        runs = [b for b in seen.batches if any(e.run == 1 for e in b.envelopes)]
        # 60 × (Token, CacheSnapshot, AttentionRow) + Started, Prefill, Finished: few messages
        assert sum(len(b.envelopes) for b in runs) == 60 * 3 + 3
        assert len(runs) < 20


async def test_stop_cancels_a_run():
    app = make_app(delay=0.02, max_new_tokens=500)
    async with drive(app) as (pilot, seen):
        await ready(pilot)
        await pilot.press("enter")
        stream = app.query_one(TokenStream)
        await wait_for(pilot, lambda: len(stream.generated_text) > 20, what="some tokens")
        await pilot.press("x")                  # stop
        fin = await finished(pilot, seen)
        assert fin.reason == "cancelled" and 0 < len(fin.tokens) < 500
        await pilot.pause()
        assert seen.said("stopped after")
        await pilot.press("enter")              # and a new run can start afterwards
        assert len(app.source.requests) == 2


async def test_race_ends_in_a_table_and_a_verdict():
    app = make_app(max_new_tokens=8)
    async with drive(app) as (pilot, seen):
        await ready(pilot)
        await pilot.press("R")                  # race every strategy/backend combination
        await wait_for(pilot, lambda: isinstance(app.screen, RaceScreen), what="race table")
        labels = [lane.label for lane in app.query_one("#lanes").lanes]
        assert labels[:3] == ["naive/sdpa", "kv/sdpa", "paged/sdpa"]
        assert "kv/triton" not in labels          # unavailable here
        # the exact fast-path options race too: same tokens, only faster
        assert "kv/sdpa +c" in labels and "kv/sdpa +fuse+cols" in labels
        table = app.screen.query_one(DataTable)
        assert table.row_count == len(labels)
        assert "identical tokens" in str(app.screen.query_one("#verdict").render())
        bar = app.query_one(StatusBar)
        assert bar.identical is True
        assert bar.delta is not None and bar.delta < 1e-4     # the fake naive backend's 1e-6
        await pilot.press("escape")             # close the table …
        assert not isinstance(app.screen, RaceScreen)
        await pilot.press("t")                  # … and reopen it
        assert isinstance(app.screen, RaceScreen)


async def test_same_prompt_twice_sets_the_badge():
    app = make_app(max_new_tokens=5)
    async with drive(app) as (pilot, seen):
        await ready(pilot)
        await pilot.press("enter")
        await finished(pilot, seen, 1)
        await pilot.press("s", "enter")         # paged this time, same prompt
        await finished(pilot, seen, 2)
        assert app.query_one(StatusBar).identical is True


@pytest.mark.parametrize("name,value,fallback", [("backend", "triton", "sdpa"),
                                                 ("fast", "fp16", "")])   # fake: no fbgemm
async def test_unavailable_option_on_the_command_line_is_a_notification(name, value, fallback):
    app = make_app(**{name: value})
    async with drive(app) as (pilot, seen):
        await ready(pilot)
        assert getattr(app.settings, name) == fallback
        await pilot.pause()
        assert seen.said(value, "unavailable")


async def test_load_failure_is_a_notification_not_a_crash():
    app = make_app(load_error="model path not found: /nope.gguf")
    async with drive(app) as (pilot, seen):
        await wait_for(pilot, lambda: seen.said("did not load"))
        assert app.query_one(StatusBar).model == "no model"
        await pilot.press("enter")              # a run without a model: another notification
        await wait_for(pilot, lambda: seen.said("no model is loaded"))


async def test_empty_prompt_warns():
    app = make_app()
    async with drive(app) as (pilot, seen):
        await ready(pilot)
        app.query_one("#prompt", Input).value = "   "
        await pilot.press("enter")
        await pilot.pause()
        assert seen.said("prompt is empty") and not app.source.requests


async def test_prompt_edit_and_submit():
    app = make_app(max_new_tokens=3)
    async with drive(app) as (pilot, seen):
        await ready(pilot)
        await pilot.press("slash")              # focus the prompt
        assert isinstance(app.focused, Input)
        app.focused.value = ""
        await pilot.press(*"Hello there", "enter")
        await finished(pilot, seen)
        assert app.query_one(TokenStream).text.startswith("Hello there")
        assert isinstance(app.focused, TokenStream)


async def test_settings_are_validated_by_the_engine_config():
    app = make_app()
    async with drive(app) as (pilot, seen):
        await ready(pilot)
        await pilot.press("o")                  # open sampling settings
        assert isinstance(app.screen, SettingsScreen)
        app.screen.query_one("#temperature", Input).value = "-1"
        app.screen.query_one("#temperature", Input).focus()
        await pilot.press("enter")              # enter in a field saves
        assert isinstance(app.screen, SettingsScreen)          # refused
        await pilot.pause()
        assert seen.said("temperature must be")
        app.screen.query_one("#temperature", Input).value = "0.7"
        app.screen.query_one("#max_new_tokens", Input).value = "12"
        await pilot.press("enter")
        assert not isinstance(app.screen, SettingsScreen)
        assert app.settings.max_new_tokens == 12
        assert "T=0.7" in app.query_one(StatusBar).sampling


def test_settings_parse():
    sampling, max_new = parse(dict(temperature="", top_k="40", top_p="", min_p="",
                                   repetition_penalty="", seed="3", max_new_tokens="9"))
    assert sampling == dict(temperature=0.0, top_k=40, top_p=None, min_p=None,
                            repetition_penalty=1.0, seed=3)
    assert max_new == 9
    with pytest.raises(ValueError, match="top k must be a whole number"):
        parse(dict(top_k="x", max_new_tokens="3"))


async def test_help_opens_scrollable_at_once_and_closes():
    app = make_app()
    async with drive(app, size=(80, 24)) as (pilot, seen):
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        scroll = app.screen.query_one("VerticalScroll")
        assert app.focused is scroll                 # no Tab needed before the keys scroll
        await pilot.press("pagedown")
        assert scroll.scroll_y > 0
        await pilot.press("escape")
        assert not isinstance(app.screen, HelpScreen)


async def test_help_explains_every_pane_the_user_sees():
    """Every pane's title on the main screen is a section of the help, and each section says
    why it matters."""
    from textual.widgets import Markdown
    app = make_app()
    async with drive(app, size=(120, 40)) as (pilot, seen):
        titles = {str(w.border_title) for w in app.screen.walk_children() if w.border_title}
        assert {"Token stream", "Attention", "KV cache", "Latency", "Race"} <= titles
        await pilot.press("question_mark")
        await pilot.pause()
        help_text = app.screen.query_one(Markdown)
        headings = {label for level, label, _ in help_text.table_of_contents if level == 2}
        assert titles <= headings, titles - headings
        sections = dict(part.split("\n", 1) for part in help_text.source.split("\n## ")[1:])
        for title in titles:
            assert "Why it matters:" in sections[title], title


async def test_small_terminal_message_and_reflow():
    app = make_app()
    async with app.run_test(size=(50, 15)) as pilot:
        assert app.screen.has_class("-too-small")
        assert app.query_one("#too-small").display
        await pilot.resize_terminal(100, 40)     # big enough, but narrow: one column
        await pilot.pause()
        assert not app.screen.has_class("-too-small") and app.screen.has_class("-narrow")
        tokens, att = app.query_one(TokenStream), app.query_one(AttentionPane)
        assert att.region.y > tokens.region.y and att.region.x == tokens.region.x
        await pilot.resize_terminal(160, 45)     # wide: two columns
        await pilot.pause()
        assert not app.screen.has_class("-narrow")
        assert att.region.x > tokens.region.x


async def test_paged_and_naive_cache_views():
    app = make_app(max_new_tokens=20, strategy="paged")
    async with drive(app) as (pilot, seen):
        await ready(pilot)
        kv = app.query_one(KVCachePane)
        await pilot.press("enter")
        await finished(pilot, seen)
        await wait_for(pilot, lambda: kv.stats is not None and kv.stats.kind == "paged")
        text = str(kv.render())
        assert "blocks of 16" in text and "▌" in text and "GQA saves" in text
        await pilot.press("s", "enter")         # paged → naive, and run
        await finished(pilot, seen, 2)
        await wait_for(pilot, lambda: kv.stats.kind == "none")
        text = str(kv.render())
        assert "nothing is cached" in text
        assert kv.recomputed_total == sum(range(3, 23))      # every position, every step


async def test_attention_keys_and_colour_depths():
    app = make_app(max_new_tokens=12)
    async with drive(app) as (pilot, seen):
        await ready(pilot)
        await pilot.press("enter")
        await finished(pilot, seen)
        att = app.query_one(AttentionPane)
        await pilot.press("2")                  # the attention pane: its keys
        await pilot.press("right_square_bracket", "right_curly_bracket")   # layer 1, head 1
        assert (att.shown_layer, att.shown_head) == (1, 1)
        await pilot.press("m")                  # causal matrix of one head
        assert att.mode == "matrix"
        assert "▀" in str(att.render())         # half blocks: square pixels
        await pilot.press("C", "C")             # truecolor → 256 → 16
        assert att.depth == "16"
        rendered = str(att.render())
        assert "▀" not in rendered and any(ch in rendered for ch in "░▒▓█")


async def test_theme_cycle():
    app = make_app()
    async with drive(app) as (pilot, seen):
        assert app.theme == "minillm-dark"
        await pilot.press("T")
        assert app.theme == "minillm-light"
        await pilot.press("T")
        assert app.theme == "minillm-projector"


async def test_command_palette_offers_strategies_and_backends():
    app = make_app()
    async with drive(app) as (pilot, seen):
        await ready(pilot)
        commands = {c.title: c for c in app.get_system_commands(app.screen)}
        assert {"Strategy: naive", "Strategy: paged", "Backend: flash", "Race"} <= set(commands)
        commands["Strategy: paged"].callback()
        assert app.settings.strategy == "paged"


@pytest.mark.slow
async def test_real_engine_process_reports_a_bad_model_path():
    # The real bridge: a spawned engine process that cannot load its model says so, and the
    # app shows it as a notification instead of dying.
    from tui.settings import Settings
    from tui.bridge import ProcessSource
    app = MiniLLMApp(Settings(model="/no/such/model.gguf"),
                     source=ProcessSource("/no/such/model.gguf", "cpu", "float32"))
    async with drive(app) as (pilot, seen):
        await wait_for(pilot, lambda: seen.said("did not load"), timeout=120,
                       what="the load failure")
        assert seen.said("model path not found")
        assert app.query_one(StatusBar).model == "no model"


def test_truecolor_can_be_forced(monkeypatch):
    from tui.fake_engine import FakeSource
    from tui.settings import Settings, force_truecolor
    monkeypatch.setenv("TERM", "xterm-256color")
    monkeypatch.delenv("COLORTERM", raising=False)
    monkeypatch.delenv("MINILLM_TRUECOLOR", raising=False)
    assert not force_truecolor(Settings())
    assert MiniLLMApp(Settings(), source=FakeSource()).console.color_system == "256"
    monkeypatch.setenv("MINILLM_TRUECOLOR", "1")             # or --truecolor
    assert force_truecolor(Settings())
    assert MiniLLMApp(Settings(), source=FakeSource()).console.color_system == "truecolor"


async def test_fast_path_key_cycles_usable_options_and_runs_carry_them():
    app = make_app(max_new_tokens=4)
    async with drive(app) as (pilot, seen):
        await ready(pilot)
        bar = app.query_one(StatusBar)
        assert app.settings.fast == bar.fast == ""
        await pilot.press("f")                  # plain → the C step
        assert app.settings.fast == bar.fast == "c"
        assert "+c" in str(bar.render())
        await pilot.press("enter")
        await finished(pilot, seen)
        assert app.source.requests[-1].config.fast.spec() == "c"
        # the latency chart labels the run with its options
        assert app.query_one(LatencyPane).series[-1].label == "kv/sdpa +c"
        chosen = {app.settings.fast}
        for _ in range(6):
            await pilot.press("f")
            chosen.add(app.settings.fast)
        assert "fp16" not in chosen              # unavailable on the fake machine: skipped
        assert {"", "c", "fuse+cols", "c+int8", "int8"} <= chosen
        app.set_option("fast", "fp16")          # by name (command palette): refused, said why
        await pilot.pause()
        assert app.settings.fast != "fp16"
        assert seen.said("fp16", "unavailable")


def test_bad_fast_option_on_the_command_line_is_an_error():
    from cli.parser import build_parser
    from tui.settings import Settings
    settings = Settings.from_args(build_parser().parse_args(["ui", "--fast", "warp"]))
    assert "warp" in settings.error()
    assert Settings.from_args(build_parser().parse_args(["ui", "--fast", "c"])).error() is None


def test_the_engine_log_lives_in_the_private_cache(tmp_path, monkeypatch):
    """The engine process appends its output to engine.log: in a folder others could write to,
    a FIFO planted under that name would block the open() forever, a symlink would redirect
    it. The log goes under $MINILLM_CACHE, in a folder only this user may write to."""
    import os
    import stat
    from tui.bridge import log_path
    monkeypatch.setenv("MINILLM_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir(mode=0o777)
    os.chmod(tmp_path / "cache", 0o777)
    assert log_path() == str(tmp_path / "cache" / "engine.log")
    assert stat.S_IMODE((tmp_path / "cache").stat().st_mode) & 0o022 == 0
