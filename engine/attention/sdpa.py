"""PyTorch's fused `scaled_dot_product_attention` — the "efficient" backend.

PyTorch picks a kernel itself: on CUDA a FlashAttention-2 kernel, a memory-efficient
(xFormers-style) kernel, or the plain math fallback; on the CPU a fused flash-style C++ kernel.
We report the pick so the UI and the bench can show it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import AttentionBackend, Capabilities, causal_mask


def _cuda_kernel_guess(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       mask: torch.Tensor | None, causal: bool) -> str:
    """Which SDPA kernel CUDA will run, by asking PyTorch's own eligibility checks with the
    same arguments as the real call (in PyTorch's order of preference: flash, then
    memory-efficient, else math)."""
    try:
        from torch.backends.cuda import (SDPAParams, can_use_efficient_attention,
                                         can_use_flash_attention)
        params = SDPAParams(q, k, v, mask, 0.0, causal, k.shape[1] != q.shape[1])
        if torch.backends.cuda.flash_sdp_enabled() and can_use_flash_attention(params):
            return "flash"
        if torch.backends.cuda.mem_efficient_sdp_enabled() and can_use_efficient_attention(params):
            return "memory-efficient"
    except Exception:   # older/newer PyTorch with another signature: say we do not know
        return "unknown"
    return "math"


class SDPAAttention(AttentionBackend):
    name = "sdpa"
    caps = Capabilities(description="torch.nn.functional.scaled_dot_product_attention")

    def __init__(self, **options):
        self._kernel = "—"

    def attend(self, q, k, v, q_offset: int) -> torch.Tensor:
        tq, tk = q.shape[2], k.shape[2]
        gqa = k.shape[1] != q.shape[1]
        if tq == tk and q_offset == 0:
            # Prefill: a plain causal mask, which lets the fused kernels skip masked tiles.
            mask, causal = None, True
        elif tq == 1:
            # One decode step: the new token may look at everything before it; no mask at all.
            mask, causal = None, False
        else:
            mask, causal = causal_mask(tq, tk, q_offset, q.device), False
        if q.is_cuda:
            self._kernel = _cuda_kernel_guess(q, k, v, mask, causal)
        else:
            self._kernel = "cpu-fused" if mask is None else "cpu-math"
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                              enable_gqa=gqa)

    def last_info(self) -> dict:
        return {"kernel": self._kernel}
