"""What generation emits: small frozen dataclasses, in order.

    Prefill → (Token → CacheSnapshot → AttentionRow?)* → Finished

Every consumer — the CLI, the UI, the bench, the tests — reads the same stream. Events hold
plain Python values and NumPy arrays (no live tensors), so they cross process boundaries cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .cache.base import CacheStats


@dataclass(frozen=True, slots=True)
class Started:
    """A run has begun (settings as the engine understood them)."""
    strategy: str
    backend: str
    device: str
    dtype: str
    prompt: str
    max_new_tokens: int
    fast: str = ""          # fast-path options as words ("c+int8"); "" for the plain model


@dataclass(frozen=True, slots=True)
class Prefill:
    """The prompt went through the model once (for `naive`: the first full forward)."""
    prompt_tokens: tuple[int, ...]
    prompt_pieces: tuple[str, ...]    # the prompt's text, cut at token boundaries
    seconds: float


@dataclass(frozen=True, slots=True)
class Token:
    """One generated token. `latency_s` is this step's time: for the first token it includes
    the prefill (it is the time to first token)."""
    id: int
    text: str                         # the new text this token completes (may be "" mid-character)
    position: int                     # its position in the sequence (prompt length + index)
    index: int                        # 0 for the first generated token
    latency_s: float
    logits: Any = None                # float32 tensor (vocab,), only with keep_logits


@dataclass(frozen=True, slots=True)
class CacheSnapshot:
    stats: CacheStats


@dataclass(frozen=True, slots=True)
class AttentionRow:
    """How the newest position attended: probs[layer, head, j] over positions j ≤ position."""
    position: int
    probs: np.ndarray                 # (n_layers, n_heads, position + 1), float16


@dataclass(frozen=True, slots=True)
class FlashTiles:
    """The flash backend's online-softmax state after each key/value tile, for one head."""
    layer: int
    head: int
    tile_size: int
    running_max: tuple[float, ...]
    running_sum: tuple[float, ...]


@dataclass(frozen=True, slots=True)
class Finished:
    reason: str                       # "length" | "eos" | "stop" | "cancelled" | "error"
    tokens: tuple[int, ...]           # the generated ids
    text: str                         # their decoded text
    metrics: Any = None               # engine.metrics.RunMetrics
    tail: str = ""                    # text not yet in any Token piece (an invalid last byte)
    error: str | None = None


Event = Started | Prefill | Token | CacheSnapshot | AttentionRow | FlashTiles | Finished
