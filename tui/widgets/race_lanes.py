"""The race lanes: N runs stacked one above the other, text and numbers live.

A race's contestants today; any set of labelled runs tomorrow (a server's requests, remote
endpoints): a lane is a run id and a label, fed that run's events.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from rich.cells import cell_len
from rich.style import Style
from rich.text import Text
from textual.widget import Widget

from engine.compare import first_difference
from engine.config import ConfigError, FastPathConfig
from engine import metrics
from engine.events import Finished, Started, Token
from engine.remote import server_figures
from engine.units import format_ms, format_number

from ..remote import remote_label

BAR_MIN, BAR_MAX = 6, 24


@dataclass
class Lane:
    """One contestant as the lanes see it: its tokens so far and its numbers."""
    run_id: int
    label: str                                       # "kv/sdpa +c", or any name
    max_tokens: int
    lossy: bool = False                              # expected to differ (lossy weights)
    state: str = "waiting"               # waiting | running | done | stopped | skipped | error
    pieces: list[str] = field(default_factory=list)  # text of each generated token
    ids: list[int] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    ttft_s: float = math.nan
    tpot_s: float = math.nan
    tokens_per_s: float = math.nan
    error: str | None = None
    same_tokens: bool | None = None                  # the engine's verdict, once the race ends
    remote: bool = False                             # a server's run (--endpoint)
    first_difference: int | None = None              # the engine's, once the race ends
    server: str = ""                                 # the server's own figures, in words
    server_ttft_s: float | None = None               # the server's own TTFT, if it says

    def live_numbers(self) -> None:
        """TTFT, TPOT and tok/s from the token latencies so far, as engine/metrics.py defines
        them (the first token carries the prefill, so TPOT averages the others)."""
        self.ttft_s = metrics.ttft_s(self.latencies)
        self.tpot_s = metrics.tpot_s(self.latencies)
        self.tokens_per_s = metrics.decode_tokens_per_s(self.tpot_s)


def lossy_label(label: str) -> bool:
    """Is a run named "kv/sdpa +c+int8" expected to differ (a fast path with lossy weights)?"""
    try:
        return FastPathConfig.from_spec(label.partition(" +")[2]).lossy
    except ConfigError:
        return False


def _clip(text: str, cells: int) -> str:
    """`text` on one line of at most `cells` cells, with … where it was cut."""
    text = " ".join(text.split())
    return text if cell_len(text) <= cells else text[:max(cells - 1, 0)] + "…"


class RaceLanes(Widget, can_focus=True):
    """One lane per contestant of a race, stacked so they compare at a glance.

    Each lane: ✓ (same tokens as the reference, the first contestant, so far) or ✗@i (the first
    index where they differ, with the differing tokens drawn as errors; ≈@i for a lane that is
    expected to differ, a lossy fast path), its label,
    a progress bar of tokens done out of max, tok/s and TPOT as they come, and the tail of its
    text clipped to the lane. Finished lanes keep their text and numbers, so the last lane ends
    next to all the others.

    The contestants run one after another in the engine process, not at the same time: run
    concurrently on the same cores (or the same GPU) they would compete for compute and memory
    bandwidth, and each one's tok/s and TPOT would measure the contention, not the strategy.
    Only one lane is ever "running"; "side by side" is about reading them, not running them.

    The app feeds it batches (`feed`, ~12 a second) and it repaints once per batch.
    """

    DEFAULT_CSS = """
    RaceLanes { background: $surface; padding: 0 1; height: 1fr; }
    RaceLanes > .lanes--label { color: $text-muted; }
    RaceLanes > .lanes--name { color: $foreground; text-style: bold; }
    RaceLanes > .lanes--running { color: $accent; text-style: bold; }
    RaceLanes > .lanes--same { color: $success; text-style: bold; }
    RaceLanes > .lanes--differ { color: $error; text-style: bold; }
    RaceLanes > .lanes--lossy { color: $warning; text-style: bold; }
    RaceLanes > .lanes--bar-done { color: $primary; }
    RaceLanes > .lanes--bar-todo { color: $block-free; }
    RaceLanes > .lanes--even { color: $token-even; }
    RaceLanes > .lanes--odd { color: $token-odd; }
    """

    COMPONENT_CLASSES = {"lanes--label", "lanes--name", "lanes--running", "lanes--same",
                         "lanes--differ", "lanes--lossy",
                         "lanes--bar-done", "lanes--bar-todo", "lanes--even",
                         "lanes--odd"}

    def __init__(self, *, name=None, id=None, classes=None) -> None:
        super().__init__(name=name, id=id, classes=classes)
        self.lanes: list[Lane] = []
        self.prompt = ""
        self.finished = False          # the race is over (RaceFinished arrived)
        self.cancelled = False
        self.warmup = 0

    # ------------------------------------------------------------------ data
    def start(self, contestants: list[tuple[int, str]], max_tokens: int, prompt: str,
              warmup: int = 0) -> None:
        """A new race: one waiting lane per (run_id, label), in running order; `warmup`:
        tokens each ran untimed before its timed run."""
        self.warmup = warmup
        self.lanes = [Lane(run_id, label, max_tokens, lossy_label(label),
                           remote=remote_label(label)) for run_id, label in contestants]
        self.prompt, self.finished, self.cancelled = prompt, False, False
        self.refresh()

    def clear(self) -> None:
        """No race (a replay starting over)."""
        self.start([], 0, "")

    def lane(self, run_id: int) -> Lane | None:
        return next((lane for lane in self.lanes if lane.run_id == run_id), None)

    def feed(self, run_id: int, events) -> None:
        """One batch of engine events for one contestant; one repaint."""
        lane = self.lane(run_id)
        if lane is None:
            return
        for ev in events:
            if isinstance(ev, Started):
                lane.state = "running"
            elif isinstance(ev, Token):
                lane.state = "running"
                lane.pieces.append(ev.text)
                lane.ids.append(ev.id)
                lane.latencies.append(ev.latency_s)
            elif isinstance(ev, Finished):
                self._finish_lane(lane, ev)
        if lane.state == "running":
            lane.live_numbers()
        self.refresh()

    def _finish_lane(self, lane: Lane, ev) -> None:
        lane.live_numbers()
        if ev.tail:
            lane.pieces.append(ev.tail)
        if ev.reason == "error":
            lane.state, lane.error = "error", ev.error or "error"
            return
        lane.state = "stopped" if ev.reason == "cancelled" else "done"
        lane.server = server_figures(ev.server_metrics, ev.server_timings)
        if ev.server_metrics is not None:
            lane.server_ttft_s = ev.server_metrics.ttft_s
        m = ev.metrics
        if m is not None:             # the engine's own numbers replace the running estimate
            lane.ttft_s, lane.tpot_s, lane.tokens_per_s = m.ttft_s, m.tpot_s, m.decode_tokens_per_s

    def fail(self, run_id: int, text: str) -> None:
        lane = self.lane(run_id)
        if lane is not None:
            lane.state, lane.error = "error", text
            self.refresh()

    def finish(self, race) -> None:
        """The race is over (a RaceFinished message): take the engine's verdicts; lanes that
        never started were skipped by a stop."""
        self.finished, self.cancelled = True, race.cancelled
        for lane, row in zip(self.lanes, race.rows):
            lane.same_tokens, lane.first_difference = row.same_tokens, row.first_difference
            if row.error and lane.state != "error":
                lane.state, lane.error = "error", row.error
        for lane in self.lanes:
            if lane.state == "waiting":
                lane.state = "skipped"           # the race was stopped before its turn
            elif lane.state == "running":
                lane.state = "stopped"
        self.refresh()

    @property
    def reference(self) -> Lane | None:
        """The lane the others are compared with: the first that ran without an error (as the
        engine's race comparison does; never a remote one)."""
        return next((lane for lane in self.lanes if lane.state in ("running", "done")
                     and lane.error is None and not lane.remote), None)

    def difference(self, lane: Lane) -> int | None | str:
        """'ref' for the reference, None while waiting or identical so far, else the first
        differing token index."""
        ref = self.reference
        if ref is None or lane.state in ("waiting", "skipped", "error"):
            return None
        if lane is ref:
            return "ref"
        if lane.remote and (self.finished or min(lane.ids, default=0) < 0):
            return lane.first_difference        # the engine's verdict (no ids: only that)
        return first_difference(lane.ids, ref.ids, done=lane.state == "done",
                                reference_done=ref.state == "done")

    # ------------------------------------------------------------------ drawing
    def render(self) -> Text:
        muted = self.get_component_rich_style("lanes--label")
        if not self.lanes:
            return Text("no race yet — press R to race the prompt through every "
                        "strategy/backend", muted)
        width = max(self.size.width - 2, 20)          # inside the padding
        height = max(self.size.height, 1)
        n = len(self.lanes)
        out = Text(no_wrap=True, overflow="crop")
        lines_left = height
        if height >= 2 * n + 1:                       # room for a title line
            running = sum(lane.state in ("done", "stopped", "error") for lane in self.lanes)
            state = ("stopped" if self.cancelled else "finished") if self.finished else \
                f"{running}/{n} finished"
            out.append(self._title(state, width), muted)
            out.append("\n")
            lines_left -= 1
        per_lane = max(lines_left // n, 1)
        for lane in self.lanes:
            if per_lane == 1:
                self._render_compact(out, lane, width)
            else:
                self._render_header(out, lane, width)
                self._render_text(out, lane, width, per_lane - 1)
        out.rstrip()
        return out

    def _title(self, state: str, width: int) -> str:
        warm = " (each warmed up first, untimed)" if self.warmup else ""
        title = (f"race · {state} · one contestant at a time{warm} · ✓/✗ vs the first · "
                 f"t table · l token view")
        return title if cell_len(title) <= width else f"race · {state} · ✓/✗ vs the first"

    def _marker(self, lane: Lane) -> tuple[str, Style]:
        diff = self.difference(lane)
        style = self.get_component_rich_style
        if lane.state == "error":
            return "error", style("lanes--differ")
        if lane.state in ("waiting", "skipped"):
            return "·", style("lanes--label")
        if diff == "ref":
            return "ref", style("lanes--name")
        if self.reference is None:               # nothing ran to the end to compare with
            return "—", style("lanes--label")
        if lane.remote and self.finished and lane.same_tokens is None:
            return "—", style("lanes--label")        # not compared (the table says why)
        if lane.remote and diff is None and min(lane.ids, default=-1) < 0:
            return "…", style("lanes--label")        # no ids: compared by the engine at the end
        if diff is None:
            return "✓", style("lanes--same")
        if lane.lossy:
            return f"≈@{diff}", style("lanes--lossy")
        return f"✗@{diff}", style("lanes--differ")

    def _bar(self, out: Text, lane: Lane, width: int) -> None:
        done = min(len(lane.ids), lane.max_tokens)
        filled = round(width * done / lane.max_tokens) if lane.max_tokens else width
        out.append("━" * filled, self.get_component_rich_style("lanes--bar-done"))
        out.append("─" * (width - filled), self.get_component_rich_style("lanes--bar-todo"))

    def _numbers(self, lane: Lane, wide: bool, ttft: bool = False) -> str:
        count = f"{len(lane.ids):>{len(str(lane.max_tokens))}}/{lane.max_tokens}"
        text = f" {count} {format_number(lane.tokens_per_s, '{:6.1f}')} tok/s"
        if wide:
            text += f" · TPOT {format_ms(lane.tpot_s, '{:5.1f}')} ms"
        if ttft:                                 # a remote lane: the network is in its TTFT
            text += f" · TTFT {format_ms(lane.ttft_s, '{:.0f}')} ms"
            if lane.server_ttft_s is not None:
                text += f" (server {format_ms(lane.server_ttft_s, '{:.0f}')})"
        return text

    def _append_name(self, out: Text, lane: Lane, label_width: int) -> None:
        marker, marker_style = self._marker(lane)
        out.append(f"{marker:<6}", marker_style)
        name_style = self.get_component_rich_style(
            "lanes--running" if lane.state == "running" else "lanes--name")
        out.append(f"{lane.label:<{label_width}} ", name_style)

    def _label_width(self) -> int:
        return max(cell_len(lane.label) for lane in self.lanes)

    def _render_header(self, out: Text, lane: Lane, width: int) -> None:
        label_width = self._label_width()
        fixed = 6 + label_width + 1
        state = {"waiting": " waiting", "stopped": " stopped", "skipped": " not run",
                 "error": ""}.get(lane.state, "")
        # the most that fits: (a remote lane's TTFT,) TPOT, then the count and tok/s only
        for wide, ttft in ((True, True), (False, True), (True, False), (False, False)):
            numbers = self._numbers(lane, wide, ttft and lane.remote)
            if fixed + BAR_MIN + cell_len(numbers + state) <= width:
                break
        bar = max(min(width - fixed - cell_len(numbers + state), BAR_MAX), BAR_MIN)
        self._append_name(out, lane, label_width)
        self._bar(out, lane, bar)
        out.append(numbers)
        out.append(state, self.get_component_rich_style("lanes--label"))
        out.append("\n")

    def _render_compact(self, out: Text, lane: Lane, width: int) -> None:
        """One line per lane (a short pane): marker, name, bar, count, tok/s, then text."""
        label_width = self._label_width()
        self._append_name(out, lane, label_width)
        self._bar(out, lane, BAR_MIN)
        numbers = self._numbers(lane, wide=False) + " │ "
        out.append(numbers, self.get_component_rich_style("lanes--label"))
        room = width - (6 + label_width + 1 + BAR_MIN + cell_len(numbers))
        if room > 4 and lane.error:
            out.append(_clip(lane.error, room), self.get_component_rich_style("lanes--differ"))
        elif room > 4:
            self._append_tail(out, lane, room)
        out.append("\n")

    def _render_text(self, out: Text, lane: Lane, width: int, lines: int) -> None:
        """The lane's text, its last `lines` × `width` cells, wrapped by cell and indented."""
        indent = 6
        room = max(width - indent, 8)
        tail = Text()
        self._append_tail(tail, lane, room * lines)
        if lane.error:                       # one line; the race table has it in full
            tail = Text(_clip(lane.error, room), self.get_component_rich_style("lanes--differ"))
        elif lane.server and lines > 1:      # a remote lane: the server's figures first
            text_tail = Text()
            self._append_tail(text_tail, lane, room * (lines - 1))
            tail = Text(_clip(lane.server, room).ljust(room),
                        self.get_component_rich_style("lanes--label"))
            tail.append_text(text_tail)
        n = len(tail.plain)
        rows = tail.divide(range(room, n, room)) if n else []
        rows = rows[-lines:]
        for i in range(lines):
            out.append(" " * indent)
            if i < len(rows):
                out.append_text(rows[i])
            out.append("\n")

    def _append_tail(self, out: Text, lane: Lane, cells: int) -> None:
        """As many of the lane's last tokens as fit in `cells`, alternating shades; tokens from
        the first difference on in the error colour. Newlines are shown as ⏎."""
        diff = self.difference(lane)
        even = self.get_component_rich_style("lanes--even")
        odd = self.get_component_rich_style("lanes--odd")
        bad = self.get_component_rich_style("lanes--differ")
        parts: list[tuple[str, Style]] = []
        used = 0
        for i in range(len(lane.pieces) - 1, -1, -1):
            piece = lane.pieces[i].replace("\n", "⏎")
            w = len(piece)
            style = bad if isinstance(diff, int) and i >= diff and not lane.lossy else (
                odd if i % 2 else even)
            if used + w > cells:
                if used < cells:
                    parts.append(("…" + piece[len(piece) - (cells - used) + 1:], style))
                break
            parts.append((piece, style))
            used += w
        for piece, style in reversed(parts):
            out.append(piece, style)
