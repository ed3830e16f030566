"""The server view's lanes: one line per request of a batch, all running at once.

    ██ r3  ▶ ━━━━━━──── 23/50  TTFT 0.41 s  TPOT 88 ms  │ … the tail of its text
    ██ r4  ⏸ ━━━───────  9/50  TTFT 0.52 s  TPOT 95 ms  │ … preempted: waits to recompute
    ██ r5  ✓ ━━━━━━━━━━ 50/50  TTFT 0.38 s  TPOT 92 ms  │ … finished
    ██ r6  ▶ ━─────────  1/50  TTFT 0.60 s  TPOT   —    │ … one token: no TPOT yet

The race lanes (tui/widgets/race_lanes.py) with other rows: the requests of a batch run
*together*, so there is no reference to compare with — each lane says where its request is
(· waiting, ▶ running, ⏸ preempted, ✓ done, ■ stopped, ✗ failed), its colour is its blocks'
colour in the pool, and its figures are the engine's (TTFT from its first token; TPOT from
its second, so far while it runs — each RequestToken carries it — then its final one). Where the box is tall enough each request gets a second line: its question (the
end of its prompt) beside its figures, its answer below. The screen scrolls the lanes.
"""

from __future__ import annotations

from rich.cells import cell_len
from rich.text import Text

from .block_pool import request_class, request_css, REQUEST_COLOURS
from .race_lanes import RaceLanes

MARKS = {"waiting": "·", "running": "▶", "preempted": "⏸", "done": "✓", "stopped": "■",
         "error": "✗"}
BAR = 10


def seconds(x: float | None) -> str:
    """0.41 s, 92 ms, or — (not known yet)."""
    if x is None or x != x:
        return "—"
    return f"{x:.2f} s" if x >= 1 else f"{x * 1e3:.0f} ms"


class RequestLanes(RaceLanes):
    """One line per request of the batch in `view` (tui/server_view.py's BatchView)."""

    DEFAULT_CSS = """
    RequestLanes { height: auto; padding: 0 1; background: $surface; }
    """ + request_css("RequestLanes")

    COMPONENT_CLASSES = RaceLanes.COMPONENT_CLASSES | {f"pool--r{i}"
                                                       for i in range(REQUEST_COLOURS)}

    def __init__(self, view, *, id=None) -> None:
        super().__init__(id=id)
        self.view = view

    def difference(self, lane) -> None:
        """Requests of a batch are not compared with each other."""
        return None

    def lines_per_request(self) -> int:
        """Two lines each (the figures and its question, then its answer) when the box is
        tall enough to show every request so; else one."""
        room = self.parent.content_region.height if self.parent is not None else 0
        return 2 if room >= 2 * len(self.view.requests) else 1

    def get_content_height(self, container, viewport, width: int) -> int:
        return max(len(self.view.requests) * self.lines_per_request(), 1)

    def render(self) -> Text:
        style = self.get_component_rich_style
        requests = list(self.view.requests.values())
        if not requests:
            return Text("no requests yet", style("lanes--label"))
        width = max(self.content_region.width, 30)
        digits = len(str(max(r.request for r in requests)))
        two = self.lines_per_request() == 2
        out = Text(no_wrap=True, overflow="crop")
        for r in requests:
            out.append("██", style(request_class(r.request)))
            running = r.state == "running"
            out.append(f" r{r.request:<{digits}} ",
                       style("lanes--running" if running else "lanes--name"))
            mark_style = {"done": "lanes--same", "error": "lanes--differ",
                          "preempted": "lanes--lossy"}.get(r.state, "lanes--label")
            out.append(f"{MARKS.get(r.state, '?')} ", style(mark_style))
            bar = BAR if width >= 70 else 5
            done = min(r.new_tokens, r.max_new_tokens)
            filled = round(bar * done / r.max_new_tokens) if r.max_new_tokens else bar
            out.append("━" * filled, style("lanes--bar-done"))
            out.append("─" * (bar - filled), style("lanes--bar-todo"))
            count = f" {done:>{len(str(r.max_new_tokens))}}/{r.max_new_tokens}"
            figures = (f"  TTFT {seconds(r.ttft_s):>6}  TPOT {seconds(r.tpot_s):>6}"
                       if width >= 70 else f" {seconds(r.ttft_s):>6} {seconds(r.tpot_s):>6}")
            out.append(count + figures + " │ ", style("lanes--label"))
            used = 2 + 2 + digits + 1 + 2 + bar + cell_len(count + figures) + 3
            room = width - used
            if two:                          # its question here, its answer on the next line
                question = " ".join(r.prompt.split())      # its end: what sets it apart
                out.append(question[-room:] if room > 0 else "", style("lanes--label"))
                out.append("\n" + " " * 6)
                room = width - 6
            if r.error:
                out.append(r.error[:max(room, 0)], style("lanes--differ"))
            elif r.state == "waiting" and not r.pieces:
                out.append("waiting for blocks"[:max(room, 0)], style("lanes--label"))
            elif room > 4:
                self._append_tail(out, r, room)
            out.append("\n")
        out.rstrip()
        return out
