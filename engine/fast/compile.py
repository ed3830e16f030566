"""`torch.compile` for the decode step: fewer Python calls and fused element-wise work.

Eager PyTorch runs each operation as its own call: per layer, a dozen small element-wise
kernels (RMSNorm's square/mean/rsqrt/multiply, RoPE's halves, SiLU × up, residual adds) each
walk their tensor and cost a few microseconds of Python and dispatch. TorchInductor traces the
step once and emits fused kernels (C++/OpenMP on the CPU, Triton on CUDA), leaving the big
matmuls to BLAS. It compiles the fixed-shape step (static_step.py), so one compilation serves
every position. Compilation takes tens of seconds on a small CPU: it happens when the decoder is
built, after the prefill (engine/decoding.py's build_decoder), so it is never counted as decode
time; the bench's fast-path table reports it as the variant's setup time.
"""

from __future__ import annotations

import torch

from .static_step import StaticDecoder


def compile_decoder(decoder: StaticDecoder, pos: int, mode: str | None = None) -> StaticDecoder:
    """Compile the decoder's step function in place and run it once to trigger compilation;
    that first run uses slot `pos` (the next one) as scratch."""
    compiled = torch.compile(decoder._eager, mode=mode, fullgraph=False, dynamic=False)
    decoder.prime(pos)
    with torch.inference_mode():
        compiled()          # the first call traces and compiles; it writes slot `pos`, which
    decoder._run = compiled                          # the first real step overwrites
    return decoder
