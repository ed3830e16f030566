"""A preallocated, contiguous KV cache (the gpt-fast way).

Keys and values of every layer live in two buffers sized for the whole run up front:

    k, v: (n_layers, B, n_kv_heads, capacity, head_dim)

Step t writes its new K/V at positions [start, start+T) and reads back [0, start+T). No
allocation happens while decoding, which is fast and simple — the price is that the whole
capacity is reserved from the first token, used or not.
"""

from __future__ import annotations

import torch

from .base import CacheFullError, CacheStats


class ContiguousKVCache:
    kind = "kv"

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype, device: torch.device | str, n_heads: int | None = None,
                 batch: int = 1):
        shape = (n_layers, batch, n_kv_heads, capacity, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.n_layers, self.n_kv, self.hd, self.capacity = n_layers, n_kv_heads, head_dim, capacity
        self.n_heads = n_heads or n_kv_heads
        self.length = 0          # tokens written so far (all layers)

    def reserve(self, new_length: int) -> None:
        """Check, before a step writes anything, that `new_length` tokens fit."""
        if new_length > self.capacity:
            raise CacheFullError(f"KV cache full: {new_length} tokens do not fit its capacity "
                                 f"of {self.capacity}")

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, n_kv, T, hd) at [start, start+T); return all K/V up to start+T."""
        end = start + k.shape[2]
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]   # (B, n_kv, end, hd) views

    def commit(self, new_length: int) -> None:
        self.length = new_length

    def free(self) -> None:
        """Drop the buffers (the run is over or cancelled)."""
        self.k = self.v = torch.empty(0)
        self.length = 0

    def stats(self) -> CacheStats:
        elem = self.k.element_size() if self.k.numel() else 0
        per_token = 2 * self.n_layers * self.n_kv * self.hd * elem
        reserved = self.k.nbytes + self.v.nbytes
        return CacheStats(kind=self.kind, tokens=self.length, capacity=self.capacity,
                          n_layers=self.n_layers, bytes_per_token=per_token,
                          bytes_used=self.length * per_token, bytes_reserved=reserved,
                          bytes_without_gqa=reserved * self.n_heads // self.n_kv)
