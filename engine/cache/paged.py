"""A paged KV cache: fixed-size blocks from a shared pool (the vLLM / nano-vllm way).

The pool holds `num_blocks` blocks of `block_size` token slots for every layer:

    k_pool, v_pool: (n_layers, num_blocks, n_kv_heads, block_size, head_dim)

A sequence owns a *block table*: logical block i (its tokens i·bs … i·bs+bs-1) lives in physical
block table[i], wherever that is in the pool. Blocks are taken from a free list only when the
sequence grows into them and go back when it ends, so memory follows the tokens actually held —
at most block_size-1 slots per sequence sit unused — and many sequences share one pool.
"""

from __future__ import annotations

import torch

from .base import CacheFullError, CacheStats, SequenceBlocks


class BlockPool:
    """The shared storage and its allocator: a free list and an owner per block."""

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, num_blocks: int,
                 block_size: int, dtype: torch.dtype, device: torch.device | str,
                 n_heads: int | None = None):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("a block pool needs a positive number of blocks and block size")
        shape = (n_layers, num_blocks, n_kv_heads, block_size, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.n_layers, self.n_kv, self.hd = n_layers, n_kv_heads, head_dim
        self.n_heads = n_heads or n_kv_heads
        self.num_blocks, self.block_size = num_blocks, block_size
        self.free_list: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() gives block 0 first
        self.tables: dict[int, list[int]] = {}    # seq_id → its block table
        self.lengths: dict[int, int] = {}         # seq_id → tokens written
        self._next_id = 0

    # ------------------------------------------------------------------ allocator
    def new_sequence(self) -> int:
        seq_id = self._next_id
        self._next_id += 1
        self.tables[seq_id], self.lengths[seq_id] = [], 0
        return seq_id

    def blocks_needed(self, tokens: int) -> int:
        return -(-tokens // self.block_size)   # ceil division

    def grow(self, seq_id: int, new_length: int) -> None:
        """Make sure `seq_id` owns enough blocks for `new_length` tokens — all or nothing."""
        table = self.tables[seq_id]
        missing = self.blocks_needed(new_length) - len(table)
        if missing > len(self.free_list):
            raise CacheFullError(
                f"paged KV pool exhausted: {new_length} tokens need {missing} more blocks of "
                f"{self.block_size}, only {len(self.free_list)} of {self.num_blocks} are free")
        for _ in range(max(missing, 0)):
            table.append(self.free_list.pop())

    def release(self, seq_id: int) -> None:
        """Return every block of a finished or cancelled sequence to the free list."""
        for block in reversed(self.tables.pop(seq_id, [])):
            self.free_list.append(block)
        self.lengths.pop(seq_id, None)

    # ------------------------------------------------------------------ data
    def slots(self, seq_id: int, start: int, end: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(physical block, offset in block) for each position in [start, end)."""
        pos = torch.arange(start, end)
        table = torch.tensor(self.tables[seq_id], dtype=torch.long)
        return table[pos // self.block_size].to(device), (pos % self.block_size).to(device)

    def stats(self) -> CacheStats:
        per_token = 2 * self.n_layers * self.n_kv * self.hd * self.k.element_size()
        reserved = self.k.nbytes + self.v.nbytes
        seqs = tuple(
            SequenceBlocks(seq_id=s, blocks=tuple(t), tokens=self.lengths[s],
                           waste=len(t) * self.block_size - self.lengths[s])
            for s, t in self.tables.items())
        tokens = sum(s.tokens for s in seqs)
        return CacheStats(kind="paged", tokens=tokens, capacity=self.num_blocks * self.block_size,
                          n_layers=self.n_layers, bytes_per_token=per_token,
                          bytes_used=tokens * per_token, bytes_reserved=reserved,
                          bytes_without_gqa=reserved * self.n_heads // self.n_kv,
                          block_size=self.block_size, blocks_total=self.num_blocks,
                          blocks_used=self.num_blocks - len(self.free_list), sequences=seqs)


class PagedKVCache:
    """One sequence's view of a pool, with the same reserve / update / commit steps as the
    contiguous cache, so a strategy can use either."""

    kind = "paged"

    def __init__(self, pool: BlockPool):
        self.pool = pool
        self.seq_id = pool.new_sequence()
        self._slots = None
        self._table: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return self.pool.lengths.get(self.seq_id, 0)

    def reserve(self, new_length: int) -> None:
        """Allocate blocks for the coming step, and compute where its tokens go, once per step."""
        self.pool.grow(self.seq_id, new_length)
        self._slots = self.pool.slots(self.seq_id, self.length, new_length, self.pool.k.device)
        self._table = torch.tensor(self.pool.tables[self.seq_id], dtype=torch.int32,
                                   device=self.pool.k.device)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Scatter k, v (1, n_kv, T, hd) into their slots of this layer's pool."""
        blocks, offsets = self._slots
        self.pool.k[layer, blocks, :, offsets] = k[0].transpose(0, 1)   # (T, n_kv, hd)
        self.pool.v[layer, blocks, :, offsets] = v[0].transpose(0, 1)

    def gather(self, layer: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This sequence's K/V, copied out of its blocks into (1, n_kv, length, hd)."""
        n_kv, hd = self.pool.n_kv, self.pool.hd
        table = self._table.long()
        k = self.pool.k[layer, table]                        # (n_blocks, n_kv, bs, hd)
        v = self.pool.v[layer, table]
        k = k.transpose(0, 1).reshape(n_kv, -1, hd)[:, :length]   # (n_kv, n_blocks·bs, hd)
        v = v.transpose(0, 1).reshape(n_kv, -1, hd)[:, :length]
        return k.unsqueeze(0), v.unsqueeze(0)               # (1, n_kv, length, hd)

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor):
        self.write(layer, k, v)
        return self.gather(layer, start + k.shape[2])

    @property
    def block_table(self) -> torch.Tensor:
        return self._table

    def commit(self, new_length: int) -> None:
        self.pool.lengths[self.seq_id] = new_length

    def free(self) -> None:
        self.pool.release(self.seq_id)

    def stats(self) -> CacheStats:
        return self.pool.stats()
