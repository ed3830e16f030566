"""FlashAttention written in plain PyTorch operations — slow, but every step is visible.

The naive backend builds the whole (Tq × Tk) score matrix. FlashAttention (Dao et al., 2022)
never does: it walks over the keys/values in tiles of `tile` positions and keeps, for every query
row, only three running quantities (the *online softmax*, Milakov & Gimelshein 2018):

    m   the largest score seen so far                    (the running max)
    l   Σ exp(score − m) over the keys seen so far       (the running sum)
    acc Σ exp(score − m) · v over the keys seen so far   (the unnormalised output)

When a new tile brings a larger maximum m', everything accumulated so far was scaled by
exp(−m) instead of exp(−m'); multiplying l and acc by α = exp(m − m') fixes that. After the last
tile, out = acc / l is exactly softmax(QKᵀ/√d)·V — the same number, up to rounding, with only
one (tile × tile) block of scores alive at any moment.

Decoding has a single query row, so a loop over tiles would run one after the other with nothing
to do in parallel. Flash-Decoding (Dao et al., 2023) splits the cache into chunks instead,
attends to every chunk independently (on a GPU: in parallel), and merges the partial results
with their log-sum-exps. Here the "parallel" chunks are one batched tensor operation.

Grouped-query attention is handled by reshaping the queries to (B, n_kv, G, T, hd), so the G
query heads of a group broadcast against their one K/V head — nothing is copied.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import register
from .base import AttentionBackend, Capabilities


@register
class FlashAttention(AttentionBackend):
    name = "flash"
    caps = Capabilities(description="FlashAttention in PyTorch ops: tiled online softmax; "
                                    "Flash-Decoding split + log-sum-exp merge for one query")

    def __init__(self, tile: int = 64, trace: bool = False, **options):
        if int(tile) <= 0:
            raise ValueError(f"flash tile size must be positive, got {tile}")
        self.tile = int(tile)
        self.trace = trace
        # With `trace`: (layer, running max, running sum) of head 0 for the newest query after
        # each key/value tile, kept as tensors — turning them into Python floats would wait for
        # the GPU, in every layer. Each call overwrites it; see `tile_trace`.
        self._trace: tuple[int, torch.Tensor, torch.Tensor] | None = None
        self._mode = "—"

    @property
    def tile_trace(self) -> dict | None:
        """The fields of an engine.events.FlashTiles for the last call (after a forward step:
        the last layer), or None when tracing is off."""
        if self._trace is None:
            return None
        layer, m, l = self._trace
        return dict(layer=layer, head=0, tile_size=self.tile,
                    running_max=tuple(m.tolist()), running_sum=tuple(l.tolist()))

    def attend(self, q, k, v, q_offset: int) -> torch.Tensor:
        B, H, Tq, hd = q.shape
        n_kv = k.shape[1]
        G = H // n_kv                                            # query heads per K/V head
        # Fold 1/√d into q once instead of into every tile of scores.
        qg = q.float().reshape(B, n_kv, G, Tq, hd) / math.sqrt(hd)   # (B, n_kv, G, Tq, hd)
        if Tq == 1:
            self._mode = "flash-decoding"
            out = self._decode(qg, k, v, q_offset)
        else:
            self._mode = "tiled"
            out = self._tiled(qg, k, v, q_offset)
        return out.reshape(B, H, Tq, hd).to(q.dtype)                  # (B, H, Tq, hd)

    def last_info(self) -> dict:
        return {"kernel": self._mode, "tile": self.tile}

    # ------------------------------------------------------------------ prefill: the tile loops
    def _tiled(self, qg, k, v, q_offset: int) -> torch.Tensor:
        """FlashAttention-2's loop order: an outer loop over query tiles, an inner one over
        key/value tiles. qg: (B, n_kv, G, Tq, hd), already scaled; k, v: (B, n_kv, Tk, hd)."""
        Tq, T = qg.shape[3], self.tile
        out = torch.empty_like(qg)                                    # (B, n_kv, G, Tq, hd)
        for q0 in range(0, Tq, T):
            qt = qg[:, :, :, q0:q0 + T]                               # (B, n_kv, G, bq, hd)
            bq = qt.shape[3]
            qpos = torch.arange(q_offset + q0, q_offset + q0 + bq, device=qg.device)  # (bq,)
            m = qt.new_full(qt.shape[:-1] + (1,), float("-inf"))     # (B, n_kv, G, bq, 1)
            l = qt.new_zeros(qt.shape[:-1] + (1,))                   # (B, n_kv, G, bq, 1)
            acc = torch.zeros_like(qt)                               # (B, n_kv, G, bq, hd)
            trace_m, trace_l = [], []
            # Causality: no query of this tile looks past its last one, so later key tiles
            # are skipped entirely — about half the work of a prefill.
            k_end = min(k.shape[2], q_offset + q0 + bq)
            for k0 in range(0, k_end, T):
                kt = k[:, :, None, k0:k0 + T].float()                 # (B, n_kv, 1, bk, hd)
                vt = v[:, :, None, k0:k0 + T].float()                 # (B, n_kv, 1, bk, hd)
                s = qt @ kt.transpose(-2, -1)                         # (B, n_kv, G, bq, bk)
                kpos = torch.arange(k0, k0 + kt.shape[3], device=qg.device)
                if kpos[-1] > qpos[0]:       # the tile crosses the diagonal: mask the future
                    s = s.masked_fill(kpos[None, :] > qpos[:, None], float("-inf"))
                # Tile 0 holds key 0, which every query may see, so m is finite from then on
                # and exp(m − m_new) never meets −∞ − (−∞).
                m_new = torch.maximum(m, s.amax(dim=-1, keepdim=True))
                alpha = torch.exp(m - m_new)      # rescales what was summed under the old max
                p = torch.exp(s - m_new)          # (B, n_kv, G, bq, bk); masked → exp(−∞) = 0
                l = alpha * l + p.sum(dim=-1, keepdim=True)
                acc = alpha * acc + p @ vt                            # (B, n_kv, G, bq, hd)
                m = m_new
                if self.trace and q0 + bq == Tq:   # the tile holding the newest query
                    trace_m.append(m[0, 0, 0, -1, 0])
                    trace_l.append(l[0, 0, 0, -1, 0])
            out[:, :, :, q0:q0 + bq] = acc / l
            if trace_m:
                self._trace = (self.current_layer, torch.stack(trace_m), torch.stack(trace_l))
        return out

    # ------------------------------------------------------------------ decode: Flash-Decoding
    def _decode(self, qg, k, v, q_offset: int) -> torch.Tensor:
        """One query row per head. qg: (B, n_kv, G, 1, hd), scaled; k, v: (B, n_kv, Tk, hd)."""
        B, n_kv, G, _, hd = qg.shape
        T = self.tile
        n = q_offset + 1                           # keys this query may see: 0 … q_offset
        S = -(-n // T)                             # number of splits (chunks of the cache)
        pad = S * T - n                            # the last split is padded to a full tile
        kp = F.pad(k[:, :, :n].float(), (0, 0, 0, pad))               # (B, n_kv, S·T, hd)
        vp = F.pad(v[:, :, :n].float(), (0, 0, 0, pad))
        ks = kp.reshape(B, n_kv, 1, S, T, hd)                         # (B, n_kv, 1, S, T, hd)
        vs = vp.reshape(B, n_kv, 1, S, T, hd)
        s = qg.unsqueeze(3) @ ks.transpose(-2, -1)                    # (B, n_kv, G, S, 1, T)
        if pad:
            s[..., -1, :, T - pad:] = float("-inf")                   # padding is not a key
        # Each split is a small, independent softmax: its own max, sum and normalised output.
        m_s = s.amax(dim=-1, keepdim=True)                            # (B, n_kv, G, S, 1, 1)
        p = torch.exp(s - m_s)
        l_s = p.sum(dim=-1, keepdim=True)                             # (B, n_kv, G, S, 1, 1)
        o_s = (p @ vs) / l_s                                          # (B, n_kv, G, S, 1, hd)
        # The merge: split i's weight in the full softmax is exp(lse_i − lse), where lse_i =
        # log Σ_split exp(score) = m_i + log l_i and lse = log Σ_i exp(lse_i).
        lse_s = m_s + torch.log(l_s)                                  # (B, n_kv, G, S, 1, 1)
        lse = torch.logsumexp(lse_s, dim=3, keepdim=True)             # (B, n_kv, G, 1, 1, 1)
        out = (torch.exp(lse_s - lse) * o_s).sum(dim=3)               # (B, n_kv, G, 1, hd)
        if self.trace:
            self._record_splits(m_s[0, 0, 0, :, 0, 0], l_s[0, 0, 0, :, 0, 0])
        return out

    # ------------------------------------------------------------------ the trace for the UI
    def _record_splits(self, m_s: torch.Tensor, l_s: torch.Tensor) -> None:
        """Show the merge as if the splits were folded in one by one — the same running max and
        sum the tiled loop would have after each tile. m_s, l_s: (S,)."""
        m_run = torch.cummax(m_s, dim=0).values                       # (S,)
        # Σ_{j ≤ i} l_j · exp(m_j − m_run[i]), for every i: a small (S × S) triangle.
        w = l_s[None, :] * torch.exp(m_s[None, :] - m_run[:, None])   # (S, S)
        self._trace = (self.current_layer, m_run, torch.tril(w).sum(dim=1))
