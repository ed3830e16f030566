"""A decode step with fixed shapes: the form `torch.compile` and CUDA graphs need.

The ordinary step (engine.decoding.CachedAttention) slices the cache to the current length, so
every step has a different key length and calls kernels with different shapes — fine for eager
PyTorch, but a compiled graph would be re-specialised and a captured CUDA graph would replay the
shapes (and the Python-int position) it was recorded with.

Here every tensor shape is the same at every step:

    position       a one-element tensor `pos` (the model's forward accepts a tensor start_pos)
    write          K/V go to slot `pos` with index_copy_ (kv) or to (table[pos // bs], pos % bs)
                   (paged) — the destination is data, not a Python slice
    attend         over the *whole* capacity, with a mask `key position ≤ pos`: the unwritten
                   slots cost a little arithmetic and contribute exactly 0 after the softmax

On the CPU this path runs too (it is how the tests check it); only the capture is CUDA-only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..cache import ContiguousKVCache, PagedKVCache


class StaticAttention:
    """The model's `attend` door for one token at position `self.pos` (a (1,) long tensor)."""

    def __init__(self, cache, n_heads: int, device: torch.device):
        self.cache, self.n_heads = cache, n_heads
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        if isinstance(cache, ContiguousKVCache):
            self.paged = False
            slots = cache.capacity
        elif isinstance(cache, PagedKVCache):
            self.paged = True
            pool = cache.pool
            self.block_size = pool.block_size
            # Room for every block this sequence may ever own; padded with block 0, whose
            # contents are masked out until the sequence really owns the slots.
            self.max_blocks = pool.num_blocks
            self.table = torch.zeros(self.max_blocks, dtype=torch.long, device=device)
            slots = self.max_blocks * self.block_size
        else:
            raise TypeError(f"no static decode step for {type(cache).__name__}")
        self.key_pos = torch.arange(slots, device=device)                 # (S,)
        self.mask = torch.ones(1, 1, 1, slots, dtype=torch.bool, device=device)

    def sync_table(self) -> None:
        """Copy the (grown) block table into the fixed-size one, before a step (paged only)."""
        if self.paged:
            table = self.cache.block_table
            self.table[:len(table)].copy_(table.to(torch.long), non_blocking=True)

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        # q: (1, H, 1, hd); k, v: (1, n_kv, 1, hd)
        if layer == 0:       # once per step, inside whatever is compiled or captured
            self.mask.copy_((self.key_pos <= self.pos).view(1, 1, 1, -1))      # (1, 1, 1, S)
        if self.paged:
            pool = self.cache.pool
            kp, vp = pool.k[layer], pool.v[layer]          # (num_blocks, n_kv, bs, hd)
            block = self.table[self.pos // self.block_size]                     # (1,)
            offset = self.pos % self.block_size                                 # (1,)
            kp[block, :, offset] = k[0].transpose(0, 1)                         # (1, n_kv, hd)
            vp[block, :, offset] = v[0].transpose(0, 1)
            n_kv, hd = kp.shape[1], kp.shape[3]
            keys = kp[self.table].transpose(0, 1).reshape(1, n_kv, -1, hd)      # (1, n_kv, S, hd)
            values = vp[self.table].transpose(0, 1).reshape(1, n_kv, -1, hd)
        else:
            keys, values = self.cache.k[layer], self.cache.v[layer]         # (1, n_kv, S, hd)
            keys.index_copy_(2, self.pos, k)
            values.index_copy_(2, self.pos, v)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=self.mask,
                                              enable_gqa=keys.shape[1] != q.shape[1])


class StaticDecoder:
    """Runs decode steps of one model on one cache through StaticAttention.

    `step(token, pos)` returns the float32 logits (vocab,). `build` picks plain, compiled or
    CUDA-graph execution of the same function; all three give the same numbers up to kernel
    choice.
    """

    def __init__(self, model, cache):
        self.model, self.cache = model, cache
        device = model.device
        self.attend = StaticAttention(cache, model.cfg.n_heads, device)
        # A compiled or captured step cannot grow the RoPE tables: cover every slot now.
        model.ensure_rope(self.attend.key_pos.numel())
        self.tokens = torch.zeros(1, 1, dtype=torch.long, device=device)     # (B, T)
        self._run = self._eager

    def _eager(self) -> torch.Tensor:
        return self.model(self.tokens, self.attend.pos, self.attend, last_only=True)[0, -1]

    def prime(self, pos: int) -> None:
        """Point the step at slot `pos` (taking a new block if the cache is paged)."""
        self.cache.reserve(pos + 1)
        self.attend.sync_table()
        self.attend.pos.fill_(pos)

    def step(self, token: int, pos: int) -> torch.Tensor:
        self.prime(pos)
        self.tokens.fill_(token)
        with torch.inference_mode():
            logits = self._run()
        self.cache.commit(pos + 1)
        return logits
