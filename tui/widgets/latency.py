"""The latency pane: ms per generated token, this run beside the others, and its numbers."""

from __future__ import annotations

from dataclasses import dataclass, field

from rich.style import Style
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.color import Color
from textual.containers import Vertical
from textual.reactive import reactive
from textual.widgets import Static
from textual_plotext import PlotextPlot

from engine.metrics import tpot_s
from engine.events import Finished, Started, Token, run_label
from engine.remote import server_figures
from engine.units import format_bytes, format_ms, format_number

from ..remote import remote_label


KEEP_SERIES = 10     # a race of every strategy, backend and fast path still fits
CHART_HZ = 4         # chart redraws a second at most
FINISH_REASONS = {
    "length": "reached max tokens",
    "eos": "the model ended it (end-of-sequence token)",
    "stop": "hit a stop string",
    "cancelled": "stopped before the end",
    "error": "failed",
}


def fmt_ms(seconds: float | None) -> str:
    """Whole milliseconds, as the pane's one-line summary has room for (engine/units.py)."""
    return format_ms(seconds, "{:.0f} ms")


def finish_text(reason: str) -> str:
    """A run's end in words: "reached max tokens" rather than "length"."""
    return FINISH_REASONS.get(reason, reason)


@dataclass
class Series:
    """One run on the chart: its name and (generated-token index, ms) points."""
    label: str
    xs: list[int] = field(default_factory=list)
    ys: list[float] = field(default_factory=list)


class LatencyPane(Vertical, can_focus=True):
    """A plotext chart of ms per generated token (naive climbs, kv stays flat) and the run's
    numbers underneath.

    One line per run name: running kv/sdpa again replaces the older kv/sdpa line, so a race's
    contestants all stay and no name appears twice. The y-axis starts at zero (a flat line
    looks flat, whatever its noise) and the x-axis counts generated tokens (a long prompt does
    not push the points to the right edge); the first token, which carries the whole prefill,
    is left out — it is the TTFT below. The legend is a line under the chart, in the series'
    colours, never over the plot. The chart is redrawn by `redraw()` a few times a second at
    most (plotext takes ~9 ms a chart), never per token.
    """

    BINDINGS = [Binding("delete,backspace", "clear_history", "Clear chart")]

    DEFAULT_CSS = """
    LatencyPane { background: $surface; height: 1fr; }
    LatencyPane > PlotextPlot { height: 1fr; }
    LatencyPane > #legend { height: auto; padding: 0 1; color: $text-muted; }
    LatencyPane > #metrics { height: auto; padding: 0 1; color: $text; }
    """

    metrics: reactive[str] = reactive("no run yet")
    """The numbers of the run drawn last, or of the run under way so far."""

    def __init__(self, *, name=None, id=None, classes=None) -> None:
        super().__init__(name=name, id=id, classes=classes)
        self.series: list[Series] = []
        self._dirty = False
        self._ttft: float | None = None          # the run under way: its first token's time
        # Kept, not queried: events may still arrive while the app is closing and its
        # children are already gone; updating a removed Static is harmless, a query is not.
        self.plot, self.legend = PlotextPlot(), Static(id="legend")
        self.metrics_line = Static(id="metrics")

    def compose(self) -> ComposeResult:
        yield self.plot
        yield self.legend
        yield self.metrics_line

    def on_mount(self) -> None:
        self.set_interval(1 / CHART_HZ, self.redraw)

    # ------------------------------------------------------------------ data
    def feed(self, events) -> None:
        """A batch of one run's events."""
        for ev in events:
            if isinstance(ev, Started):
                self._start(run_label(ev.strategy, ev.backend, ev.fast))
            elif isinstance(ev, Token):
                if ev.index == 0:
                    self._ttft = ev.latency_s
                elif self.series:
                    self.series[-1].xs.append(ev.index)
                    self.series[-1].ys.append(ev.latency_s * 1e3)
                self._dirty = True
            elif isinstance(ev, Finished):
                self._finish(ev)
        if self.series and not isinstance(events[-1], Finished):
            s = self.series[-1]
            # ys hold the gaps after the first token (ms); TPOT as engine/metrics.py has it
            tpot = tpot_s([self._ttft or 0.0, *(y / 1e3 for y in s.ys)])
            self.metrics = (f"running {s.label} · {len(s.xs) + (self._ttft is not None)} tokens "
                            f"· TTFT {fmt_ms(self._ttft)} · TPOT so far {fmt_ms(tpot)}")

    def _start(self, label: str) -> None:
        self.series = [s for s in self.series if s.label != label][-(KEEP_SERIES - 1):]
        self.series.append(Series(label))
        self._ttft, self._dirty = None, True
        self.metrics = f"running {label} …"

    def _finish(self, ev: Finished) -> None:
        m = ev.metrics
        if m is None:
            self.metrics = f"{finish_text(ev.reason)}: {ev.error or ''}".rstrip(": ")
            return
        remote = bool(self.series) and remote_label(self.series[-1].label)
        where = (server_figures(ev.server_metrics, ev.server_timings) or "no server figures"
                 if remote else f"process peak {format_bytes(m.peak_memory_bytes)}")
        self.metrics = (f"TTFT {fmt_ms(m.ttft_s)} · TPOT {fmt_ms(m.tpot_s)} · "
                        f"{format_number(m.decode_tokens_per_s)} tok/s · {m.new_tokens} tokens, "
                        f"{finish_text(ev.reason)} · {where}")

    def clear(self) -> None:
        """No runs drawn (a replay starting over)."""
        self.series, self._ttft, self._dirty = [], None, True
        self.metrics = "no run yet"

    # ------------------------------------------------------------------ drawing
    def colours(self) -> list[Color]:
        """A colour per series, from the theme: its accents first, then lighter ones."""
        theme = self.app.current_theme
        base = [Color.parse(c) for c in (theme.primary, theme.accent, theme.success,
                                         theme.secondary, theme.warning, theme.error) if c]
        return base + [c.lighten(0.25) for c in base]

    def watch_metrics(self, text: str) -> None:
        self.metrics_line.update(text)

    def redraw(self) -> None:
        """Rebuild the chart if anything changed since the last call."""
        if not self._dirty:
            return
        self._dirty = False
        plot = self.plot
        plt = plot.plt
        plt.clear_data()
        plt.clear_figure()
        plt.title("ms per generated token")
        colours, top, last, legend = self.colours(), 0.0, 1, Text()
        for i, s in enumerate(self.series):
            colour = colours[i % len(colours)]
            if s.xs:
                plt.plot(s.xs, s.ys, marker="braille", color=colour.rgb)
                top, last = max(top, max(s.ys)), max(last, s.xs[-1])
            legend.append("━━ ", Style(color=colour.rich_color))
            legend.append(f"{s.label}   ")
        top = top * 1.1 if top > 0 else 1.0
        plt.ylim(0, top)
        plt.yticks([0, top / 2, top], ["0", f"{top / 2:.0f}", f"{top:.0f}"])
        plt.xticks(sorted({1, *(max(1, round(last * k / 4)) for k in range(1, 5))}))
        plt.xlabel("generated token")
        plot.refresh()
        self.legend.update(legend)

    # ------------------------------------------------------------------ actions
    def action_clear_history(self) -> None:
        """Forget every line on the chart (the numbers of the last run stay)."""
        metrics = self.metrics
        self.clear()
        self.metrics = metrics
        self.redraw()
        self.notify("latency chart cleared", timeout=2)
