"""Snapshot tests: the main screen after a run, in each theme, compared with stored SVGs.

pytest-textual-snapshot 1.1.0 pins syrupy 4.8, which needs pytest < 9, so these use Textual's
own `export_screenshot()` and plain files in tests/tui/snapshots/. After an intended change to
the look, regenerate with:

    MINILLM_UPDATE_SNAPSHOTS=1 python -m pytest tests/tui/test_tui_snapshots.py

and look at the new SVGs in a browser before committing them. A mismatch writes the new
picture to pytest's tmp_path and names it in the failure.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from tui.widgets.latency import LatencyPane

from .conftest import drive, finished, make_app, ready

SNAPSHOTS = Path(__file__).parent / "snapshots"
UPDATE = os.environ.get("MINILLM_UPDATE_SNAPSHOTS", "") not in ("", "0")


def normalise(svg: str) -> str:
    # Rich names CSS classes after a hash of the content; equal pictures give equal hashes,
    # but strip them anyway so a diff shows the real change, not every line renamed.
    return re.sub(r"terminal-\d+", "terminal", svg)


async def finished_run_screenshot(size, **settings) -> str:
    app = make_app(max_new_tokens=24, **settings)
    async with drive(app, size) as (pilot, seen):
        await ready(pilot)
        await pilot.press("enter")              # run the default prompt
        await finished(pilot, seen)
        app.query_one(LatencyPane).redraw()     # the chart timer may not have fired yet
        app.clear_notifications()
        await pilot.pause()
        await pilot.pause()
        return app.export_screenshot(title="Mini LLM")


def check(name: str, svg: str, tmp_path: Path) -> None:
    path = SNAPSHOTS / f"{name}.svg"
    svg = normalise(svg)
    if UPDATE or not path.exists():
        SNAPSHOTS.mkdir(exist_ok=True)
        path.write_text(svg, encoding="utf-8")
        if not UPDATE:
            pytest.fail(f"new snapshot written to {path}; check it and rerun")
        return
    if path.read_text(encoding="utf-8") != svg:
        new = tmp_path / f"{name}.svg"
        new.write_text(svg, encoding="utf-8")
        pytest.fail(f"{name} differs from {path}; the new picture is {new}")


class TestMainScreen:
    """The four panes after a 24-token kv run, at 140×42."""

    @pytest.mark.parametrize("theme", ["dark", "light", "projector"])
    async def test_theme(self, theme, tmp_path):
        svg = await finished_run_screenshot((140, 42), theme=theme)
        check(f"main_{theme}", svg, tmp_path)

    async def test_narrow_layout(self, tmp_path):
        # 90 columns: one pane per band, stacked
        svg = await finished_run_screenshot((90, 50), theme="dark", strategy="paged")
        check("main_narrow_paged", svg, tmp_path)

    async def test_sixteen_colours(self, tmp_path):
        # the heatmap drawn with shade characters, as a 16-colour terminal would get it
        svg = await finished_run_screenshot((140, 42), theme="dark", depth="16")
        check("main_16_colours", svg, tmp_path)
