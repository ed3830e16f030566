"""What the server view knows about one batch: the batching engine's events, kept.

The server screen (tui/screens/server.py) and its panes draw from one `BatchView`, fed every
envelope of the batch in order. It keeps only what the events say — the engine's settings,
each request's state and text, the newest pool snapshot and step, the summary — and computes
no figure of its own: TTFT, TPOT and tok/s come from the engine (engine/metrics.py, through
RequestToken, RequestFinished, PoolSnapshot and BatchSummary). A replay that steps back feeds
it again from the start (`reset`).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from engine.events import (BatchStarted, BatchSummary, Failed, PoolSnapshot, RequestAdmitted,
                           RequestArrived, RequestFinished, RequestPreempted, RequestResumed,
                           RequestToken, StepDone)

LOG_LINES = 200        # the newest happenings kept for the log pane


@dataclass
class RequestState:
    """One request as the events have told it so far."""
    request: int
    prompt: str
    prompt_tokens: int
    max_new_tokens: int
    state: str = "waiting"      # waiting | running | preempted | done | stopped | error
    pieces: list[str] = field(default_factory=list)
    cached_tokens: int = 0
    preemptions: int = 0
    ttft_s: float | None = None     # the engine's: its first token's latency (from arrival)
    tpot_s: float | None = None     # the engine's: so far while it runs, then its final one
    reason: str = ""
    error: str | None = None

    @property
    def new_tokens(self) -> int:
        return len(self.pieces)


@dataclass
class BatchView:
    batch_id: int | None = None
    started: BatchStarted | None = None
    requests: dict[int, RequestState] = field(default_factory=dict)
    pool: PoolSnapshot | None = None
    step: StepDone | None = None
    summary: BatchSummary | None = None
    failure: str | None = None
    log: deque = field(default_factory=lambda: deque(maxlen=LOG_LINES))   # (time_s, text, kind)
    changes: int = 0            # bumped by every fed batch: panes redraw when it moves

    def reset(self) -> None:
        self.__init__()

    @property
    def over(self) -> bool:
        return self.summary is not None or self.failure is not None

    def count(self, *states: str) -> int:
        return sum(r.state in states for r in self.requests.values())

    def feed(self, envelopes) -> bool:
        """Take this batch's envelopes (a new BatchStarted starts a new batch); True if any
        belonged to it."""
        taken = False
        for env in envelopes:
            ev = env.event
            if isinstance(ev, BatchStarted):
                self.reset()
                self.batch_id, self.started = env.run, ev
            elif env.run != self.batch_id:
                continue
            else:
                self._take(ev)
            taken = True
        if taken:
            self.changes += 1
        return taken

    def _say(self, time_s: float, text: str, kind: str = "") -> None:
        self.log.append((time_s, text, kind))

    def _take(self, ev) -> None:
        r = self.requests.get(getattr(ev, "request", -1))
        if isinstance(ev, RequestArrived):
            self.requests[ev.request] = RequestState(ev.request, ev.prompt, ev.prompt_tokens,
                                                     ev.max_new_tokens)
            self._say(ev.time_s, f"r{ev.request} arrived: {ev.prompt_tokens} prompt tokens")
        elif isinstance(ev, RequestToken) and r is not None:
            r.pieces.append(ev.text)
            r.state = "running"
            if ev.index == 0:
                r.ttft_s = ev.latency_s
            r.tpot_s = ev.tpot_s
        elif isinstance(ev, RequestAdmitted) and r is not None:
            r.state, r.cached_tokens = "running", ev.cached_tokens
            cached = f", {ev.cached_tokens} from the prefix cache" if ev.cached_tokens else ""
            self._say(ev.time_s, f"r{ev.request} admitted after {ev.queue_s:.2f} s{cached}")
        elif isinstance(ev, RequestPreempted) and r is not None:
            r.state, r.preemptions = "preempted", r.preemptions + 1
            self._say(ev.time_s, f"r{ev.request} preempted: {ev.freed_blocks} blocks freed, "
                                 f"{ev.recompute_tokens} tokens to recompute", "preempt")
        elif isinstance(ev, RequestResumed) and r is not None:
            r.state = "running"
            self._say(ev.time_s, f"r{ev.request} resumed: {ev.cached_tokens} tokens cached, "
                                 f"{ev.recompute_tokens} recomputed")
        elif isinstance(ev, RequestFinished) and r is not None:
            self._finish(r, ev)
        elif isinstance(ev, StepDone):
            self.step = ev
        elif isinstance(ev, PoolSnapshot):
            self.pool = ev
        elif isinstance(ev, BatchSummary):
            self.summary = ev
            self._say(ev.wall_s, "batch stopped" if ev.interrupted else "batch done", "done")
        elif isinstance(ev, Failed):
            self.failure = ev.message
            self._say(self.step.time_s if self.step else 0.0, ev.message, "error")

    def _finish(self, r: RequestState, ev: RequestFinished) -> None:
        if ev.tail:
            r.pieces.append(ev.tail)
        r.reason, r.error = ev.reason, ev.error
        r.ttft_s, r.tpot_s = ev.ttft_s, ev.tpot_s
        r.state = {"error": "error", "cancelled": "stopped"}.get(ev.reason, "done")
        if ev.reason == "error":
            self._say(ev.time_s, f"r{ev.request} failed: {ev.error}", "error")
        elif ev.reason != "cancelled":
            self._say(ev.time_s, f"r{ev.request} done: {len(ev.tokens)} tokens ({ev.reason})",
                      "done")
