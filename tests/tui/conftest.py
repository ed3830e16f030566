"""Helpers for the app tests: the app on a fake engine, what it said, and waiting for things.

`drive(app, size)` runs the app headless and records, through Textual's public message hook,
every notification it showed (`seen.notes`) and every batch of engine events it drew
(`seen.batches`) — the tests read what the user saw, not the app's private state.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from textual.notifications import Notify

from tui.app import MiniLLMApp
from tui.fake_engine import FakeSource
from tui.messages import EngineEvents
from tui.settings import Settings

SIZE = (150, 45)
ROOT = Path(__file__).resolve().parents[2]


def make_app(delay: float = 0.0, load_error: str | None = None, depth: str = "truecolor",
             diverge: dict[str, int] | None = None, **settings) -> MiniLLMApp:
    """The real app, with synthetic events instead of a model (no torch model is loaded).
    diverge: {"strategy/backend": index} makes that contestant's tokens differ from there on."""
    s = Settings(**settings)
    source = FakeSource(delay=delay, load_error=load_error, diverge=diverge)
    return MiniLLMApp(s, source=source, color_depth=depth)


@dataclass
class Seen:
    notes: list[str] = field(default_factory=list)
    batches: list[EngineEvents] = field(default_factory=list)

    def said(self, *words: str) -> bool:
        """Did a notification contain all these words?"""
        return any(all(w in n for w in words) for n in self.notes)


@contextlib.asynccontextmanager
async def drive(app: MiniLLMApp, size=SIZE):
    seen = Seen()

    def hook(message) -> None:
        if isinstance(message, Notify):
            seen.notes.append(message.notification.message)
        elif isinstance(message, EngineEvents):
            seen.batches.append(message)

    async with app.run_test(size=size, message_hook=hook) as pilot:
        yield pilot, seen


async def wait_for(pilot, condition, timeout: float = 10.0, what: str = "condition"):
    """Let the app run until condition() is true (the fake engine works in a thread)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            await pilot.pause()
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


async def ready(pilot):
    await wait_for(pilot, lambda: pilot.app.info is not None, what="the engine to be ready")


async def finished(pilot, seen: Seen, n: int = 1, timeout: float = 10.0):
    """Wait until n runs have finished (their Finished events drawn); return the last one."""
    from engine.events import Finished

    def done():
        return [e.event for b in seen.batches for e in b.envelopes
                if isinstance(e.event, Finished)]
    await wait_for(pilot, lambda: len(done()) >= n, timeout, f"{n} finished runs")
    return done()[-1]


def replays_without_torch(script: str) -> None:
    """Run `script` (which makes torch and the model packages unimportable, replays, then
    prints "replayed" and sys.modules["torch"]) in a fresh interpreter: it must end cleanly
    and torch must never have been imported."""
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "replayed None"


@pytest.fixture
def app_factory():
    return make_app


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    """Run `async def` tests with asyncio.run (no pytest-asyncio/anyio plugin needed)."""
    if inspect.iscoroutinefunction(pyfuncitem.obj):
        params = inspect.signature(pyfuncitem.obj).parameters
        kwargs = {name: pyfuncitem.funcargs[name] for name in params}
        asyncio.run(pyfuncitem.obj(**kwargs))
        return True
    return None
