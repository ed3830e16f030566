"""Every message the app's parts send each other, as dataclasses in one place.

The engine bridge posts the `Engine*` messages from its reader thread (posting is thread-safe).
`EngineEvents` carries a *batch* of engine events — the child process flushes about 12 times a
second — so the UI repaints in batches, not per token. Snapshot-style messages (`CacheUpdated`,
`AttentionUpdated`, `EngineProgress`) define `can_replace`: if the UI falls behind, only the newest
is drawn.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from textual.message import Message


@dataclass
class EngineProgress(Message):
    """The model is converting/loading: what is happening and how far along (0…1)."""
    text: str
    fraction: float

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, EngineProgress)


@dataclass
class EngineReady(Message):
    """The model is loaded. `info`: name, device, dtype, backends {name: reason|None}, shape."""
    info: dict


@dataclass
class EngineFailed(Message):
    """Something went wrong, said in one line. `run_id` None: loading or the process itself."""
    text: str
    run_id: int | None = None
    fatal: bool = False            # the engine process is gone or has no model


@dataclass
class EngineEvents(Message):
    """A batch of engine events (engine.events.*) for one run, oldest first."""
    run_id: int
    events: tuple


def run_label(strategy: str, backend: str, fast: str = "") -> str:
    """How the app names a run: "kv/sdpa", or "kv/sdpa +c" with fast-path options."""
    return f"{strategy}/{backend}" + (f" +{fast}" if fast else "")


@dataclass
class RaceRow:
    """One contestant of a race, summarised by the engine process."""
    strategy: str
    backend: str
    reason: str
    tokens: tuple[int, ...]
    text: str
    ttft_s: float
    tpot_s: float
    tokens_per_s: float
    peak_memory_bytes: int
    kv_bytes: int
    same_tokens: bool | None       # vs the first contestant; None for the first itself
    max_logit_delta: float | None  # max |Δ logits| vs the first, over the positions both made
    error: str | None = None
    fast: str = ""                 # fast-path options of this contestant ("" = plain model)

    @property
    def label(self) -> str:
        """"kv/sdpa", or "kv/sdpa +c" with fast-path options."""
        return run_label(self.strategy, self.backend, self.fast)


@dataclass
class RaceFinished(Message):
    """All contestants ran (or the race was stopped)."""
    race_id: int
    prompt: str
    rows: list[RaceRow] = field(default_factory=list)
    cancelled: bool = False

    @property
    def identical(self) -> bool | None:
        """True when every contestant produced the same tokens as the first."""
        others = [r for r in self.rows if r.same_tokens is not None]
        if not others:
            return None
        return all(r.same_tokens for r in others)

    @property
    def max_delta(self) -> float | None:
        deltas = [r.max_logit_delta for r in self.rows if r.max_logit_delta is not None]
        return max(deltas) if deltas else None


@dataclass
class CacheUpdated(Message):
    """The newest KV-cache snapshot (engine.cache.base.CacheStats)."""
    stats: Any

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, CacheUpdated)


@dataclass
class AttentionUpdated(Message):
    """New attention rows arrived; the pane redraws from its own store once."""
    position: int

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, AttentionUpdated)
