"""The `triton` backend: the FlashAttention algorithm as real GPU kernels (engine/attention/
triton_kernels.py), plus a PagedAttention kernel that reads K/V through the block table.

    attend        contiguous K/V (no cache, or the `kv` cache): the fused attention kernel for
                  a prompt; the decode kernel for one new token, treating the contiguous cache
                  as a paged one whose block table is 0, 1, 2, …
    attend_paged  the `paged` cache, read through the block table — no gathered copy of the
                  sequence's K/V is ever made (caps.paged_native): the PagedAttention kernel for
                  one decode query, the fused kernel in its paged mode for a prompt
    attend_paged_rows
                  a packed batch of many sequences (engine/runner.py): the PagedAttention kernel
                  once for every row, each row following its own sequence's block table

On a machine without a GPU the same kernels run under Triton's interpreter (TRITON_INTERPRET=1
in the environment before the first call) — slowly, in NumPy, but exactly the code the GPU runs,
which is how CI tests them. Importing this file never needs triton; only using the backend does.
"""

from __future__ import annotations

import math

import torch

from . import register
from .base import AttentionBackend, Capabilities


def _pow2(n: int, at_least: int = 1) -> int:
    """The next power of two ≥ n: Triton's tl.arange only makes power-of-two ranges."""
    return max(at_least, 1 << (int(n) - 1).bit_length())


@register
class TritonAttention(AttentionBackend):
    name = "triton"
    caps = Capabilities(needs_cuda=True, paged_native=True,
                        description="Triton kernels: fused FlashAttention prefill, "
                                    "PagedAttention decode through the block table")

    def __init__(self, tile: int = 64, split_blocks: int = 8, max_splits: int = 64, **options):
        # Query/key tile of the fused kernel. tl.dot needs tiles of at least 16 on a GPU,
        # and tl.arange a power of two, so the requested size is rounded up.
        self.block = _pow2(tile, at_least=16)
        # Decode: each split of the block table holds at least `split_blocks` blocks, and
        # there are at most `max_splits` splits (see _paged_decode).
        self.split_blocks, self.max_splits = max(1, int(split_blocks)), max(1, int(max_splits))
        self._kernel = "—"

    def unavailable_reason(self, device: torch.device) -> str | None:
        try:
            from .triton_kernels import interpreting
        except ImportError as exc:
            return f"Triton is not installed ({exc.msg}); `pip install triton` (Linux)"
        if device.type == "cuda":
            return None if torch.cuda.is_available() else "CUDA is not available on this machine"
        if interpreting():
            return None
        return (f"Triton kernels need a CUDA GPU; on {device.type} set TRITON_INTERPRET=1 to run "
                f"them in Triton's (slow) interpreter")

    def last_info(self) -> dict:
        return {"kernel": self._kernel}

    # ------------------------------------------------------------------ contiguous K/V
    def attend(self, q, k, v, q_offset: int) -> torch.Tensor:
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        if q.shape[0] == 1 and q.shape[2] == 1:
            # One decode query: the decode kernel, reading the contiguous cache as if it were
            # paged in blocks of `block` keys with the table 0, 1, 2, … — to a kernel a block
            # is only a stride. (The fused kernel would fill 1 of its 16+ query rows.)
            page = self.block
            table = torch.arange(q_offset // page + 1, dtype=torch.int32, device=q.device)
            return self._paged_decode(q, k, v, table[None], *_one_sequence(q_offset, 1, q.device),
                                      page, (page * k.stride(2), k.stride(1), k.stride(2)),
                                      (page * v.stride(2), v.stride(1), v.stride(2)))
        return self._fused(q, k, v, None, k.shape[2], q_offset)

    # ------------------------------------------------------------------ paged K/V
    def attend_paged(self, q, k_pool, v_pool, block_table, seq_len: int,
                     q_offset: int) -> torch.Tensor:
        """q: (1, H, Tq, hd); pools: (num_blocks, n_kv, block_size, hd); block_table int32."""
        if q.shape[0] != 1:
            raise ValueError("the paged cache holds one sequence per block table (batch 1)")
        q = q if q.stride(-1) == 1 else q.contiguous()
        if q.shape[2] > 1:
            # A prompt: many queries, so the fused kernel (tl.dot on query tiles) pays off; it
            # gathers each key tile through the block table.
            return self._fused(q, k_pool, v_pool, block_table, seq_len, q_offset)
        page = k_pool.shape[2]
        table = block_table[:q_offset // page + 1]            # the blocks up to this position
        return self._paged_decode(q, k_pool, v_pool, table[None],
                                  *_one_sequence(q_offset, 1, q.device), page,
                                  k_pool.stride()[:3], v_pool.stride()[:3])

    def attend_paged_rows(self, q, k_pool, v_pool, tables, row_seq, row_pos) -> torch.Tensor:
        """A packed batch: q (1, H, N, hd) holds N query rows of several sequences; row t
        belongs to sequence row_seq[t] (its block table is tables[row_seq[t]], int32, padded
        to the longest) and sits at position row_pos[t]. One kernel launch for all of them."""
        q = q if q.stride(-1) == 1 else q.contiguous()
        return self._paged_decode(q, k_pool, v_pool, tables, row_seq, row_pos, k_pool.shape[2],
                                  k_pool.stride()[:3], v_pool.stride()[:3])

    # ------------------------------------------------------------------ kernel launches
    def _fused(self, q, k, v, table, Tk: int, q_offset: int) -> torch.Tensor:
        """k, v: (B, n_kv, Tk, hd) — or pools (num_blocks, n_kv, page, hd) when table is given."""
        from .triton_kernels import interpreting, kernels
        attention_fwd, _ = kernels()
        B, H, Tq, hd = q.shape
        n_kv = k.shape[1]
        paged = table is not None
        out = torch.empty(B, H, Tq, hd, dtype=q.dtype, device=q.device)   # (B, H, Tq, hd)
        grid = (triton_cdiv(Tq, self.block), B * H)    # (query blocks, batch × heads)
        attention_fwd[grid](
            q, k, v, out, table if paged else q,       # (an unused pointer without a table)
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
            H, H // n_kv, Tq, Tk, q_offset, 1.0 / math.sqrt(hd), k.shape[2] if paged else 1,
            HD=hd, BLOCK_D=_pow2(hd, 16), BLOCK_M=self.block, BLOCK_N=self.block,
            # fp32 inputs: true fp32 products (a GPU's default, tf32, keeps only 10 mantissa bits)
            PRECISION="ieee" if q.dtype == torch.float32 else "tf32", UPCAST=interpreting(),
            PAGED=paged)
        self._kernel = "fused attention" + (" (paged)" if paged else "")
        return out

    def _paged_decode(self, q, k_pool, v_pool, tables, row_seq, row_pos, block_size: int,
                      k_strides, v_strides) -> torch.Tensor:
        """tables: (n_seqs, n_blocks) int32; row_seq, row_pos: (Tq,) int32, one per query row;
        k_strides, v_strides: (block, head, slot) strides of the pools, in elements."""
        from .triton_kernels import kernels
        _, paged_decode = kernels()
        _, H, Tq, hd = q.shape
        n_kv = k_pool.shape[1]
        G = H // n_kv
        # Flash-Decoding's split: enough programs to fill a GPU (n_kv × S of them per row), each
        # with at least `split_blocks` blocks so the merge stays cheap; no split is left empty
        # for the longest row (a shorter row's last splits are, and weigh nothing).
        n_blocks = tables.shape[1]
        per_split = max(self.split_blocks, triton_cdiv(n_blocks, self.max_splits))
        S = triton_cdiv(n_blocks, per_split)
        acc = torch.empty(Tq, H, S, hd, dtype=torch.float32, device=q.device)  # (Tq, H, S, hd)
        m = torch.empty(Tq, H, S, dtype=torch.float32, device=q.device)        # (Tq, H, S)
        l = torch.empty_like(m)
        paged_decode[(Tq, n_kv, S)](
            q, k_pool, v_pool, acc, m, l, tables, row_seq, row_pos,
            q.stride(1), q.stride(2), tables.stride(0), *k_strides, *v_strides,
            H, 1.0 / math.sqrt(hd), per_split,
            G=G, BLOCK_G=_pow2(G, 2), HD=hd, BLOCK_D=_pow2(hd), BLOCK_SIZE=block_size,
            BLOCK_N=_pow2(block_size))
        # The merge. Split s summed exp(score − m_s); rescaled to the common max they add up:
        # out = Σ_s w_s·acc_s / Σ_s w_s·l_s with w_s = exp(m_s − max m) — the log-sum-exp merge
        # of flash.py written with (m, l) instead of lse = m + log l. An empty split (past the
        # row's position) has m = −∞, l = 0, acc = 0 and weighs nothing.
        w = torch.exp(m - m.amax(dim=-1, keepdim=True))                         # (Tq, H, S)
        out = (w[..., None] * acc).sum(2) / (w * l).sum(2)[..., None]           # (Tq, H, hd)
        self._kernel = f"paged attention ({S} split{'s' if S > 1 else ''})"
        return out.transpose(0, 1).unsqueeze(0).to(q.dtype)                     # (1, H, Tq, hd)


def _one_sequence(q_offset: int, tq: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """row_seq, row_pos for the rows of one sequence: table row 0, positions q_offset…"""
    return (torch.zeros(tq, dtype=torch.int32, device=device),
            torch.arange(q_offset, q_offset + tq, dtype=torch.int32, device=device))


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)
