"""The app's side of the engine: clients that start runs and turn engine output into messages.

`EngineClient` is what the app talks to (`start`, `run`, `race`, `cancel`, `close`), so tests can
hand the app a `FakeEngineClient` (tui/fake_engine.py) that replays synthetic events without
loading torch models. `ProcessEngineClient` is the real one: the model in a spawned process
(tui/engine_process.py), a reader thread here that posts one message per batch.
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import queue
import threading
from typing import Callable, Protocol

from textual.message import Message

from .engine_process import RaceRequest, RunRequest, child_main
from .messages import (EngineEvents, EngineFailed, EngineProgress, EngineReady, RaceFinished,
                       RaceRow)

Post = Callable[[Message], object]


class EngineClient(Protocol):
    def start(self, post: Post) -> None: ...
    def run(self, request: RunRequest) -> None: ...
    def race(self, request: RaceRequest) -> None: ...
    def cancel(self) -> None: ...
    def close(self) -> None: ...


def translate(item: tuple) -> Message | None:
    """One protocol tuple from the engine → one app message."""
    kind = item[0]
    if kind == "events":
        return EngineEvents(run_id=item[1], events=tuple(item[2]))
    if kind == "progress":
        return EngineProgress(text=item[1], fraction=item[2])
    if kind == "ready":
        return EngineReady(info=item[1])
    if kind == "load_failed":
        return EngineFailed(text=f"model did not load: {item[1]}", fatal=True)
    if kind == "error":
        return EngineFailed(text=item[2], run_id=item[1])
    if kind == "race":
        d = dict(item[1])
        rows = [RaceRow(**r) for r in d.pop("rows")]
        return RaceFinished(rows=rows, **d)
    return None


class QueueClient:
    """What the real and the fake client share: a command queue, a cancel flag, a reader."""

    def __init__(self) -> None:
        self._post: Post | None = None
        self._closed = threading.Event()
        self._reader: threading.Thread | None = None

    # subclasses set: self.commands, self.results, self.cancel_event
    def _alive(self) -> bool:
        return True

    def _exit_text(self) -> str:
        return "the engine stopped unexpectedly"

    def _warm_up(self) -> None:
        """Import what unpickling events needs now, off the UI thread, then freeze the heap."""

    def _read(self) -> None:
        self._warm_up()
        while not self._closed.is_set():
            try:
                item = self.results.get(timeout=0.25)
            except queue.Empty:
                if not self._alive() and not self._closed.is_set():
                    self._post(EngineFailed(text=self._exit_text(), fatal=True))
                    return
                continue
            except (EOFError, OSError, ValueError):
                return
            message = translate(item)
            if message is not None and not self._closed.is_set():
                self._post(message)

    def _start_reader(self, post: Post) -> None:
        self._post = post
        self._reader = threading.Thread(target=self._read, name="engine-reader", daemon=True)
        self._reader.start()

    def run(self, request: RunRequest) -> None:
        self.cancel_event.clear()           # clear *before* sending: a stop can't be lost
        self.commands.put(("run", request))

    def race(self, request: RaceRequest) -> None:
        self.cancel_event.clear()
        self.commands.put(("race", request))

    def cancel(self) -> None:
        self.cancel_event.set()


def log_path() -> str:
    """The engine process's log, in the private cache folder (engine.files): no one else can
    plant a FIFO or a symlink under that name there. /dev/null when there is no such folder."""
    from engine.files import cache_root, private_dir
    root = cache_root()
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
        private_dir(root, root)
        return str(root / "engine.log")
    except OSError:                     # UntrustedPath included
        return os.devnull


class ProcessEngineClient(QueueClient):
    """The model in a child process started with "spawn"."""

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

    def start(self, post: Post) -> None:
        self.process.start()
        self._start_reader(post)

    def _alive(self) -> bool:
        return self.process.is_alive()

    def _warm_up(self) -> None:
        # Events hold engine dataclasses (and import torch with them). Importing here, in the
        # reader thread, keeps the first batch from stalling the UI; gc.freeze() afterwards
        # keeps a full collection from walking torch's objects in the middle of a frame.
        import engine.events  # noqa: F401
        import engine.metrics  # noqa: F401
        gc.collect()
        gc.freeze()

    def _exit_text(self) -> str:
        code = self.process.exitcode
        hint = " (killed: out of memory?)" if code in (-9, 137) else ""
        return f"the engine process ended unexpectedly, exit code {code}{hint}; see {log_path()}"

    def close(self) -> None:
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
