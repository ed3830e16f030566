"""The app's live sources (engine/source.py): a session in a child process, read by a thread.

`ProcessSource` starts tui/engine_process.py in a spawned process and reads its batches of
envelope JSON on a reader thread, turning each batch back into `engine.events.Envelope`s
(`Envelope.from_json`, the same reader `replay` uses) and handing them to `deliver`.
`tui.fake_engine.FakeSource` runs the same transport over synthetic events, in a thread, so the
app's tests exercise everything but the model.
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import queue
import threading
import time

from engine.events import Envelope, Failed
from engine.files import cache_root, private_dir
from engine.requests import BatchRequest, RaceRequest
from engine.source import Deliver

from .engine_process import child_main


class QueueSource:
    """What the real and the fake source share: a command queue, a cancel flag, a reader."""

    live = True

    def __init__(self) -> None:
        self._deliver: Deliver | None = None
        self._closed = threading.Event()
        self._reader: threading.Thread | None = None

    # subclasses set: self.commands, self.results, self.cancel_event
    def _alive(self) -> bool:
        return True

    def _exit_text(self) -> str:
        return "the engine stopped unexpectedly"

    def _warm_up(self) -> None:
        """Anything to do on the reader thread before the first batch (off the UI thread)."""

    def _fail(self, text: str) -> None:
        self._deliver([Envelope(0, time.monotonic(), Failed(text, fatal=True))], False)

    def _read(self) -> None:
        self._warm_up()
        while not self._closed.is_set():
            try:
                item = self.results.get(timeout=0.25)
            except queue.Empty:
                if not self._alive() and not self._closed.is_set():
                    self._fail(self._exit_text())
                    return
                continue
            except (EOFError, OSError, ValueError):
                return
            try:
                envelopes = [Envelope.from_json(d) for d in item[1]]
            except (ValueError, TypeError, IndexError) as exc:   # a bug, said, not a crash
                self._fail(f"the engine sent something unreadable: {exc}")
                continue
            if envelopes and not self._closed.is_set():
                self._deliver(envelopes, False)

    def start(self, deliver: Deliver) -> None:
        self._deliver = deliver
        self._start_worker()
        self._reader = threading.Thread(target=self._read, name="engine-reader", daemon=True)
        self._reader.start()

    def _start_worker(self) -> None:
        raise NotImplementedError

    def submit(self, request) -> None:
        self.cancel_event.clear()           # clear *before* sending: a stop can't be lost
        kind = ("race" if isinstance(request, RaceRequest) else
                "batch" if isinstance(request, BatchRequest) else "run")
        self.commands.put((kind, request))

    def send_step(self, command) -> None:
        """A StepCommand for the paused step-mode run."""
        self.commands.put(("step", command))

    def cancel(self) -> None:
        # The flag stops a running request at its next token; the wake-up reaches a step-mode
        # run paused on the command queue (the engine drops it when nothing is paused).
        self.cancel_event.set()
        try:
            self.commands.put(("cancel", None))
        except (OSError, ValueError):       # already stopped: nothing is paused
            pass


def log_path() -> str:
    """The engine process's log, in the private cache folder (engine.files): no one else can
    plant a FIFO or a symlink under that name there. /dev/null when there is no such folder."""
    root = cache_root()
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
        private_dir(root, root)
        return str(root / "engine.log")
    except OSError:                     # UntrustedPath included
        return os.devnull


class ProcessSource(QueueSource):
    """A session in a child process started with "spawn"."""

    def __init__(self, model: str | None, device: str = "auto", dtype: str = "float32"):
        super().__init__()
        self.spec, self.device, self.dtype = model, device, dtype
        ctx = mp.get_context("spawn")
        self.commands = ctx.Queue()
        self.results = ctx.Queue()
        self.cancel_event = ctx.Event()
        self.process = ctx.Process(
            target=child_main, name="minillm-engine", daemon=True,
            args=(model, device, dtype, self.commands, self.results, self.cancel_event,
                  log_path()))

    def _start_worker(self) -> None:
        self.process.start()

    def _alive(self) -> bool:
        return self.process.is_alive()

    def _warm_up(self) -> None:
        # The app's process never imports torch (events are plain dataclasses); a frozen heap
        # keeps a full collection from walking everything Textual and the app have built.
        gc.collect()
        gc.freeze()

    def _exit_text(self) -> str:
        code = self.process.exitcode
        hint = " (killed: out of memory?)" if code in (-9, 137) else ""
        return f"the engine process ended unexpectedly, exit code {code}{hint}; see {log_path()}"

    def stop(self) -> None:
        self._closed.set()
        self.cancel_event.set()
        try:
            self.commands.put(None)
        except (OSError, ValueError):
            pass
        self.process.join(timeout=2)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(timeout=2)
        for q in (self.commands, self.results):
            q.cancel_join_thread()
            q.close()
        # The frozen heap was for a running app: frozen objects are never collected, not even
        # at exit, and an extension module that checks for leaks then reports them all.
        gc.unfreeze()
