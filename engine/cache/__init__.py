"""KV caches: one file per kind, each with reserve / update / commit / free and stats()."""

from .base import CacheFullError, CacheStats, SequenceBlocks, no_cache_stats
from .contiguous import ContiguousKVCache
from .paged import BlockPool, PagedKVCache

__all__ = ["CacheFullError", "CacheStats", "SequenceBlocks", "no_cache_stats",
           "ContiguousKVCache", "BlockPool", "PagedKVCache"]
