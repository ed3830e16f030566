"""Step commands across the app's process boundary (tui/engine_process.py, tui/bridge.py): the
child's one reader of the command queue, and one real spawned engine on a tiny model folder.

No sleeps: the tests wait on the events the engine sends.
"""

from __future__ import annotations

import gc
import queue

from engine.config import GenerationConfig
from engine.events import Finished, Forked, LogitLens, Ready, StepPoint
from engine.requests import WAKE_UP, RunRequest, StepCommand
from tui.bridge import ProcessSource
from tui.engine_process import Inbox


def feed(items):
    """A command queue's get(timeout=…) over a list: Empty when it runs dry."""
    items = list(items)

    def get(timeout=None):
        if not items:
            raise queue.Empty
        return items.pop(0)
    return get


def test_the_inbox_keeps_requests_for_later_and_drops_stale_commands():
    run, race = ("run", "request A"), ("race", "request B")
    step = StepCommand(1, "next")
    inbox = Inbox(feed([("step", StepCommand(9, "run")), ("cancel", None), run]))
    # Nothing is paused: a step command and a wake-up are stale, the request is served.
    assert inbox.next_request() == run
    inbox = Inbox(feed([race, ("cancel", None), ("step", step), None]))
    # A paused run reads past a request (kept for later) to its commands.
    assert inbox.get() == StepCommand(WAKE_UP, "cancel")
    assert inbox.get() == step
    assert inbox.get() is None and inbox.closed         # None: the app is closing
    assert inbox.next_request() == race                  # the request kept while paused …
    assert inbox.next_request() is None                  # … then nothing more
    inbox = Inbox(feed([]))
    inbox.put(step)                                      # Session.cancel's own wake-up
    assert inbox.get() == step


def test_a_waiting_child_notices_that_the_app_is_gone():
    """The queue stays silent and the parent process has died: stop waiting, serve no more."""
    checks = []

    def parent_alive():
        checks.append(1)
        return len(checks) < 3

    inbox = Inbox(feed([]), parent_alive, check_s=0.0)
    assert inbox.get() is None and inbox.closed and len(checks) == 3
    assert Inbox(feed([]), lambda: False, check_s=0.0).next_request() is None


def wait_for(got: queue.Queue, kind, run: int | None = None):
    seen = []
    while True:
        env = got.get(timeout=120)
        seen.append(type(env.event).__name__)
        if isinstance(env.event, kind) and (run is None or env.run == run):
            return env.event
        assert not isinstance(env.event, Finished) or kind is Finished, seen


def test_step_commands_through_the_real_engine_process(tiny_folder):
    """next, force, cancel while paused — then the app closes while a run is paused, and the
    child leaves on its own (exit code 0: not terminated)."""
    got: queue.Queue = queue.Queue()
    source = ProcessSource(str(tiny_folder), "cpu", "float32")
    source.start(lambda envelopes, restart: [got.put(e) for e in envelopes])
    try:
        wait_for(got, Ready)
        assert gc.get_freeze_count() > 0                 # the app's heap, frozen while it runs
        config = GenerationConfig(max_new_tokens=30, stop_at_eos=False)
        source.submit(RunRequest("hello", config, 1, step=True))
        assert wait_for(got, LogitLens).index == 0
        source.send_step(StepCommand(1, "next"))
        point = wait_for(got, StepPoint)
        assert point.index == 1 and wait_for(got, LogitLens).index == 1
        text = {c.id: c.text for c in point.candidates}
        forced = next(c.id for c in point.candidates if c.id != point.chosen)
        source.send_step(StepCommand(1, "force", token=forced))
        assert wait_for(got, Forked) == Forked(index=1, position=point.position, token=forced,
                                               text=text[forced], instead=point.chosen,
                                               instead_text=text[point.chosen])
        assert wait_for(got, LogitLens).index == 2
        source.cancel()                                  # paused: stops at once
        fin = wait_for(got, Finished)
        assert fin.reason == "cancelled" and len(fin.tokens) == 2 and fin.tokens[1] == forced

        source.submit(RunRequest("hello", config, 2, step=True))   # the stale wake-up: dropped
        assert wait_for(got, LogitLens, run=2).index == 0
        source.commands.put(None)                        # the app closes while it is paused
        assert wait_for(got, Finished, run=2).reason == "cancelled"
        source.process.join(timeout=120)
        assert source.process.exitcode == 0
    finally:
        source.stop()
    # … and thawed when it stops: frozen objects are never collected, not even at exit, where
    # triton's bindings then report every object of theirs still alive as a leak.
    assert gc.get_freeze_count() == 0
