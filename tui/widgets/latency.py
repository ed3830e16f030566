"""The latency pane: per-token latency against position, this run over the previous ones."""

from __future__ import annotations

import math

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Static
from textual_plotext import PlotextPlot

from .kv_cache import human_bytes

KEEP_RUNS = 6      # a race of every strategy and backend still fits


def fmt_ms(seconds: float) -> str:
    return "—" if seconds is None or math.isnan(seconds) else f"{seconds * 1e3:.0f} ms"


def fmt_num(x: float) -> str:
    return "—" if x is None or math.isnan(x) else f"{x:.1f}"


class LatencyPane(Vertical):
    """A plotext chart (naive climbs with position, kv stays flat) and the run's numbers.

    The chart is redrawn by `redraw()` a few times a second at most (plotext takes ~9 ms per
    chart), never per token.
    """

    DEFAULT_CSS = """
    LatencyPane { background: $surface; height: 1fr; }
    LatencyPane > PlotextPlot { height: 1fr; }
    LatencyPane > #metrics { height: auto; padding: 0 1; color: $text; }
    """

    def __init__(self, *, name=None, id=None, classes=None) -> None:
        super().__init__(name=name, id=id, classes=classes)
        self.runs: list[tuple[str, list[int], list[float]]] = []   # (label, positions, ms)
        self.dirty = False

    def compose(self) -> ComposeResult:
        yield PlotextPlot()
        yield Static("TTFT — · TPOT — · — tok/s · peak —", id="metrics")

    def reset(self) -> None:
        """No runs drawn (a replay starting over)."""
        self.runs.clear()
        self.dirty = True
        self.query_one("#metrics", Static).update("TTFT — · TPOT — · — tok/s · peak —")

    def start_run(self, label: str) -> None:
        self.runs.append((label, [], []))
        del self.runs[:-KEEP_RUNS]
        self.dirty = True

    def add_points(self, points: list[tuple[int, float]]) -> None:
        if not self.runs:
            self.start_run("run")
        _, xs, ys = self.runs[-1]
        for x, y in points:
            xs.append(x)
            ys.append(y * 1e3)
        self.dirty = True

    def show_metrics(self, m, reason: str = "") -> None:
        text = (f"TTFT {fmt_ms(m.ttft_s)} · TPOT {fmt_ms(m.tpot_s)} · "
                f"{fmt_num(m.decode_tokens_per_s)} tok/s · {m.new_tokens} tokens · "
                f"peak {human_bytes(m.peak_memory_bytes)}")
        if reason:
            text += f" · {reason}"
        self.query_one("#metrics", Static).update(text)

    def redraw(self) -> None:
        """Rebuild the chart if anything changed since the last call."""
        if not self.dirty:
            return
        self.dirty = False
        plot = self.query_one(PlotextPlot)
        plt = plot.plt
        plt.clear_data()
        plt.clear_figure()
        plt.title("latency per token (ms) vs position")
        for label, xs, ys in self.runs:
            # The first token carries the prefill; it would flatten everything else.
            if len(xs) > 1:
                plt.plot(xs[1:], ys[1:], label=label, marker="braille")
        plt.xlabel("position")
        plot.refresh()
