"""Every message the app's parts send each other, as dataclasses in one place.

A source (engine/source.py: the engine process, a recording, a shared session) delivers
batches of envelopes from its own thread; the app posts each as one `EngineEvents`. The engine
process flushes about 12 times a second, so the UI repaints in batches, not per token, and
each pane keeps only the newest snapshot of a batch (the KV cache, the attention rows it
shows). What the engine says is never a message class of its own: it is an engine event
inside `EngineEvents`.
"""

from __future__ import annotations

from dataclasses import dataclass
from textual.message import Message


@dataclass
class EngineEvents(Message):
    """A batch of envelopes (engine.events.Envelope) from the source, oldest first: any run's
    events, a race's, the session's own (loading, ready, failed). `restart`: the batch is the
    whole state from the beginning (a replay stepped back), so the panes start afresh."""
    envelopes: tuple
    restart: bool = False
