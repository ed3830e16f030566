"""The app against a fake engine: keys, streaming, stop, race, errors, layout.

Each test drives the real `MiniLLMApp` with `run_test()`; the engine is `FakeSource`,
which runs the real serving loop (batching, race comparison) over synthetic events.
"""

from __future__ import annotations

import pytest
from textual.widgets import DataTable, Input

from tui.app import MiniLLMApp
from tui.messages import AttentionUpdated, CacheUpdated
from tui.screens.help import HelpScreen
from tui.screens.race import RaceScreen
from tui.screens.settings import SettingsScreen, parse
from tui.widgets.attention import AttentionPane
from tui.widgets.kv_cache import KVCachePane
from tui.widgets.latency import LatencyPane
from tui.widgets.status_bar import StatusBar
from tui.widgets.token_stream import TokenStream

from .conftest import make_app, ready, wait_for

SIZE = (150, 45)


def notes(app: MiniLLMApp) -> list[str]:
    return [n.message for n in app._notifications]


async def test_ready_shows_model_and_hides_progress():
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        assert app.query_one(StatusBar).model.startswith("fake-model")
        assert app.query_one("#loading").has_class("-done")


async def test_keys_cycle_strategy_and_backend():
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
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
        app.set_backend("triton")
        assert bar.backend == "naive"
        await pilot.pause()
        assert any("unavailable" in n for n in notes(app))


async def test_run_streams_into_every_pane():
    app = make_app(max_new_tokens=20)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await pilot.press("enter")              # run the prompt
        await wait_for(pilot, lambda: app.finished, what="the run to finish")
        fin = app.finished[-1]
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
        assert latency.runs[-1][0] == "kv/sdpa" and len(latency.runs[-1][1]) == 20
        assert "tok/s" in str(app.query_one("#metrics").render())


async def test_tokens_arrive_in_batches_not_one_by_one():
    app = make_app(delay=0.002, max_new_tokens=60)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await pilot.press("enter")
        await wait_for(pilot, lambda: app.finished, what="the run to finish")
        # 60 × (Token, CacheSnapshot, AttentionRow) + Started, Prefill, Finished: few messages
        assert app.events_drawn == 60 * 3 + 3
        assert app.batches_drawn < 20


async def test_stop_cancels_a_run():
    app = make_app(delay=0.02, max_new_tokens=500)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await pilot.press("enter")
        stream = app.query_one(TokenStream)
        await wait_for(pilot, lambda: len(stream.generated_text) > 20, what="some tokens")
        await pilot.press("x")                  # stop
        await wait_for(pilot, lambda: app.finished, what="the run to stop")
        fin = app.finished[-1]
        assert fin.reason == "cancelled" and 0 < len(fin.tokens) < 500
        assert not app.busy
        await pilot.pause()
        assert any("stopped after" in n for n in notes(app))
        await pilot.press("enter")              # and a new run can start afterwards
        assert app.busy


async def test_race_ends_in_a_table_and_a_verdict():
    app = make_app(max_new_tokens=8)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await pilot.press("R")                  # race every strategy/backend combination
        await wait_for(pilot, lambda: isinstance(app.screen, RaceScreen), what="race table")
        combos = app.race_combos()
        assert combos[:3] == [("naive", "sdpa", ""), ("kv", "sdpa", ""), ("paged", "sdpa", "")]
        assert ("kv", "triton", "") not in combos  # unavailable here
        # the exact fast-path options race too: same tokens, only faster
        assert ("kv", "sdpa", "c") in combos and ("kv", "sdpa", "fuse+cols") in combos
        table = app.screen.query_one(DataTable)
        assert table.row_count == len(combos)
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
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await pilot.press("enter")
        await wait_for(pilot, lambda: len(app.finished) == 1)
        await pilot.press("s", "enter")         # paged this time, same prompt
        await wait_for(pilot, lambda: len(app.finished) == 2)
        assert app.query_one(StatusBar).identical is True


@pytest.mark.parametrize("name,value,fallback", [("backend", "triton", "sdpa"),
                                                 ("fast", "fp16", "")])   # fake: no fbgemm
async def test_unavailable_option_on_the_command_line_is_a_notification(name, value, fallback):
    app = make_app(**{name: value})
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        assert getattr(app.settings, name) == fallback
        await pilot.pause()
        assert any(value in n and "unavailable" in n for n in notes(app))


async def test_load_failure_is_a_notification_not_a_crash():
    app = make_app(load_error="model path not found: /nope.gguf")
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: any("did not load" in n for n in notes(app)))
        assert app.query_one(StatusBar).model == "no model"
        await pilot.press("enter")              # a run without a model: another notification
        await wait_for(pilot, lambda: any("no model is loaded" in n for n in notes(app)))
        assert not app.busy


async def test_empty_prompt_warns():
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        app.query_one("#prompt", Input).value = "   "
        await pilot.press("enter")
        assert not app.busy
        await pilot.pause()
        assert any("prompt is empty" in n for n in notes(app))


async def test_prompt_edit_and_submit():
    app = make_app(max_new_tokens=3)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await pilot.press("slash")              # focus the prompt
        assert isinstance(app.focused, Input)
        app.focused.value = ""
        await pilot.press(*"Hello there", "enter")
        await wait_for(pilot, lambda: app.finished)
        assert app.query_one(TokenStream).text.startswith("Hello there")
        assert isinstance(app.focused, TokenStream)


async def test_settings_are_validated_by_the_engine_config():
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await pilot.press("o")                  # open sampling settings
        assert isinstance(app.screen, SettingsScreen)
        app.screen.query_one("#temperature", Input).value = "-1"
        app.screen.query_one("#temperature", Input).focus()
        await pilot.press("enter")              # enter in a field saves
        assert isinstance(app.screen, SettingsScreen)          # refused
        await pilot.pause()
        assert any("temperature must be" in n for n in notes(app))
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


async def test_help_screen_explains_each_pane():
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        from tui.screens.help import HELP
        assert HELP.count("**Why it matters:**") == 8          # 7 panes and step mode
        await pilot.press("escape")
        assert not isinstance(app.screen, HelpScreen)


async def test_small_terminal_message_and_reflow():
    app = make_app()
    async with app.run_test(size=(50, 15)) as pilot:
        assert app.has_class("-too-small")
        assert app.query_one("#too-small").display
        await pilot.resize_terminal(100, 40)     # big enough, but narrow: one column
        await pilot.pause()
        assert not app.has_class("-too-small") and app.has_class("-narrow")
        tokens, att = app.query_one(TokenStream), app.query_one(AttentionPane)
        assert att.region.y > tokens.region.y and att.region.x == tokens.region.x
        await pilot.resize_terminal(160, 45)     # wide: two columns
        await pilot.pause()
        assert not app.has_class("-narrow")
        assert att.region.x > tokens.region.x


async def test_paged_and_naive_cache_views():
    app = make_app(max_new_tokens=20, strategy="paged")
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        kv = app.query_one(KVCachePane)
        await pilot.press("enter")
        await wait_for(pilot, lambda: app.finished)
        await wait_for(pilot, lambda: kv.stats is not None and kv.stats.kind == "paged")
        text = str(kv.render())
        assert "blocks of 16" in text and "▌" in text and "GQA saves" in text
        await pilot.press("s", "enter")         # paged → naive, and run
        await wait_for(pilot, lambda: len(app.finished) == 2)
        await wait_for(pilot, lambda: kv.stats.kind == "none")
        text = str(kv.render())
        assert "nothing is cached" in text
        assert kv.recomputed_total == sum(range(3, 23))      # every position, every step


async def test_attention_keys_and_colour_depths():
    app = make_app(max_new_tokens=12)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await pilot.press("enter")
        await wait_for(pilot, lambda: app.finished)
        att = app.query_one(AttentionPane)
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
    async with app.run_test(size=SIZE) as pilot:
        assert app.theme == "minillm-dark"
        await pilot.press("T")
        assert app.theme == "minillm-light"
        await pilot.press("T")
        assert app.theme == "minillm-projector"


async def test_command_palette_offers_strategies_and_backends():
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        commands = {c.title: c for c in app.get_system_commands(app.screen)}
        assert {"Strategy: naive", "Strategy: paged", "Backend: flash", "Race"} <= set(commands)
        commands["Strategy: paged"].callback()
        assert app.settings.strategy == "paged"


def test_snapshot_messages_replace_older_ones():
    assert CacheUpdated(stats=None).can_replace(CacheUpdated(stats=None))
    assert AttentionUpdated(position=3).can_replace(AttentionUpdated(position=2))
    assert not CacheUpdated(stats=None).can_replace(AttentionUpdated(position=1))


@pytest.mark.slow
async def test_real_engine_process_reports_a_bad_model_path():
    # The real bridge: a spawned engine process that cannot load its model says so, and the
    # app shows it as a notification instead of dying.
    from tui.app import Settings
    from tui.bridge import ProcessSource
    app = MiniLLMApp(Settings(model="/no/such/model.gguf"),
                     source=ProcessSource("/no/such/model.gguf", "cpu", "float32"))
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: any("did not load" in n for n in notes(app)), timeout=120,
                       what="the load failure")
        assert any("model path not found" in n for n in notes(app))
        assert app.query_one(StatusBar).model == "no model"


def test_truecolor_can_be_forced(monkeypatch):
    from tui.app import Settings, force_truecolor
    from tui.fake_engine import FakeSource
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
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        bar = app.query_one(StatusBar)
        assert app.settings.fast == bar.fast == ""
        await pilot.press("f")                  # plain → the C step
        assert app.settings.fast == bar.fast == "c"
        assert "+c" in str(bar.render())
        await pilot.press("enter")
        await wait_for(pilot, lambda: len(app.finished) == 1)
        assert app.source.requests[-1].config.fast.spec() == "c"
        # the latency chart labels the run with its options
        assert app.query_one(LatencyPane).runs[-1][0] == "kv/sdpa +c"
        seen = {app.settings.fast}
        for _ in range(6):
            await pilot.press("f")
            seen.add(app.settings.fast)
        assert "fp16" not in seen                # unavailable on the fake machine: skipped
        assert {"", "c", "fuse+cols", "c+int8", "int8"} <= seen
        app.set_fast("fp16")                    # by name (command palette): refused, said why
        await pilot.pause()
        assert app.settings.fast != "fp16"
        assert any("fp16" in n and "unavailable" in n for n in notes(app))


def test_bad_fast_option_on_the_command_line_is_an_error():
    from engine.cli import build_parser
    from tui.app import Settings, settings_error
    settings = Settings.from_args(build_parser().parse_args(["ui", "--fast", "warp"]))
    assert "warp" in settings_error(settings)
    assert settings_error(Settings.from_args(build_parser().parse_args(["ui", "--fast", "c"]))) \
        is None


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
