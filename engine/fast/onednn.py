"""oneDNN (PyTorch's `mkldnn`) products for the CPU: a weight reordered into oneDNN's blocked
layout for a given number of rows, then any number of rows multiplied against it.

    W (out, in)  ──reorder──▶  W' (oneDNN's blocks)        torch.ops.mkldnn._reorder_linear_weight
    y = x · Wᵀ + b                                          torch.ops.mkldnn._linear_pointwise

Same dot products as `F.linear` (MKL), another order of additions: results move in the last bits.
Two users: the batch engine keeps a reordered copy of every projection (engine/packed_linear.py),
and a long prompt with GGUF weights reorders each freshly dequantised matrix for its own rows
(engine/fast/gguf_weights.py) — 2.1–2.4× MKL's speed on the project's CPU at 507 rows.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def reorder(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """`weight` (out, in), float32, in oneDNN's blocked layout for products of `rows` rows."""
    return torch.ops.mkldnn._reorder_linear_weight(weight, rows)


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (…, in) · Wᵀ + b with W reordered by `reorder`."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


@functools.cache
def onednn_works() -> bool:
    """Whether oneDNN is built in and a trial product agrees with F.linear (asked once)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        w = torch.linspace(-1, 1, 24).reshape(6, 4)                 # a trial product
        x = torch.linspace(-2, 2, 16).reshape(4, 4)
        return torch.allclose(linear(x, reorder(w, 4), None), F.linear(x, w), atol=1e-5)
    except (RuntimeError, AttributeError):                          # no such op, no kernel
        return False
