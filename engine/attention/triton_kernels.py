"""The two Triton kernels of the `triton` backend, written as plain functions.

    attention_fwd   fused causal attention for a block of queries: FlashAttention-2's loop
                    (online softmax over K/V tiles) in one kernel. Used for prefill (K/V
                    contiguous, or gathered tile by tile through a block table) and for decode
                    when the cache is contiguous.
    paged_decode    attention for query rows whose K/V live in the paged pool: each row follows
                    its sequence's block table, one block of keys at a time (vLLM's
                    PagedAttention), all query heads of a K/V group together — one new token of
                    one sequence, or the rows of a packed batch of many (engine/runner.py).

Why not `@triton.jit` on the definitions? Triton decides *when the decorator runs* whether a
kernel is compiled for the GPU or run by its NumPy interpreter (env TRITON_INTERPRET=1). A
decorator at import time would freeze that choice for the whole process, so `kernels()` wraps the
functions on first use, once per mode. Triton reads the source text of these functions, so they
may only use `tl` operations and their arguments.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl


def attention_fwd(Q, K, V, O, table,
                  s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_ob, s_oh, s_ot,
                  H, G, Tq, Tk, q_offset, scale, PAGE,
                  HD: tl.constexpr, BLOCK_D: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
                  UPCAST: tl.constexpr, PAGED: tl.constexpr):
    """One program = BLOCK_M queries of one head. Q, O: (B, H, Tq, HD); K, V: (B, n_kv, Tk, HD),
    any strides with the last one 1. Query i sits at position q_offset + i.

    With PAGED, K and V are block pools (num_blocks, n_kv, PAGE, HD) of one sequence (B = 1)
    and key j is found in slot j % PAGE of block table[j // PAGE]: a prompt written into the
    paged cache is attended to without gathering it first."""
    pid_m = tl.program_id(0)
    b = tl.program_id(1) // H
    h = tl.program_id(1) % H
    kvh = h // G                                       # grouped-query attention: the shared head
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)   # (BLOCK_M,) query rows
    offs_n = tl.arange(0, BLOCK_N)                     # (BLOCK_N,) key columns within a tile
    offs_d = tl.arange(0, BLOCK_D)                     # head dim, padded to a power of two
    d_ok = offs_d < HD
    q_ok = offs_m < Tq
    q = tl.load(Q + b * s_qb + h * s_qh + offs_m[:, None] * s_qt + offs_d[None, :],
                mask=q_ok[:, None] & d_ok[None, :], other=0.0)          # (BLOCK_M, BLOCK_D)
    if UPCAST:   # the interpreter's tl.dot gets bf16 wrong (triton 3.9): multiply in fp32 there
        q = q.to(tl.float32)
    qpos = q_offset + offs_m
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)   # running max
    l_i = tl.zeros([BLOCK_M], tl.float32)                 # running sum
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)        # unnormalised output
    # Causality: no query of this block looks past the block's last position.
    hi = tl.minimum(Tk, q_offset + (pid_m + 1) * BLOCK_M)
    for start in range(0, hi, BLOCK_N):
        kpos = start + offs_n
        k_ok = kpos < Tk
        if PAGED:   # a gather: each key row has its own block
            blk = tl.load(table + kpos // PAGE, mask=k_ok, other=0).to(tl.int64)   # (BLOCK_N,)
            k_row = blk * s_kb + (kpos % PAGE) * s_kt
            v_row = blk * s_vb + (kpos % PAGE) * s_vt
        else:
            k_row = b * s_kb + kpos * s_kt
            v_row = b * s_vb + kpos * s_vt
        k = tl.load(K + kvh * s_kh + k_row[:, None] + offs_d[None, :],
                    mask=k_ok[:, None] & d_ok[None, :], other=0.0)      # (BLOCK_N, BLOCK_D)
        v = tl.load(V + kvh * s_vh + v_row[:, None] + offs_d[None, :],
                    mask=k_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale   # (BLOCK_M, BLOCK_N)
        s = tl.where((kpos[None, :] <= qpos[:, None]) & k_ok[None, :], s, float("-inf"))
        # The first tile holds key 0, visible to every row, so m_new is finite from then on.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)                   # rescale what was summed under the old max
        p = tl.exp(s - m_new[:, None])                # (BLOCK_M, BLOCK_N)
        l_i = l_i * alpha + tl.sum(p, 1)
        # Like FlashAttention, P goes into the matmul in V's dtype (bf16 on tensor cores).
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(O + b * s_ob + h * s_oh + offs_m[:, None] * s_ot + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=q_ok[:, None] & d_ok[None, :])


def paged_decode(Q, K_pool, V_pool, Acc, M, L, table, row_seq, row_pos,
                 s_qh, s_qt, s_tb, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt,
                 H, scale, blocks_per_split,
                 G: tl.constexpr, BLOCK_G: tl.constexpr, HD: tl.constexpr,
                 BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program = one query row × one K/V head × one *split* of that row's block table, with
    all G query heads of the group, so each key block is read from memory once per group.

    Q: (1, H, Tq, HD); K_pool, V_pool: (num_blocks, n_kv, BLOCK_SIZE, HD); table: int32
    (n_seqs, blocks), one block table per row, row stride s_tb. Query row t belongs to sequence
    row_seq[t] and sits at position row_pos[t], so it reads table row row_seq[t] and sees keys
    0 … row_pos[t]. For one sequence every row uses table row 0; a packed batch of several
    sequences (engine/runner.py) mixes them, each row following its own table.
    A decode step has a single query per sequence, so without splits only n_kv programs per
    sequence would run — a few of a GPU's ~100 cores, each walking a whole cache. Split like
    Flash-Decoding, each program walks `blocks_per_split` blocks and writes its unnormalised
    state — acc, running max m, running sum l — to Acc (Tq, H, S, HD), M and L (Tq, H, S), all
    float32; the caller merges the S partial results."""
    t = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    S = tl.num_programs(2)
    pos = tl.load(row_pos + t)                         # this query sees keys 0 … pos
    row_table = table + tl.load(row_seq + t).to(tl.int64) * s_tb
    offs_g = tl.arange(0, BLOCK_G)
    g_ok = offs_g < G
    heads = kvh * G + offs_g                           # (BLOCK_G,) the query heads of the group
    offs_n = tl.arange(0, BLOCK_N)                     # slots in a block (padded to a power of 2)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HD
    q = tl.load(Q + heads[:, None] * s_qh + t * s_qt + offs_d[None, :],
                mask=g_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)  # (BLOCK_G, BLOCK_D)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    # This split's logical blocks, up to the one holding pos. Block j's first slot (key j·BS)
    # is always visible, so m_i is finite after the first block of a non-empty split.
    first = split * blocks_per_split
    last = tl.minimum(first + blocks_per_split, pos // BLOCK_SIZE + 1)
    for j in range(first, last):
        block = tl.load(row_table + j).to(tl.int64)    # where logical block j lives in the pool
        kpos = j * BLOCK_SIZE + offs_n
        k_ok = (offs_n < BLOCK_SIZE) & (kpos <= pos)
        k = tl.load(K_pool + block * s_kb + kvh * s_kh + offs_n[:, None] * s_kt + offs_d[None, :],
                    mask=k_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        v = tl.load(V_pool + block * s_vb + kvh * s_vh + offs_n[:, None] * s_vt + offs_d[None, :],
                    mask=k_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        # A handful of query rows: a broadcast multiply-and-sum instead of tl.dot, which would
        # need at least 16 rows. Decode is limited by reading K/V, not by arithmetic.
        s = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale         # (BLOCK_G, BLOCK_N)
        s = tl.where(k_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        m_i = m_new
    row = (t * H + heads) * S + split                  # (BLOCK_G,) index into (Tq, H, S)
    tl.store(Acc + row[:, None] * HD + offs_d[None, :], acc, mask=g_ok[:, None] & d_ok[None, :])
    tl.store(M + row, m_i, mask=g_ok)
    tl.store(L + row, l_i, mask=g_ok)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


_compiled: dict[bool, tuple] = {}


def kernels():
    """(attention_fwd, paged_decode) as Triton kernels for the current mode (GPU or interpreter)."""
    mode = interpreting()
    if mode not in _compiled:
        _compiled[mode] = (triton.jit(attention_fwd), triton.jit(paged_decode))
    return _compiled[mode]
