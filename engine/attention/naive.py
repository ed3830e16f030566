"""The textbook attention, and the reference every other backend is tested against.

    scores = Q Kᵀ / √d          (B, H, Tq, Tk)  — the whole matrix, materialised
    scores[masked] = −∞         a query may not look at later positions
    P = softmax(scores)         each row sums to 1
    out = P V                   (B, H, Tq, hd)

Memory grows as Tq × Tk: fine for one decode step, O(T²) for a long prefill.
"""

from __future__ import annotations

import math

import torch

from .base import AttentionBackend, Capabilities, causal_mask, expand_kv


class NaiveAttention(AttentionBackend):
    name = "naive"
    caps = Capabilities(returns_probs=True,
                        description="QKᵀ → mask → softmax → ×V, full score matrix (reference)")

    def probs(self, q, k, v, q_offset: int) -> torch.Tensor:
        """The attention probabilities (B, H, Tq, Tk), computed in float32."""
        H = q.shape[1]
        k = expand_kv(k, H)                                            # (B, H, Tk, hd)
        scores = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B,H,Tq,Tk)
        mask = causal_mask(q.shape[2], k.shape[2], q_offset, q.device)
        scores = scores.masked_fill(~mask, float("-inf"))
        return torch.softmax(scores, dim=-1)

    def attend(self, q, k, v, q_offset: int) -> torch.Tensor:
        p = self.probs(q, k, v, q_offset)                              # (B, H, Tq, Tk)
        v = expand_kv(v, q.shape[1]).float()                           # (B, H, Tk, hd)
        return (p @ v).to(q.dtype)                                     # (B, H, Tq, hd)
