"""The engine thread: one BatchEngine, stepped in its own thread; HTTP handlers talk to it
through tickets.

    HTTP side (asyncio, many requests)             engine thread (one)
    ─────────────────────────────────             ───────────────────
    ticket = worker.submit(ids, config)  ──add──▶  engine.add → request id
    async for events in ticket: …        ◀─events─ engine.step() → each request's events,
    worker.cancel(ticket)                ──cancel─▶ engine.cancel: blocks freed at once

Nothing but this thread touches the engine (BatchEngine is not thread-safe, and need not be):
commands wait in a queue and are taken between steps, so a new request joins the batch at the
next step and a cancelled one leaves it at the next step boundary — its KV blocks back in the
pool before the next forward. A step's events are grouped by request and handed to each
ticket's asyncio queue in one call (`loop.call_soon_threadsafe`): one wake-up per request per
step, however many events. With no request in the engine the thread sleeps on the queue.

The Prometheus figures (serve/metrics.py) are updated here, from the same events.
"""

from __future__ import annotations

import asyncio
import dataclasses
import queue
import threading
from collections import defaultdict

from engine import events as be
from engine.session import error_message

from .metrics import FINISHED_REASONS, ServerMetrics


class Ticket:
    """One request's line to the engine thread; iterate it (async) for batches of its events,
    the last batch ending with RequestFinished."""

    def __init__(self, ids: list[int], config, loop: asyncio.AbstractEventLoop):
        self.ids, self.config, self.loop = ids, config, loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.request: int | None = None      # the engine's id, set by the engine thread
        self.finished = False                # RequestFinished was delivered

    def deliver(self, events: list) -> None:
        """From the engine thread."""
        self.loop.call_soon_threadsafe(self.queue.put_nowait, events)

    def __aiter__(self):
        return self

    async def __anext__(self) -> list:
        if self.finished:
            raise StopAsyncIteration
        events = await self.queue.get()
        if any(isinstance(e, be.RequestFinished) for e in events):
            self.finished = True
        return events


class EngineWorker:
    def __init__(self, engine, metrics: ServerMetrics):
        self.engine, self.metrics = engine, metrics
        self.commands: queue.Queue = queue.Queue()
        self.tickets: dict[int, Ticket] = {}          # engine request id → ticket
        self.prompt_tokens: dict[int, int] = {}
        self.thread = threading.Thread(target=self._main, name="engine", daemon=True)
        self.error: str | None = None                 # why the thread ended, if it did
        self._publish_load()

    # ------------------------------------------------------------------ HTTP side
    def start(self) -> None:
        self.thread.start()

    @property
    def alive(self) -> bool:
        return self.thread.is_alive()

    def submit(self, ids: list[int], config) -> Ticket:
        ticket = Ticket(ids, config, asyncio.get_running_loop())
        self.commands.put(("add", ticket))
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """Stop the request (a client that left): its slot and KV blocks are freed at the next
        step boundary. Harmless after it finished."""
        if not ticket.finished:
            self.commands.put(("cancel", ticket))

    def stop(self, timeout: float = 5.0) -> None:
        self.commands.put(("stop", None))
        self.thread.join(timeout)

    # ------------------------------------------------------------------ engine thread
    def _main(self) -> None:
        try:
            while True:
                block = not self.engine.scheduler.has_work()
                if not self._take_commands(block):
                    break
                if self.engine.has_work():
                    self._step()
        except BaseException as exc:        # noqa: BLE001 — said on /health, then re-raised
            self.error = error_message(exc)
            raise
        finally:
            self.engine.cancel_all()
            self._route(self.engine.drain())

    def _take_commands(self, block: bool) -> bool:
        """Apply waiting commands (waiting for one if `block`); False on stop."""
        while True:
            try:
                kind, ticket = self.commands.get(block=block)
            except queue.Empty:
                return True
            block = False
            if kind == "stop":
                return False
            if kind == "add":
                rid = self.engine.add(ticket.ids, ticket.config)
                ticket.request = rid
                self.tickets[rid] = ticket
                self.prompt_tokens[rid] = len(ticket.ids)
            elif kind == "cancel" and ticket.request in self.tickets:
                self.engine.cancel(ticket.request)
            self._route(self.engine.drain())

    def _step(self) -> None:
        try:
            events = self.engine.step()
        except Exception as exc:             # noqa: BLE001 — fail the batch, keep serving
            message = f"the engine failed: {error_message(exc)}"
            for rid in list(self.tickets):
                self.engine.cancel(rid)
            events = [_as_error(e, message) for e in self.engine.drain()]
        self._route(events)

    def _route(self, events: list) -> None:
        by_request: dict[int, list] = defaultdict(list)
        with self.metrics.lock:
            for ev in events:
                rid = getattr(ev, "request", None)
                if rid is not None:
                    self._observe(ev)
                    by_request[rid].append(ev)
            self._publish_load()
        for rid, evs in by_request.items():
            ticket = self.tickets.get(rid)
            if ticket is None:
                continue
            if isinstance(evs[-1], be.RequestFinished):
                del self.tickets[rid]
                self.prompt_tokens.pop(rid, None)
                self.engine.forget(rid)
            ticket.deliver(evs)

    def _observe(self, ev) -> None:
        """The Prometheus figures of one event (the metrics lock is held)."""
        m = self.metrics
        if isinstance(ev, be.RequestAdmitted):
            m.prompt_tokens.add(self.prompt_tokens.get(ev.request, 0))
            m.queue.observe(ev.queue_s)
        elif isinstance(ev, be.RequestToken):
            m.generation_tokens.add()
            if ev.index == 0:
                m.ttft.observe(ev.latency_s)
            else:
                m.tpot.observe(ev.latency_s)
                m.itl.observe(ev.latency_s)
        elif isinstance(ev, be.RequestFinished):
            m.success.add(1, FINISHED_REASONS.get(ev.reason, "error"))
            if ev.tpot_s is not None:
                m.request_tpot.observe(ev.tpot_s)
            seq = self.engine.sequences.get(ev.request)
            if seq is not None:
                m.e2e.observe(max(0.0, ev.time_s - seq.arrival_s))

    def _publish_load(self) -> None:
        """The gauges and the scheduler's running totals (the metrics lock is held, or no other
        thread runs yet)."""
        m, e = self.metrics, self.engine
        used, total = e.blocks.num_used, e.cfg.num_blocks
        m.running.set(len(e.scheduler.running))
        m.waiting.set(len(e.scheduler.waiting))
        m.kv_usage.set(used / total)
        m.gpu_usage.set(used / total)
        m.blocks_used.set(used)
        m.blocks_total.set(total)
        m.preemptions.set(e.scheduler.preemptions)
        m.prefix_queries.set(e.scheduler.prefix_lookup_tokens)
        m.prefix_hits.set(e.scheduler.prefix_hit_tokens)


def _as_error(ev, message: str):
    """A request cancelled because the engine failed ends in "error", with the reason."""
    if isinstance(ev, be.RequestFinished):
        return dataclasses.replace(ev, reason="error", error=message)
    return ev
