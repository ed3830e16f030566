"""The batch engine's projections: fused, and packed once for small-batch matrix products.

A batched decode step multiplies a few rows — one new token per sequence, B of them — by every
weight matrix: (B × in) · (in × out). Read once, the weights serve B tokens; that is the point of
batching (engine/runner.py). It only works if the product with B rows costs about what the one
with one row costs. On the CPU, plain `F.linear` (MKL) does not deliver that: measured on the
2-core machine of docs/batching.md (1 thread, the embedded model's 211 products), 8 rows cost
1.6–1.9× one row, and 2 rows cost more than 4. A library that repacks (or streams) the weight
in a layout made for many rows spends the saving again at every call.

oneDNN (PyTorch's `mkldnn`) can reorder a weight *once* into the blocked layout its kernels
read best for a given number of rows, and then multiply any number of rows against it:

    W (out, in)  ──reorder once──▶  W' (oneDNN's blocks, for ~8 rows)
    y = x · Wᵀ + b                  torch.ops.mkldnn._linear_pointwise(x, W', b)

Same dot products, another order of additions (results move in the last bits, ~1e-6 in float32,
like any two BLAS libraries): the batching tests hold the batch engine to the lone run's tokens
and logits with this layer in place (tests/engine/test_batch.py, tests/engine/
test_packed_linear.py). Measured the same way: 8 rows then cost ~1.1× one row, and one row a
little less than with MKL (docs/batching.md, "Measured").

Q/K/V and gate/up are stacked first (engine/fast/fuse.py, exact): fewer, larger products.

The cost is memory: the packed copy is a second copy of every projection (the embedding and the
norms are shared) — for the embedded model in float32, +540 MB. It is built once per model and
kept while the model lives (so a model whose weights are changed in place afterwards would be
served with the old ones: nothing in the engine does that). Only float32 on the CPU, where oneDNN
is available; everything else runs the model as it is.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn as nn

from .fast import onednn, shallow_copy
from .fast.onednn import onednn_works, reorder      # (onednn_works: also this module's word)
from .fast.fuse import fuse_projections
from .model import RMSNorm, Transformer

# The number of rows the blocked layout is chosen for: the decode batch the engine is built for
# (any number of rows works; 4–16 all measured alike on the 2-core CPU).
ROWS = 8
# oneDNN picks other kernels for 1–3 rows, and on the 2-core CPU they were slower than its 4-row
# one (the embedded model's 121 products, 1 thread: 1 row 42 ms, 2 rows 48, 4 rows 33): fewer
# rows are padded with zeros to 4. Each output row depends only on its own input row, so the
# padding is computed and dropped, and changes nothing else.
MIN_ROWS = 4

_PACKED: "weakref.WeakKeyDictionary[Transformer, Transformer]" = weakref.WeakKeyDictionary()


class PackedLinear(nn.Module):
    """y = x · Wᵀ + b with W held in oneDNN's blocked layout (an opaque mkldnn tensor)."""

    def __init__(self, linear: nn.Linear, rows: int = ROWS):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = reorder(linear.weight.detach(), rows)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[-2]                                         # x: (…, rows, in)
        if rows >= MIN_ROWS:
            return onednn.linear(x, self.packed, self.bias)
        zeros = x.new_zeros(*x.shape[:-2], MIN_ROWS - rows, x.shape[-1])
        y = onednn.linear(torch.cat((x, zeros), dim=-2), self.packed, self.bias)  # (…, 4, out)
        return y[..., :rows, :]

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, layout=oneDNN blocks"


def can_pack(model: Transformer) -> bool:
    """Float32 on the CPU, projections that are plain nn.Linear (not GGUF blocks, int8 or
    16-bit weights), and a oneDNN in this PyTorch build that runs here."""
    if model.device.type != "cpu" or model.dtype != torch.float32:
        return False
    leaves = [m for block in model.layers for m in block.modules() if not list(m.children())]
    plain = all(type(m) is nn.Linear or isinstance(m, (RMSNorm, nn.LayerNorm)) for m in leaves)
    return plain and type(model.lm_head) is nn.Linear and onednn_works()


def pack_linears(model: Transformer, rows: int = ROWS) -> Transformer:
    """In place: every float32 nn.Linear (the LM head too) becomes a PackedLinear."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and child.weight.dtype == torch.float32:
                setattr(parent, name, PackedLinear(child, rows))
    return model


def packed_model(model: Transformer) -> Transformer:
    """The model the batch engine runs: a copy with fused, packed projections that shares the
    embedding and the norms (built once per model), or the model itself where packing does not
    apply. `model` itself never changes: it stays the reference a lone run uses."""
    if not can_pack(model):
        return model
    if model not in _PACKED:
        copy = shallow_copy(model)
        with torch.no_grad():
            pack_linears(fuse_projections(copy))
        _PACKED[model] = copy.eval()
    return _PACKED[model]
