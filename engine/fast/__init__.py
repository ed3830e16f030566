"""The fast path: opt-in decode speed-ups, each one idea in its own file.

    fuse.py         Q/K/V and gate/up as one matmul each                       exact
    layout.py       projections stored (in, out) when the BLAS reads that faster  exact
    quant.py        16-bit or int8 (per-channel) weights: fewer bytes per token   lossy, reported
    gguf_weights.py a GGUF's own blocks, read in place (`--weights gguf`)       exact
    gguf_blocks.c   products and dequantisation straight from those blocks
    gguf_file.py    a GGUF's header and tensor table, read fast and bounds-checked
    static_step.py  a decode step with fixed shapes (tensor position, masked cache)
    compile.py      torch.compile of that step                                  exact
    cuda_graph.py   one CUDA-graph replay per step                              exact
    gemv.c          float32/int8 matrix–vector products at memory bandwidth (CPU)
    decode_step.c   the whole Llama decode step in one C call                   exact (±1e-5)
    c_step.py       its Python side: pointers into the model and the cache
    kernels.py      builds the C files with the system compiler
    threads.py      CPU thread settings
    measure.py      the numbers in docs/fast_path.md

`prepare(model, fast)` returns the model to decode with: the model itself when nothing changes
it, otherwise a transformed copy that shares the untouched tensors (embedding, norms) with the
original, built once per option set and remembered, so the plain model stays the reference.
`--weights gguf` is the exception: its model is built from the GGUF file the float32 model was
loaded from (the loader notes it as `model.gguf_path`), not from the float32 tensors.
"""

from __future__ import annotations

import copy
import weakref

import torch
import torch.nn as nn

from ..config import ConfigError, FastPathConfig
from ..model import Transformer
from .fuse import fuse_projections
from .layout import to_column_layout
from .quant import quantize_linears
from .static_step import StaticDecoder
from .threads import apply_threads

_VARIANTS: "weakref.WeakKeyDictionary[Transformer, dict]" = weakref.WeakKeyDictionary()


def shallow_copy(model: Transformer) -> Transformer:
    """A structural copy of the model whose parameters and buffers are the original tensors."""
    memo = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return copy.deepcopy(model, memo)


def prepare(model: Transformer, fast: FastPathConfig) -> Transformer:
    """The model with `fast`'s weight options applied (cached per model and option set)."""
    apply_threads(fast.threads)
    from .gguf_weights import is_block_model
    if is_block_model(model):
        if fast.changes_model and fast.weights != "gguf":
            raise ConfigError("this model was loaded with --weights gguf (its weights are the "
                              "file's blocks); other weight options need the float32 model")
        return model
    if not fast.changes_model:
        return model
    variants = _VARIANTS.setdefault(model, {})
    key = fast.key()
    if key not in variants and fast.weights == "gguf":
        variants[key] = gguf_variant(model)
    if key not in variants:
        fast_model = shallow_copy(model)
        with torch.no_grad():
            if fast.fuse:
                fuse_projections(fast_model)
            if fast.layout == "cols":
                to_column_layout(fast_model)
            if fast.weights != "same":
                quantize_linears(fast_model, fast.weights, include_head=fast.quantize_head)
        variants[key] = fast_model.eval()
    return variants[key]


def gguf_variant(model: Transformer) -> Transformer:
    """The block-format model of the GGUF file `model` was loaded from (for `--weights gguf`
    beside a float32 model: the app's `f` cycle, races, the bench)."""
    from .gguf_weights import arrange_for_kernels, load_block_model
    check_gguf(model)
    return arrange_for_kernels(load_block_model(model.gguf_path))


def check_gguf(model: Transformer) -> None:
    """Raise a ConfigError saying why `--weights gguf` cannot decode this model, if it cannot."""
    from .gguf_weights import is_block_model
    if is_block_model(model):
        return
    if getattr(model, "gguf_path", None) is None:
        raise ConfigError("--weights gguf reads a GGUF file's own blocks; this model was not "
                          "loaded from a .gguf file")
    if model.device.type != "cpu" or model.dtype != torch.float32:
        raise ConfigError("--weights gguf computes in float32 on the CPU; this model is "
                          f"{str(model.dtype)[6:]} on {model.device.type}")


def decode_bytes(model: Transformer) -> int:
    """Bytes of weights one decode step reads: every projection and norm, one embedding row.

    (The KV cache read is extra and grows with the position: see CacheStats.bytes_used.)
    """
    total = 0
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            total += module.weight[0].nbytes            # one row per token
        elif hasattr(module, "stored_bytes"):
            total += module.stored_bytes()
        elif not list(module.children()):
            total += sum(p.nbytes for p in module.parameters(recurse=False))
    return total           # a tied LM head is counted in full, as the head's own parameter


def check_c_step(model: Transformer, strategy: str) -> None:
    """Raise a ConfigError saying why `--kernel c` cannot decode this model here, if it cannot."""
    from ..config import ConfigError
    from .c_step import why_not
    if strategy == "naive":
        raise ConfigError("--kernel c decodes from a KV cache: use --strategy kv or paged")
    reason = why_not(model)
    if reason:
        raise ConfigError(f"--kernel c: {reason}")


def make_decoder(model: Transformer, cache, fast: FastPathConfig, next_pos: int,
                 record_rows: bool = False):
    """The decode step for `cache` that `fast` asks for: the C step, or the fixed-shape step,
    compiled and/or captured. Each has `step(token, pos) -> logits`; the C step also keeps the
    attention rows of its last step in `.rows` when `record_rows`."""
    if fast.kernel == "c":
        from .c_step import CDecoder
        return CDecoder(model, cache, record_rows=record_rows)
    decoder = StaticDecoder(model, cache)
    if fast.compile:
        from .compile import compile_decoder
        compile_decoder(decoder, next_pos)
    if fast.cuda_graphs and model.device.type == "cuda":
        from .cuda_graph import capture_decoder
        capture_decoder(decoder, next_pos)
    return decoder


class FastSteps:
    """The fast path as engine.decoding's StepBuilder: decoding is handed this object (by the
    session, the bench, the tests) instead of importing this package."""

    def prepare(self, model: Transformer, fast: FastPathConfig) -> Transformer:
        return prepare(model, fast)

    def check(self, model: Transformer, strategy: str, fast: FastPathConfig) -> None:
        if fast.kernel == "c":
            check_c_step(model, strategy)
        if fast.weights == "gguf":
            check_gguf(model)

    def decoder(self, model: Transformer, cache, fast: FastPathConfig, next_pos: int,
                record_rows: bool):
        return make_decoder(model, cache, fast, next_pos, record_rows) if fast.own_step else None


STEPS = FastSteps()

__all__ = ["prepare", "decode_bytes", "make_decoder", "check_c_step", "check_gguf",
           "shallow_copy", "StaticDecoder", "FastSteps", "STEPS"]
