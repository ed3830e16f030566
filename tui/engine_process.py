"""The engine side of the app: a thin transport over an `engine.session.Session`.

The app never runs the model in its own process. Textual draws from the same Python process,
and the GIL makes a model thread and the UI slow each other down (measured here: a
665 tok/s producer fell to ~110 tok/s when it fed the UI token by token). So the model lives in a
child process started with "spawn" (a fresh interpreter: no inherited threads or CUDA state),
and this module is all that child runs. It imports no Textual, and nothing heavy until the
child starts: the app imports it for `child_main`, so the session (and torch with it) is
imported inside the child only.

Protocol (plain picklable values):
    app → engine   ("run", engine.requests.RunRequest) | ("race", RaceRequest)
                   | ("batch", BatchRequest)   many prompts at once (the server view)
                   | ("step", engine.requests.StepCommand)   to a step-mode run that paused
                   | ("cancel", None)   a wake-up for a paused run, sent with every cancel
                   | None (stop)
                   plus a shared cancel Event, set by the app to stop the current run or race
    engine → app   ("events", [envelope JSON, …])

The child reads the command queue in one place, `Inbox`: between requests for the next request,
while a step-mode run is paused (as the session's inbox) for its next StepCommand. It blocks on
the queue — no polling — but wakes every few seconds to check that the app is still there, so
an app that was killed never leaves the child waiting forever.

Everything the engine says — loading progress, ready, a failure, every run's and race's events
— is an `engine.events.Envelope` in its JSON form (`Envelope.to_json`), the same form `run
--json` prints and recordings store, so what the app draws live is exactly what a replay reads.
Envelopes are batched: one message about every 1/12 s (and at once at a run's start and end),
so the app receives and repaints at ~12 Hz whatever the token rate.
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import queue
import signal
import sys
import time
from collections import deque
from typing import Any, Callable, Iterable

from engine.events import Envelope, Failed, Finished, Loading, RaceFinished
from engine.requests import WAKE_UP, StepCommand

FLUSH_INTERVAL_S = 1 / 12
# Events that are sent at once: a run or race starting or ending should not wait for a batch,
# nor a step-mode run that shows its lens and then waits for the app (its last event before it
# pauses — nothing would come to flush the batch).
PROMPT_TYPES = ("started", "finished", "race_started", "race_finished", "ready", "failed",
                "lens", "batch_started", "batch_summary")
REQUEST_KINDS = ("run", "race", "batch")


PARENT_CHECK_S = 2.0     # how often a waiting child checks that the app still exists


class Inbox:
    """The child's one reader of the app's command queue (`get(timeout=…)`).

    `next_request()` is the serving loop's side: the next ("run" | "race", request), or None
    when the app is gone. `get()` is a paused step-mode run's side (Session.inbox): the next
    StepCommand — a ("cancel", None) wake-up becomes StepCommand(WAKE_UP, "cancel") — or None
    when the app is gone. A request that arrives while a run is paused waits its turn; a step
    command or wake-up that arrives with nothing paused is stale and dropped. `put` is the
    session's own wake-up (Session.cancel), read first.
    """

    def __init__(self, get: Callable[..., Any], parent_alive: Callable[[], bool] = lambda: True,
                 check_s: float = PARENT_CHECK_S):
        self._get, self.parent_alive, self.check_s = get, parent_alive, check_s
        self.requests: deque = deque()
        self.local: deque = deque()
        self.closed = False

    def _next(self):
        while not self.closed:
            try:
                item = self._get(timeout=self.check_s)
            except queue.Empty:
                self.closed = not self.parent_alive()
                continue
            except (EOFError, OSError, ValueError):     # the queue itself is gone
                self.closed = True
                break
            if item is None:
                self.closed = True
                break
            return item
        return None

    def get(self) -> StepCommand | None:
        while not self.local:
            item = self._next()
            if item is None:
                return None
            kind, payload = item
            if kind == "step":
                return payload
            if kind == "cancel":
                return StepCommand(WAKE_UP, "cancel")
            self.requests.append(item)
        return self.local.popleft()

    def put(self, command: StepCommand) -> None:
        self.local.append(command)

    def next_request(self):
        while not self.requests:
            item = self._next()
            if item is None:
                return None
            if item[0] in REQUEST_KINDS:
                return item
        return self.requests.popleft()


class EngineLoop:
    """Serve requests one at a time over `send`. `open_session(progress)` loads the model."""

    def __init__(self, send: Callable[[tuple], None], flush_interval: float = FLUSH_INTERVAL_S,
                 freeze_gc: bool = True, clock: Callable[[], float] = time.monotonic):
        self.send, self.flush_interval, self.freeze_gc = send, flush_interval, freeze_gc
        self.clock = clock
        self.session = None

    def say(self, run: int, event) -> None:
        """One envelope, sent on its own (loading progress, ready, a failure)."""
        self.send(("events", [Envelope(run, self.clock(), event).to_json()]))

    # ------------------------------------------------------------------ loading
    def load(self, open_session: Callable[..., Any]) -> bool:
        from engine.session import error_message     # the child's side only: it imports torch
        try:
            self.session = open_session(lambda text, f: self.say(0, Loading(text, float(f))))
            ready = self.session.ready()
        except BaseException as exc:      # noqa: BLE001 — the app must hear about anything
            self.session = None
            self.say(0, Failed(f"model did not load: {error_message(exc)}", fatal=True))
            return False
        # Loading allocates millions of objects; a later full collection walks them all and
        # freezes for ~200 ms. Freezing moves them out of the collector's sight for good.
        if self.freeze_gc:
            gc.collect()
            gc.freeze()
        self.say(0, ready)
        return True

    # ------------------------------------------------------------------ serving
    def serve(self, get: Callable[..., Any], parent_alive: Callable[[], bool] = lambda: True
              ) -> None:
        """Serve the requests `get(timeout=…)` reads until it says None (or the app is gone)."""
        inbox = Inbox(get, parent_alive)
        if self.session is not None:
            self.session.inbox = inbox          # where a paused step-mode run waits
        while True:
            cmd = inbox.next_request()
            if cmd is None:
                return
            kind, request = cmd
            if self.session is None:       # said once; a race is closed, not left open
                if kind == "batch":
                    self.say(request.batch_id, Failed("no model is loaded"))
                    continue
                run_id = request.race_id if kind == "race" else request.run_id
                self.say(run_id, RaceFinished(prompt=request.prompt, cancelled=True)
                         if kind == "race" else
                         Finished(reason="error", tokens=(), text="", error="no model is loaded"))
                continue
            serve = {"race": self.session.race, "batch": self.session.batch}.get(
                kind, self.session.run)
            self.pump(serve(request))

    def pump(self, envelopes: Iterable) -> None:
        """Send the envelopes in batches: about every flush_interval, and at once when a run or
        race starts or ends."""
        batch: list[dict] = []
        last = time.perf_counter()
        for env in envelopes:
            d = env.to_json()
            batch.append(d)
            now = time.perf_counter()
            if d["type"] in PROMPT_TYPES or now - last >= self.flush_interval:
                self.send(("events", batch))
                batch, last = [], now
        if batch:
            self.send(("events", batch))


# ---------------------------------------------------------------------- the child process
def child_main(spec, device, dtype, commands, results, cancel, log_path: str | None) -> None:
    """Entry point of the spawned engine process."""
    # The child shares the terminal with the app: anything it prints (a warning, a stray
    # traceback) would scribble over the UI. Its stdout/stderr go to a log file instead.
    # Ctrl+C belongs to the app (Textual reads it as a key); the engine stops when told to.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    target = log_path or os.devnull
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    except OSError:
        fd = os.open(os.devnull, os.O_WRONLY)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = os.fdopen(1, "w", buffering=1)
    sys.stderr = os.fdopen(2, "w", buffering=1)

    loop = EngineLoop(results.put)
    try:
        from engine.fast.threads import apply_threads, threads_beside
        from engine.session import Session
    except BaseException as exc:         # noqa: BLE001
        loop.say(0, Failed(f"model did not load: {type(exc).__name__}: {exc}", fatal=True))
        return
    # One core stays with the app: the engine's OpenMP barriers must not wait for a thread the
    # app's repaint has displaced (docs/ui.md measured what that costs).
    apply_threads(threads_beside(1))
    loop.load(lambda progress: Session.load(spec, device, dtype, progress=progress,
                                            cancel=cancel))
    parent = mp.parent_process()
    try:
        loop.serve(commands.get, lambda: parent is None or parent.is_alive())
    except (KeyboardInterrupt, EOFError, OSError):
        pass
