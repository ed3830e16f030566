"""The server view's figures and its log of what happened, drawn from a BatchView
(tui/server_view.py): queue lengths, batch size, preemptions, the engine's throughput and
latency figures, what contiguous reservations would have fitted; arrivals, admissions and
preemptions as they happen."""

from __future__ import annotations

from rich.text import Text
from textual.widget import Widget

from .request_lanes import seconds


def _rate(x: float | None) -> str:
    return "—" if x is None else f"{x:.1f}"


class ServerStats(Widget):
    """Three lines: the queues and the step; tok/s and latency (live, then the summary's
    p50/p99); the paged pool against one contiguous reservation per request."""

    DEFAULT_CSS = """
    ServerStats { height: 3; padding: 0 1; background: $surface; text-wrap: nowrap;
                  text-overflow: ellipsis; }
    ServerStats > .stats--muted { color: $text-muted; }
    ServerStats > .stats--strong { color: $foreground; text-style: bold; }
    ServerStats > .stats--warn { color: $warning; text-style: bold; }
    ServerStats > .stats--error { color: $error; text-style: bold; }
    ServerStats > .stats--good { color: $success; text-style: bold; }
    """

    COMPONENT_CLASSES = {"stats--muted", "stats--strong", "stats--warn", "stats--error",
                         "stats--good"}

    def __init__(self, view, *, id=None) -> None:
        super().__init__(id=id)
        self.view = view

    def render(self) -> Text:
        v, out = self.view, Text(no_wrap=True, overflow="ellipsis")
        style = self.get_component_rich_style
        strong, muted = style("stats--strong"), style("stats--muted")
        pool, step, summary = v.pool, v.step, v.summary
        if v.failure:
            return Text(v.failure, style("stats--error"))
        if v.started is None:
            return Text("waiting for the engine to start the batch…", muted)
        out.append(f"{v.count('waiting', 'preempted')} waiting", strong)
        out.append(" · ", muted)
        out.append(f"{v.count('running')} running", strong)
        out.append(f" · {v.count('done')} done", muted)
        for state, word in (("stopped", "stopped"), ("error", "failed")):
            if v.count(state):
                out.append(f" · {v.count(state)} {word}", style("stats--warn"))
        if step is not None:
            out.append(f" · batch {step.batch} · step {step.step}", muted)
        preempted = pool.preemptions if pool is not None else 0
        out.append(f" · {preempted} preempted", style("stats--warn") if preempted else muted)
        out.append("\n")
        if summary is not None and summary.interrupted and pool is not None:
            # the summary's figures cover finished requests only: say what ran until the stop
            out.append(f"stopped: {_rate(pool.tokens_per_s)} tok/s aggregate until then", strong)
            out.append(f" · {pool.new_tokens} tokens · {summary.finished} requests finished",
                       muted)
        elif summary is not None:
            state = "stopped" if summary.interrupted else "done"
            ttft = seconds(summary.ttft_p50_s), seconds(summary.ttft_p99_s)
            tpot = seconds(summary.tpot_p50_s), seconds(summary.tpot_p99_s)
            hits = ("" if summary.prefix_hit_rate is None else
                    f" · prefix hits {summary.prefix_hit_rate:.0%}")
            long = (f"{state}: {_rate(summary.tokens_per_s)} tok/s aggregate",
                    f" · TTFT p50 {ttft[0]} p99 {ttft[1]} · TPOT p50 {tpot[0]} p99 {tpot[1]}"
                    + hits)
            short = (f"{state}: {_rate(summary.tokens_per_s)} tok/s",
                     f" · TTFT {ttft[0]} / {ttft[1]} · TPOT {tpot[0]} / {tpot[1]} (p50 / p99)")
            words = long if len("".join(long)) <= self.content_region.width else short
            out.append(words[0], strong)
            out.append(words[1], muted)
        elif pool is not None:
            out.append(f"{_rate(pool.tokens_per_s)} tok/s aggregate", strong)
            if self.content_region.width >= 100:
                out.append(f" · {pool.new_tokens} new tokens · prefix cache: "
                           f"{pool.prefix_hit_tokens} of {pool.prefix_lookup_tokens} prompt "
                           f"tokens found", muted)
            else:
                out.append(f" · {pool.new_tokens} tokens · prefix hits "
                           f"{pool.prefix_hit_tokens}/{pool.prefix_lookup_tokens}", muted)
        else:
            out.append("no step yet", muted)
        out.append("\n")
        if pool is not None and pool.requests:
            new = max((r.max_new_tokens for r in v.requests.values()), default=0)
            fit, ran = f"{pool.contiguous_fit} of {pool.requests}", f"{pool.peak_running} at once"
            long = (f"in this memory, one contiguous reservation per request (prompt + {new} new "
                    f"tokens) fits ", f"{fit} requests", " · the paged pool ran up to ", ran)
            short = ("in this memory, contiguous reservations fit ", fit, " · paged ran ", ran)
            words = long if len("".join(long)) <= self.content_region.width else short
            for text, kind in zip(words, ("muted", "warn", "muted", "good")):
                out.append(text, style(f"stats--{kind}"))
        return out


class EventLog(Widget):
    """The newest happenings that fit: arrivals, admissions, preemptions, ends."""

    DEFAULT_CSS = """
    EventLog { height: 1; padding: 0 1; background: $surface; text-wrap: nowrap;
               text-overflow: ellipsis; }
    EventLog > .log--muted { color: $text-muted; }
    EventLog > .log--preempt { color: $warning; text-style: bold; }
    EventLog > .log--error { color: $error; text-style: bold; }
    EventLog > .log--done { color: $success; }
    """

    COMPONENT_CLASSES = {"log--muted", "log--preempt", "log--error", "log--done"}

    def __init__(self, view, *, id=None) -> None:
        super().__init__(id=id)
        self.view = view

    def render(self) -> Text:
        muted = self.get_component_rich_style("log--muted")
        lines = list(self.view.log)[-max(self.content_region.height, 1):]
        out = Text(no_wrap=True, overflow="ellipsis")
        if not lines:
            return Text("arrivals, admissions and preemptions show here", muted)
        for i, (t, text, kind) in enumerate(lines):
            if i:
                out.append("\n")
            out.append(f"{t:6.2f}s ", muted)
            out.append(text, self.get_component_rich_style(f"log--{kind}") if kind else muted)
        return out
