"""The model runner: one scheduled step as one forward pass over a packed batch.

Decoding is limited by memory bandwidth: at batch 1 every step reads every weight (540 MB for the
embedded model in float32) to produce one token. With B sequences in the same forward, the same
weight read serves B tokens — each projection becomes a (B × d) · (d × d') matrix product instead
of B matrix–vector products. That is the whole point of batching.

The step's new tokens are packed side by side in one row, no padding (vLLM's "varlen" layout):

    tokens     [ a7 | b3 b4 b5 b6 | c9 | d2 ]    a, c, d decode one token; b runs a prompt chunk
    positions  [ 70 |  3  4  5  6 | 91 | 20 ]    each token's own position (RoPE, GPT-2's table)
    logits at  [  ✓ |           ✓ |  ✓ |  ✓ ]    the last row of every sequence that samples

The model treats every token independently except in attention, where each query may only see
its own sequence's keys. `PagedBatchAttention` is the model's `attend` door for such a batch.
In every layer it first writes all the new K/V into their slots of the pool (slot = block
table[position // block_size], position % block_size), then lets each query read its own keys:

    decode rows     one masked attention call for all of them: each sequence's keys gathered
                    through its block table, padded to the longest, the padding masked out
                    (the PyTorch path; every device)
    prompt chunks   the chunk's queries against its sequence's keys, causal from its start,
                    through the chosen backend
    triton          one kernel launch for every row, each query following its own block table
                    (engine/attention/triton_kernels.py `paged_decode`): nothing is gathered

Writing before reading is what lets two requests admitted in the same step share a prefix block
that one of them is computing in that very step (engine/cache/block_manager.py).

On the CPU in float32 the forward runs on a copy of the model whose projections are fused and
packed once for few-row products (engine/packed_linear.py): with the model's own weights, 8 rows
cost 1.6–1.9× what 1 row costs; packed, ~1.1× (docs/batching.md, "Measured").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .attention import AttentionBackend
from .model import Transformer
from .packed_linear import packed_model
from .scheduler import Chunk


@dataclass(slots=True)
class Segment:
    """One sequence's rows in the packed batch."""
    row: int                    # its first row
    length: int                 # rows (tokens computed this step)
    start: int                  # position of its first row
    table: torch.Tensor         # its block table up to start + length, long


@dataclass(slots=True)
class PackedBatch:
    tokens: torch.Tensor        # (1, N) ids
    positions: torch.Tensor     # (N,)
    slot_blocks: torch.Tensor   # (N,) where each new K/V goes: block …
    slot_offsets: torch.Tensor  # (N,) … and slot in it
    segments: list[Segment]
    sample_rows: torch.Tensor   # (R,) rows whose logits are wanted
    # The PyTorch path: all one-token segments in one masked call.
    decode: list[Segment]       # segments of one row (decode steps)
    decode_rows: torch.Tensor   # (D,) their rows
    decode_tables: torch.Tensor  # (D, max blocks) long, padded with block 0
    decode_mask: torch.Tensor   # (D, 1, 1, max blocks · block size) 0 where a key is theirs,
                                # -inf elsewhere: built once a step, read by every layer
    only_decode: bool           # every row is a decode row, in order (the usual step)
    # The triton path: every row in one launch.
    tables: torch.Tensor        # (S, max blocks) int32, one block table per segment, padded
    row_seq: torch.Tensor       # (N,) int32 segment of each row
    row_pos: torch.Tensor       # (N,) int32 position of each row

    @classmethod
    def build(cls, chunks: list[Chunk], tables: dict[int, list[int]], block_size: int,
              device: torch.device, dtype: torch.dtype = torch.float32) -> "PackedBatch":
        ids, pos, blocks, offsets, samples, row_seq = [], [], [], [], [], []
        segments, seq_tables = [], []
        for s, c in enumerate(chunks):
            table = tables[c.seq.id][:-(-c.end // block_size)]   # blocks up to its last token
            segments.append(Segment(row=len(ids), length=c.length, start=c.start,
                                    table=torch.tensor(table, dtype=torch.long, device=device)))
            seq_tables.append(table)
            for p in range(c.start, c.end):
                blocks.append(table[p // block_size])
                offsets.append(p % block_size)
            ids += c.seq.tokens[c.start:c.end]
            pos += range(c.start, c.end)
            row_seq += [s] * c.length
            if c.samples:
                samples.append(len(ids) - 1)
        width = max(len(t) for t in seq_tables)
        padded = [t + [0] * (width - len(t)) for t in seq_tables]
        one = [i for i, s in enumerate(segments) if s.length == 1]
        decode_width = max((len(seq_tables[i]) for i in one), default=0)
        keys = torch.arange(decode_width * block_size, device=device)
        lengths = torch.tensor([segments[i].start + 1 for i in one], device=device)
        # The additive form of the mask (what SDPA makes of a boolean one, in every layer).
        mask = torch.zeros((len(one), 1, 1, len(keys)), dtype=dtype, device=device)
        mask.masked_fill_(keys >= lengths[:, None, None, None], float("-inf"))

        def long(x):
            return torch.tensor(x, dtype=torch.long, device=device)

        return cls(tokens=long([ids]), positions=long(pos), slot_blocks=long(blocks),
                   slot_offsets=long(offsets), segments=segments, sample_rows=long(samples),
                   decode=[segments[i] for i in one],
                   decode_rows=long([segments[i].row for i in one]),
                   decode_tables=long([padded[i][:decode_width] for i in one]),
                   decode_mask=mask, only_decode=len(one) == len(ids),
                   tables=torch.tensor(padded, dtype=torch.int32, device=device),
                   row_seq=torch.tensor(row_seq, dtype=torch.int32, device=device),
                   row_pos=torch.tensor(pos, dtype=torch.int32, device=device))


class PagedBatchAttention:
    """The `attend(layer, q, k, v)` door for a packed batch of sequences (see the module
    docstring). q: (1, H, N, hd); k, v: (1, n_kv, N, hd), the N new tokens of every sequence."""

    def __init__(self, backend: AttentionBackend, k_pool: torch.Tensor, v_pool: torch.Tensor,
                 batch: PackedBatch):
        self.backend, self.k_pool, self.v_pool, self.batch = backend, k_pool, v_pool, batch
        # SDPA takes a mask, so all decode rows go in one call; other backends take one
        # length per call, so each sequence is its own call.
        self.masked_decode = backend.name == "sdpa"

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        b = self.batch
        k_pool, v_pool = self.k_pool[layer], self.v_pool[layer]   # (blocks, n_kv, bs, hd)
        # 1. Write: every new key and value into its slot, before anyone reads.
        k_pool[b.slot_blocks, :, b.slot_offsets] = k[0].transpose(0, 1)   # (N, n_kv, hd)
        v_pool[b.slot_blocks, :, b.slot_offsets] = v[0].transpose(0, 1)
        self.backend.current_layer = layer
        if self.backend.caps.paged_native:
            return self.backend.attend_paged_rows(q, k_pool, v_pool, b.tables, b.row_seq,
                                                  b.row_pos)
        # 2. Read: each sequence's queries against its own keys.
        if self.masked_decode and b.only_decode:      # nothing to pick out or put back
            return decode_attention(q[0], k_pool, v_pool, b.decode_tables,
                                    b.decode_mask).unsqueeze(0)           # (1, H, N, hd)
        out = torch.empty_like(q)                                         # (1, H, N, hd)
        rest = b.segments
        if self.masked_decode and b.decode:
            rest = [s for s in b.segments if s.length > 1]
            out[0, :, b.decode_rows] = decode_attention(q[0, :, b.decode_rows], k_pool, v_pool,
                                                        b.decode_tables, b.decode_mask)
        for s in rest:
            keys, values = gather(k_pool, v_pool, s.table, s.start + s.length)
            rows = slice(s.row, s.row + s.length)
            out[:, :, rows] = self.backend.attend(q[:, :, rows], keys, values, q_offset=s.start)
        return out


def gather(k_pool: torch.Tensor, v_pool: torch.Tensor, table: torch.Tensor,
           length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence's K/V copied out of its blocks: (1, n_kv, length, hd) each."""
    n_kv, hd = k_pool.shape[1], k_pool.shape[3]
    # index_select, not k_pool[table]: the same copy, several times faster for small tables.
    k = k_pool.index_select(0, table).transpose(0, 1).reshape(n_kv, -1, hd)[:, :length]
    v = v_pool.index_select(0, table).transpose(0, 1).reshape(n_kv, -1, hd)[:, :length]
    return k.unsqueeze(0), v.unsqueeze(0)


def decode_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                     tables: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One new query per sequence, all sequences in one SDPA call.

    q: (H, D, hd), row i the query of sequence i; tables: (D, W) its block table, padded to the
    longest; mask: (D, 1, 1, W · block size), 0 for the keys 0 … position of sequence i and
    -inf after (a boolean mask works too). Each sequence's keys are gathered through its table;
    the mask hides the padding, so row i's softmax runs over exactly its own keys.
    Returns (H, D, hd)."""
    (D, W), (_, n_kv, bs, hd) = tables.shape, k_pool.shape
    flat = tables.reshape(-1)                                             # (D·W,)
    keys = (k_pool.index_select(0, flat).view(D, W, n_kv, bs, hd)         # (D, W, n_kv, bs, hd)
            .transpose(1, 2).reshape(D, n_kv, W * bs, hd))                # (D, n_kv, L, hd)
    values = (v_pool.index_select(0, flat).view(D, W, n_kv, bs, hd)
              .transpose(1, 2).reshape(D, n_kv, W * bs, hd))
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(2), keys, values,                     # q: (D, H, 1, hd)
        attn_mask=mask, enable_gqa=n_kv != q.shape[0])                    # → (D, H, 1, hd)
    return out[:, :, 0].transpose(0, 1)                                   # (H, D, hd)


class ModelRunner:
    """Owns the K/V pool tensors and runs a step's chunks through the model."""

    def __init__(self, model: Transformer, backend: AttentionBackend, num_blocks: int,
                 block_size: int, packed: bool = True):
        cfg = model.cfg
        # The forward runs on a copy whose projections are fused and packed for few-row
        # products (engine/packed_linear.py) where that applies; `model` stays untouched.
        model = packed_model(model) if packed else model
        shape = (cfg.n_layers, num_blocks, cfg.n_kv_heads, block_size, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=model.dtype, device=model.device)   # the pool
        self.v = torch.zeros(shape, dtype=model.dtype, device=model.device)
        self.model, self.backend, self.block_size = model, backend, block_size

    @property
    def bytes_per_block(self) -> int:
        return 2 * self.k[:, 0].nbytes

    @torch.inference_mode()
    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write: duplicate whole blocks (every layer, K and V) before they diverge."""
        if copies:
            src = torch.tensor([s for s, _ in copies], device=self.k.device)
            dst = torch.tensor([d for _, d in copies], device=self.k.device)
            self.k[:, dst] = self.k[:, src]
            self.v[:, dst] = self.v[:, src]

    @torch.inference_mode()
    def run(self, chunks: list[Chunk], tables: dict[int, list[int]],
            copies: list[tuple[int, int]] = ()) -> torch.Tensor:
        """(R, vocab) float32 logits: one row per chunk that samples, in chunk order."""
        self.copy_blocks(list(copies))
        self.model.ensure_rope(max(c.end for c in chunks))   # positions come as a tensor here
        batch = PackedBatch.build(chunks, tables, self.block_size, self.model.device,
                                  self.model.dtype)
        attend = PagedBatchAttention(self.backend, self.k, self.v, batch)
        logits = self.model(batch.tokens, 0, attend, positions=batch.positions,
                            rows=batch.sample_rows)                          # (1, R, vocab)
        return logits[0]
