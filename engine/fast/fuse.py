"""Fusion: stack the matrices that read the same input, so one matmul replaces two or three.

In a decode step every projection is a matrix–vector product: it streams the whole weight matrix
from memory to use each number once. Q, K and V all read the same normalised vector, and so do
the MLP's gate and up projections. Stacking their weights row-wise,

    [W_q; W_k; W_v] x  =  [W_q x; W_k x; W_v x]

gives the same numbers (each output row is still one dot product with x) from one kernel call
instead of three: fewer Python → C++ → BLAS launches per layer, one contiguous read instead of
three scattered ones, and the small K/V matrices (192 rows here) stop being too small to keep
both cores busy. GPT-2 checkpoints are already stored this way (`c_attn`); Llama's are not.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..model import Attention, MLP, Transformer


def stack_linears(*linears: nn.Linear) -> nn.Linear:
    """One nn.Linear whose output is the concatenation of the given ones' outputs."""
    first = linears[0]
    out = sum(l.out_features for l in linears)
    has_bias = any(l.bias is not None for l in linears)
    fused = nn.Linear(first.in_features, out, bias=has_bias,
                      device=first.weight.device, dtype=first.weight.dtype)
    with torch.no_grad():
        fused.weight.copy_(torch.cat([l.weight for l in linears], dim=0))   # (Σ out, in)
        if has_bias:
            fused.bias.copy_(torch.cat([l.bias if l.bias is not None
                                        else torch.zeros(l.out_features, dtype=fused.bias.dtype,
                                                         device=fused.bias.device)
                                        for l in linears]))
    return fused


def fuse_projections(model: Transformer) -> Transformer:
    """In place: Q/K/V → `wqkv`, gate/up → `w_gate_up`. The model's forward uses them when set."""
    for module in model.modules():
        if isinstance(module, Attention) and module.wqkv is None:
            module.wqkv = stack_linears(module.wq, module.wk, module.wv)
            del module.wq, module.wk, module.wv
        elif isinstance(module, MLP) and module.family != "gpt2" and module.w_gate_up is None:
            module.w_gate_up = stack_linears(module.w_gate, module.w_up)
            del module.w_gate, module.w_up
    return model
