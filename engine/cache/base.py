"""The read-only snapshot every KV cache gives of itself, and the errors caches raise."""

from __future__ import annotations

from dataclasses import dataclass


class CacheFullError(RuntimeError):
    """Raised before anything is written when a cache cannot hold what is asked of it."""


@dataclass(frozen=True, slots=True)
class SequenceBlocks:
    """One sequence's share of a paged pool."""
    seq_id: int
    blocks: tuple[int, ...]     # its block table: logical block i lives in physical blocks[i]
    tokens: int                 # tokens written
    waste: int                  # unused slots in its last block (internal fragmentation)


@dataclass(frozen=True, slots=True)
class CacheStats:
    """What a KV cache holds and costs, at one moment.

    Bytes per token follow the formula 2 (K and V) × layers × kv_heads × head_dim × dtype bytes;
    `bytes_reserved` is the real size of the tensors the cache allocated.
    """
    kind: str                   # "none" | "kv" | "paged"
    tokens: int                 # tokens whose K/V are held (for one sequence, or all in a pool)
    capacity: int               # tokens the reserved memory could hold
    n_layers: int
    bytes_per_token: int
    bytes_used: int             # tokens × bytes_per_token
    bytes_reserved: int         # memory allocated for the cache, used or not
    bytes_without_gqa: int      # what bytes_reserved would be with one K/V head per query head
    recomputed_tokens: int = 0  # naive strategy: positions pushed through the model this step
    block_size: int = 0         # paged only from here on
    blocks_total: int = 0
    blocks_used: int = 0
    sequences: tuple[SequenceBlocks, ...] = ()

    @property
    def bytes_per_layer_used(self) -> int:
        return self.bytes_used // max(self.n_layers, 1)

    @property
    def bytes_per_layer_reserved(self) -> int:
        return self.bytes_reserved // max(self.n_layers, 1)

    @property
    def k_bytes_used(self) -> int:       # K and V are the same size: each is half
        return self.bytes_used // 2

    @property
    def v_bytes_used(self) -> int:
        return self.bytes_used // 2

    @property
    def blocks_free(self) -> int:
        return self.blocks_total - self.blocks_used

    @property
    def waste_tokens(self) -> int:
        """Reserved but unused slots: the tail of a preallocated buffer, or paged last blocks."""
        if self.kind == "paged":
            return sum(s.waste for s in self.sequences)
        return self.capacity - self.tokens


def no_cache_stats(n_layers: int, bytes_per_token: int, recomputed: int) -> CacheStats:
    """The naive strategy keeps nothing, and recomputes every position each step."""
    return CacheStats(kind="none", tokens=0, capacity=0, n_layers=n_layers,
                      bytes_per_token=bytes_per_token, bytes_used=0, bytes_reserved=0,
                      bytes_without_gqa=0, recomputed_tokens=recomputed)
