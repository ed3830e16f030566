"""What every attention backend promises, and the flags that say what else it can do.

A backend computes causal attention for a block of new queries against all keys so far:

    q: (B, n_heads, Tq, hd)         the queries of the new positions
    k, v: (B, n_kv_heads, Tk, hd)   keys and values of positions 0 … Tk-1 (cache + new)
    q_offset: the absolute position of q's first row, so query i sits at q_offset + i and may
              look at keys 0 … q_offset + i (the causal mask). For prefill q_offset = 0 and
              Tq = Tk; for one decode step Tq = 1 and q_offset = Tk - 1.

Grouped-query attention (n_heads > n_kv_heads) is the backend's job: query head h reads K/V head
h // (n_heads // n_kv_heads).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class Capabilities:
    needs_cuda: bool = False          # only runs on a CUDA device (or Triton's interpreter)
    returns_probs: bool = False       # can hand back the full probability matrix
    paged_native: bool = False        # reads K/V straight from the paged pool
    description: str = ""


class AttentionBackend:
    name: str = "base"
    caps: Capabilities = Capabilities()
    # The model layer of the coming call, set by the caller (engine.decoding.CachedAttention).
    # Backends ignore it, except to label what they record (the flash backend's tile trace).
    current_layer: int = 0

    def __init__(self, **options):
        """Backends take their tuning knobs as keyword options and ignore the others."""

    def unavailable_reason(self, device: torch.device) -> str | None:
        """None when this backend can run on `device`, else a one-line reason."""
        return None

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               q_offset: int) -> torch.Tensor:
        raise NotImplementedError

    def attend_paged(self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                     block_table: torch.Tensor, seq_len: int, q_offset: int) -> torch.Tensor:
        """Attention reading K/V through a block table (only if caps.paged_native).

        k_pool, v_pool: (num_blocks, n_kv, block_size, hd); block_table: (n_blocks_used,) int32.
        """
        raise NotImplementedError(f"{self.name} cannot read the paged cache directly")

    def attend_paged_rows(self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                          tables: torch.Tensor, row_seq: torch.Tensor,
                          row_pos: torch.Tensor) -> torch.Tensor:
        """A packed batch of several sequences read through their block tables (only if
        caps.paged_native; engine/runner.py). q: (1, H, N, hd), one query row per new token;
        tables: (n_seqs, n_blocks) int32; row t belongs to sequence row_seq[t] and sits at
        position row_pos[t] (both (N,) int32), so it sees that sequence's keys 0 … row_pos[t].
        """
        raise NotImplementedError(f"{self.name} cannot read the paged cache directly")

    def last_info(self) -> dict:
        """Anything worth showing about the last call (e.g. which SDPA kernel ran)."""
        return {}


def expand_kv(k: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(B, n_kv, T, hd) → (B, n_heads, T, hd) by repeating each K/V head for its query group."""
    n_kv = k.shape[1]
    if n_kv == n_heads:
        return k
    return k.repeat_interleave(n_heads // n_kv, dim=1)


def causal_mask(tq: int, tk: int, q_offset: int, device) -> torch.Tensor:
    """Boolean (Tq, Tk): True where query i (at q_offset+i) may see key j (j ≤ q_offset+i)."""
    qpos = torch.arange(q_offset, q_offset + tq, device=device)[:, None]
    kpos = torch.arange(tk, device=device)[None, :]
    return kpos <= qpos
