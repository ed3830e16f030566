"""`python -m tui.measure`'s summary: the bench's medians and spreads, the change against the
engine alone, and its lines in the units every other table uses (no model, no app here: the
measurement itself is a long run, recorded in docs/ui.md)."""

from __future__ import annotations

import pytest

from tui.measure import summary, summary_lines


def test_summary_is_the_bench_median_against_the_engine():
    runs = {"engine": [10.0, 12.0, 11.0], "app": [9.0, 9.9, 9.9]}
    stats = summary(runs)
    assert stats["engine"]["median"] == 11.0 and stats["app"]["median"] == 9.9
    assert stats["engine"]["vs_engine_pct"] == pytest.approx(0.0)
    assert stats["app"]["vs_engine_pct"] == pytest.approx(-10.0)
    assert stats["engine"]["spread_pct"] == pytest.approx(50 * 2 / 11)
    lines = summary_lines("kv/sdpa +c", 60, 3, 1.2, 42.0, stats, runs)
    assert lines[0] == "60 tokens, kv/sdpa +c, 3 rounds, load average at start 1.2, 42 s"
    assert "  app      median 9.9 tok/s ±5%  (-10.0% vs engine)  runs: 9.0, 9.9, 9.9" in lines
