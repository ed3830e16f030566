"""Every message the app's parts send each other, as dataclasses in one place.

A source (engine/source.py: the engine process, a recording) delivers batches of envelopes from
its own thread; the app posts each as one `EngineEvents` (posting is thread-safe). The engine
process flushes about 12 times a second, so the UI repaints in batches, not per token.
Snapshot-style messages (`CacheUpdated`, `AttentionUpdated`) define `can_replace`: if the UI
falls behind, only the newest is drawn. What the engine says is never a message class of its
own: it is an engine event inside `EngineEvents`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from textual.message import Message

from engine.events import run_label  # noqa: F401 — how the app names a run, defined once


@dataclass
class EngineEvents(Message):
    """A batch of envelopes (engine.events.Envelope) from the source, oldest first: any run's
    events, a race's, the session's own (loading, ready, failed). `restart`: the batch is the
    whole state from the beginning (a replay stepped back), so the panes start afresh."""
    envelopes: tuple
    restart: bool = False


@dataclass
class CacheUpdated(Message):
    """The newest KV-cache snapshot (engine.events.CacheStats)."""
    stats: Any

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, CacheUpdated)


@dataclass
class AttentionUpdated(Message):
    """New attention rows arrived; the pane redraws from its own store once."""
    position: int

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, AttentionUpdated)
