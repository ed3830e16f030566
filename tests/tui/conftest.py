"""Helpers for the app tests: the app on a fake engine, and waiting for things to happen."""

from __future__ import annotations

import asyncio
import inspect
import time

import pytest

from tui.app import MiniLLMApp, Settings
from tui.fake_engine import FakeSource


def make_app(delay: float = 0.0, load_error: str | None = None, depth: str = "truecolor",
             diverge: dict[str, int] | None = None, **settings) -> MiniLLMApp:
    """The real app, with synthetic events instead of a model (no torch model is loaded).
    diverge: {"strategy/backend": index} makes that contestant's tokens differ from there on."""
    s = Settings(**settings)
    source = FakeSource(delay=delay, load_error=load_error, diverge=diverge)
    return MiniLLMApp(s, source=source, color_depth=depth)


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


@pytest.fixture
def app_factory():
    return make_app


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    """Run `async def` tests with asyncio.run (no pytest-asyncio/anyio plugin needed)."""
    if inspect.iscoroutinefunction(pyfuncitem.obj):
        kwargs = {name: pyfuncitem.funcargs[name] for name in pyfuncitem._fixtureinfo.argnames}
        asyncio.run(pyfuncitem.obj(**kwargs))
        return True
    return None
