"""Fewer bytes per token: projections stored in 16 or 8 bits.

A decode step reads every weight once and does two flops with it, so on a CPU it is limited by
memory bandwidth, not arithmetic: halve the bytes and the step can take up to half the time.

    float32   4 bytes/weight   the reference
    bfloat16  2               float32's exponent, 8 bits of mantissa; fast where the CPU has
                              native bf16 dot products (AVX512-BF16, AMX) or on a GPU — on a
                              plain AVX2 CPU PyTorch converts in software and it is *slower*
    float16   2               on the CPU through fbgemm's packed fp16 GEMM: weights are widened
                              to float32 in registers (F16C), activations stay float32
    int8      1 + scales      symmetric, one scale per output channel (row):
                                  s_r = max_c |W[r, c]| / 127,   q = round(W / s_r) ∈ [-127, 127]
                              and W ≈ s_r · q. Worst-case error per weight is s_r / 2.

The int8 kernel: for one token on the CPU, a small C kernel (gemv.c, built by kernels.py)
reads the int8 weights, widens them to float32 in registers and accumulates in float32 — exact
weight-only int8, one byte per weight read. For it the weights are stored in tiles of 4 rows ×
8 columns (`pack_tiles`), so the kernel reads memory in one sequential stream (measured ~2× the
row-major layout's speed on the project's CPU). Otherwise (a prompt of several tokens, CUDA, no C
compiler) the weights are widened in PyTorch just before the matmul: the same numbers, without
the bandwidth saving — for a prompt on the CPU into one reused float32 buffer, so a prompt costs
what float32's does (a matrix widened into cache, then the same GEMM). (fbgemm's "dynamic" int8
GEMM was measured and rejected: it also rounds each activation row to 8 bits, and this model's
activations have outlier channels — it changed the very first greedy token. See
docs/fast_path.md.)

Nothing here is exact: tests bound the divergence instead of demanding identical tokens.
"""

from __future__ import annotations

import threading

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..model import Transformer
from . import kernels


_reused = threading.local()


def reused_float32(numel: int) -> torch.Tensor:
    """A float32 buffer of `numel` elements, one per thread, grown when needed and otherwise
    reused: prompts widen (int8) or dequantise (GGUF) weights matrix after matrix into it."""
    buf = getattr(_reused, "buf", None)
    if buf is None or buf.numel() < numel:
        buf = _reused.buf = torch.empty(numel, dtype=torch.float32)
    return buf[:numel]


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float → int8 (out, in) and float32 scales (out,), symmetric per row."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0                   # (out,)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)     # (out, in)
    return q, scale


def pack_tiles(q: torch.Tensor) -> torch.Tensor:
    """(rows, cols) → the same numbers in tiles of 4 rows × 8 columns, tile after tile:
    (rows/4, cols/8, 4, 8), flattened. Rows 4b…4b+3 then start at element 4b · cols, so a row
    range that starts at a multiple of 4 (a fused matrix's Q, K, V parts) is still a tile range."""
    rows, cols = q.shape
    return q.view(rows // 4, 4, cols // 8, 8).transpose(1, 2).contiguous().view(rows, cols)


def unpack_tiles(t: torch.Tensor) -> torch.Tensor:
    """The inverse of pack_tiles: back to (rows, cols) row-major."""
    rows, cols = t.shape
    return t.view(rows // 4, cols // 8, 4, 8).transpose(1, 2).reshape(rows, cols)


class Int8Linear(nn.Module):
    """Per-channel int8 weights; y = (x · qᵀ) ⊙ s + b, computed in float32."""

    def __init__(self, linear: nn.Module, kernel: str = "auto"):
        super().__init__()
        weight = _dense_weight(linear)
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        q, scale = quantize_per_channel(weight)
        if kernel == "auto":
            kernel = "gemv" if weight.device.type == "cpu" and kernels.available() else "dequant"
        self.kernel = kernel
        # The C kernel reads 4×8 tiles when it can (AVX2 build, shape divisible into tiles).
        self.tiled = (kernel == "gemv" and kernels.vectorised() and
                      self.out_features % 4 == 0 and self.in_features % 8 == 0)
        self.register_buffer("qweight", pack_tiles(q) if self.tiled else q)   # int8, (out, in)
        self.register_buffer("scale", scale)                  # (out,) float32
        bias = getattr(linear, "bias", None)
        self.register_buffer("bias", None if bias is None else bias.detach().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "gemv" and x.numel() == self.in_features and x.dtype == torch.float32:
            y = kernels.int8_gemv(x.reshape(-1).contiguous(), self.qweight, self.scale, self.bias,
                                  self.out_features, self.in_features, self.tiled)
            return y.view(*x.shape[:-1], self.out_features)
        on_cpu = x.dtype == torch.float32 and x.device.type == "cpu"
        w = self.float_rows() if on_cpu else self.int8_rows().to(x.dtype)
        y = F.linear(x, w) * self.scale.to(x.dtype)                           # w: (out, in)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def int8_rows(self) -> torch.Tensor:
        """The int8 weights as (out, in) row-major, whatever the stored layout."""
        return unpack_tiles(self.qweight) if self.tiled else self.qweight

    def float_rows(self) -> torch.Tensor:
        """The int8 weights as float32 (out, in), widened into a reused per-thread buffer (valid
        until the next call): a prompt's GEMM then reads a matrix that is still in cache, and no
        allocation faults in fresh pages for every projection of every prompt."""
        rows, cols = self.out_features, self.in_features
        out = reused_float32(rows * cols).view(rows, cols)
        lib = kernels.library()
        if lib is not None and self.qweight.device.type == "cpu":
            lib.int8_widen(self.qweight.data_ptr(), int(self.tiled), rows, cols, out.data_ptr(),
                           torch.get_num_threads())
        elif self.tiled:     # tiles (rows/4, cols/8, 4, 8) → rows, widened in the same copy
            out.view(rows // 4, 4, cols // 8, 8).copy_(
                self.qweight.view(rows // 4, cols // 8, 4, 8).permute(0, 2, 1, 3))
        else:
            out.copy_(self.qweight)
        return out

    def stored_bytes(self) -> int:
        return self.qweight.nbytes + self.scale.nbytes + (0 if self.bias is None else
                                                          self.bias.nbytes)

    def extra_repr(self) -> str:
        tiles = ", 4×8 tiles" if self.tiled else ""
        return (f"in={self.in_features}, out={self.out_features}, int8 per-channel, "
                f"{self.kernel}{tiles}")


class HalfLinear(nn.Module):
    """Weights kept in a 16-bit dtype, activations in whatever the model uses (float32 here)."""

    def __init__(self, linear: nn.Module, dtype: torch.dtype):
        super().__init__()
        weight = _dense_weight(linear)
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.register_buffer("weight", weight.detach().to(dtype))           # (out, in)
        bias = getattr(linear, "bias", None)
        self.register_buffer("bias", None if bias is None else bias.detach().float())
        self._packed = None
        if dtype == torch.float16 and weight.device.type == "cpu" and \
                hasattr(torch.ops.quantized, "linear_prepack_fp16"):
            # fbgemm packs fp16 weights into its own blocked layout; the kernel widens them to
            # float32 in registers, so the arithmetic stays float32.
            self._packed = torch.ops.quantized.linear_prepack_fp16(weight.detach().float(),
                                                                   self.bias)
            self.weight = self.weight[:0]       # the packed copy is the one read; drop this one
            self._bytes = weight.numel() * 2 + (0 if self.bias is None else self.bias.nbytes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._packed is not None:
            return torch.ops.quantized.linear_dynamic_fp16(x.float(), self._packed).to(x.dtype)
        y = F.linear(x.to(self.weight.dtype), self.weight).to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def stored_bytes(self) -> int:
        if self._packed is not None:
            return self._bytes
        return self.weight.nbytes + (0 if self.bias is None else self.bias.nbytes)

    def extra_repr(self) -> str:
        kind = "fbgemm fp16" if self._packed is not None else str(self.weight.dtype)
        return f"in={self.in_features}, out={self.out_features}, {kind}"


def _dense_weight(linear: nn.Module) -> torch.Tensor:
    """(out, in) weight of an nn.Linear or a layout.ColumnLinear."""
    if hasattr(linear, "weight_t"):
        # .t() is a strided view; quantising it would keep those strides, and the C kernel
        # reads qweight as row-major (out, in) — so make it contiguous first.
        return linear.weight_t.detach().t().contiguous()
    return linear.weight.detach()


def quantize_linears(model: Transformer, weights: str, include_head: bool = True) -> Transformer:
    """In place: every projection (and the LM head unless excluded) stored as `weights`."""
    from .layout import ColumnLinear
    make = {"int8": lambda l: Int8Linear(l),
            "int8-dequant": lambda l: Int8Linear(l, kernel="dequant"),
            "float16": lambda l: HalfLinear(l, torch.float16),
            "bfloat16": lambda l: HalfLinear(l, torch.bfloat16)}[weights]
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, (nn.Linear, ColumnLinear)) and \
                    (include_head or child is not model.lm_head):
                setattr(parent, name, make(child))
    return model
