"""The command palette's own entries (ctrl+p): every setting by name, and what the keys do."""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Iterable

from textual.app import SystemCommand

from engine.config import FAST_CHOICES, STRATEGIES

from .settings import choices, fast_description

if TYPE_CHECKING:
    from .app import MiniLLMApp


def app_commands(app: "MiniLLMApp") -> Iterable[SystemCommand]:
    """Help and the latency chart always; the engine's requests and settings only when the
    source takes requests (not in a replay or a watched session)."""
    yield SystemCommand("Help", "What each pane shows and why it matters", app.action_help)
    yield SystemCommand("Clear latency chart", "Forget the lines drawn so far",
                        app.main.latency.action_clear_history)
    if not app.source.live:
        return
    yield SystemCommand("Run", "Generate from the prompt", app.action_run)
    yield SystemCommand("Stop", "Stop the current run or race", app.action_stop)
    yield SystemCommand("Race", "Same prompt through every strategy/backend", app.action_race)
    for name in STRATEGIES:
        yield SystemCommand(f"Strategy: {name}", f"Decode with the {name} strategy",
                            partial(app.set_option, "strategy", name))
    for name, reason in choices("backend", app.info).items():
        yield SystemCommand(f"Backend: {name}",
                            reason or f"Attention computed by the {name} backend",
                            partial(app.set_option, "backend", name))
    for spec in FAST_CHOICES:
        yield SystemCommand(f"Fast path: {spec or 'off'}", fast_description(spec),
                            partial(app.set_option, "fast", spec))
    yield SystemCommand("Sampling settings", "Temperature, top-k/p, seed, max tokens",
                        app.action_settings)
