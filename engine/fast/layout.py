"""Weight layout: store a projection as (in, out) instead of nn.Linear's (out, in).

`nn.Linear` keeps W as (out_features, in_features) and computes x·Wᵀ. For one token, x is a
single row, and how fast the BLAS library streams W depends on which way W is laid out in memory
and which kernel that picks (a GEMV over rows, or a GEMM with one row). The numbers are the same
dot products either way; only the order of the memory reads and of the additions changes (so the
results can differ in the last bits, never in the greedy tokens we test).

Which layout is faster is a property of the machine and the BLAS library, not of the model: pick
it by measurement (`python main.py bench --fast-table --fast cols`). On the 2-core CPU this project
was measured on, the (in, out) "cols" layout read the LM head (49152 × 576) about twice as fast.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..model import Transformer


class ColumnLinear(nn.Module):
    """y = x @ W_t + b with W_t stored contiguous as (in, out)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # A new tensor (not a view): for a tied LM head this is a second copy of the embedding
        # matrix — more memory, but each decode step still reads the head only once.
        self.weight_t = nn.Parameter(linear.weight.detach().t().contiguous(),
                                     requires_grad=False)                     # (in, out)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(),
                                                                  requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.matmul(x, self.weight_t)                                    # (…, out)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, layout=(in, out)"


def to_column_layout(model: Transformer, include_head: bool = True) -> Transformer:
    """In place: every nn.Linear (optionally except the LM head) becomes a ColumnLinear."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and (include_head or child is not model.lm_head):
                setattr(parent, name, ColumnLinear(child))
    return model
