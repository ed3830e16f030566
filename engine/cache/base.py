"""The errors caches raise, and the read-only snapshot every KV cache gives of itself
(`CacheStats`, defined with the other events in engine/events.py so that reading it needs no torch)."""

from __future__ import annotations

from ..events import CacheStats, SequenceBlocks  # the snapshot is part of the event schema

__all__ = ["CacheFullError", "CacheStats", "SequenceBlocks", "no_cache_stats"]


class CacheFullError(RuntimeError):
    """Raised before anything is written when a cache cannot hold what is asked of it."""


def no_cache_stats(n_layers: int, bytes_per_token: int, recomputed: int) -> CacheStats:
    """The naive strategy keeps nothing, and recomputes every position each step."""
    return CacheStats(kind="none", tokens=0, capacity=0, n_layers=n_layers,
                      bytes_per_token=bytes_per_token, bytes_used=0, bytes_reserved=0,
                      bytes_without_gqa=0, recomputed_tokens=recomputed)
