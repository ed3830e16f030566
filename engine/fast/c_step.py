"""`--kernel c`: the whole decode step of a Llama-family model as one call into C.

Profile of the PyTorch step on the project's 2-core CPU, with the matrix–vector products
already at memory bandwidth (gemv.c): ~16 ms per token went to the other ~40 small operations
per layer — RMSNorm's five ops, RoPE's slices and concatenations, the cache write, SDPA on one
query, SiLU, the residual adds — each a Python call and a dispatch for a vector of 576 floats.
That is as long as streaming all the float32 weights once. decode_step.c does the same
arithmetic in plain loops, so one step is one ctypes call and nearly all of its time is spent
reading weights.

This file only gathers pointers: for every layer, where each projection's rows (and, for int8,
their scales and biases) start inside the model's own tensors — a fused `wqkv` is simply three
row ranges of one matrix — plus the norms, the RoPE tables and the KV cache's storage. Nothing
is copied, so the prompt is prefilled by the PyTorch model as usual and the C step carries on
from the same cache. The step also fills the attention rows the app's heatmap draws.

Scope: CPU, float32 activations, float32 or int8 (`--weights int8`) projections, the `kv` and
`paged` caches, Llama and Qwen2 checkpoints (GPT-2's LayerNorm/GELU/learned positions are not
written out here). Anything else is refused with a ConfigError that says why.
"""

from __future__ import annotations

import ctypes

import numpy as np
import torch
import torch.nn as nn

from ..cache import ContiguousKVCache, PagedKVCache
from ..config import ConfigError
from ..model import Transformer
from . import kernels
from .gguf_weights import GGUFEmbedding, GGUFLinear
from .quant import Int8Linear

P = ctypes.c_void_p
_PER_LAYER = ["wq", "wk", "wv", "wo", "wgate", "wup", "wdown",
              "sq", "sk", "sv", "so", "sgate", "sup", "sdown",
              "bq", "bk", "bv", "attn_norm", "mlp_norm"]


class Model(ctypes.Structure):
    """Mirror of `Model` in decode_step.c: same fields, same order."""
    _fields_ = ([(n, ctypes.c_int64) for n in
                 ("dim", "n_layers", "n_heads", "n_kv", "head_dim", "ffn", "vocab")]
                + [("eps", ctypes.c_float), ("format", ctypes.c_int32),
                   ("head_format", ctypes.c_int32)]
                + [(n, P) for n in _PER_LAYER]
                + [(n, P) for n in ("final_norm", "tok_emb", "head", "head_scale",
                                    "rope_cos", "rope_sin", "k_cache", "v_cache")]
                + [("block", ctypes.c_int64)]
                + [("gtype", P), ("head_gtype", ctypes.c_int32), ("emb_gtype", ctypes.c_int32),
                   ("q_outs", P), ("k_outs", P)])


def why_not(model: Transformer) -> str | None:
    """None when the C step can run this model here, else the reason it cannot."""
    if kernels.library() is None:
        return f"the C kernels could not be built here ({kernels.why_unavailable()})"
    if model.device.type != "cpu":
        return f"the C step runs on the CPU, the model is on {model.device.type}"
    if model.dtype != torch.float32:
        return f"the C step computes in float32, the model is {str(model.dtype)[6:]}"
    if model.cfg.family not in ("llama", "qwen2"):
        return f"the C step is written for Llama/Qwen2 models, not {model.cfg.family}"
    return None


class _Rows:
    """One projection's tensors, and pointers to any of its rows: a fused matrix such as `wqkv`
    is handed to C as three row ranges (Q's rows, then K's, then V's)."""

    def __init__(self, module: nn.Module):
        self.gtype, self.map = -1, None            # GGUF blocks: the ggml type, the row map
        if isinstance(module, GGUFLinear):
            self.format = 3                                          # GGUF blocks
            self.w, self.s, self.b = module.blocks, None, module.bias
            self.gtype, self.map = module.matrix.kernel_type(kernels.library()), module.rows
        elif isinstance(module, Int8Linear):
            # decode_step.c's `format`: 1 = int8 row-major, 2 = int8 in 4×8 tiles
            self.format = 2 if module.tiled else 1
            self.w, self.s, self.b = module.qweight, module.scale, module.bias
        elif isinstance(module, nn.Linear) and module.weight.dtype == torch.float32:
            self.format = 0                                          # float32 row-major
            self.w, self.s = module.weight.detach().contiguous(), None
            self.b = None if module.bias is None else module.bias.detach()
        else:
            raise ConfigError(f"the C step reads float32 or int8 projections, not "
                              f"{type(module).__name__} ({module.extra_repr()}); drop "
                              f"--layout cols / 16-bit --weights with --kernel c")

    def at(self, start: int = 0) -> tuple[int, int | None, int | None]:
        """Pointers to row `start` (a multiple of 4 for tiled weights: tiles hold 4 rows)."""
        assert self.format != 2 or start % 4 == 0
        assert self.format != 3 or start == 0       # GGUF matrices are never fused
        cols = self.w.shape[1]                # (bytes per row, for GGUF blocks)
        w = self.w.data_ptr() + start * cols * self.w.element_size()
        s = None if self.s is None else self.s.data_ptr() + 4 * start
        b = None if self.b is None else self.b.data_ptr() + 4 * start
        return w, s, b


class CDecoder:
    """Decode steps of `model` on `cache` through decode_step.c. Same API as StaticDecoder."""

    def __init__(self, model: Transformer, cache, record_rows: bool = False):
        reason = why_not(model)
        if reason:
            raise ConfigError(f"--kernel c: {reason}")
        cfg = model.cfg
        self.model, self.cache, self.record_rows = model, cache, record_rows
        self.rows: np.ndarray | None = None       # (n_layers, n_heads, T) of the last step
        self._keep = []                           # tensors whose addresses the struct holds
        H, KV, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        ptrs: dict[str, list] = {n: [] for n in _PER_LAYER}
        kinds = set()
        gtypes: list[int] = []                    # GGUF: per layer, q k v o gate up down
        qk_maps = None
        for block in model.layers:
            att, mlp = block.attn, block.mlp
            if att.wqkv is not None:
                qkv = _Rows(att.wqkv)
                parts = [qkv.at(0), qkv.at(H * hd), qkv.at((H + KV) * hd)]
                kinds.add(qkv.format)
                self._keep.append(qkv)
                qkv_rows = [qkv] * 3
            else:
                qkv_rows = rows = [_Rows(att.wq), _Rows(att.wk), _Rows(att.wv)]
                parts = [r.at() for r in rows]
                self._keep += rows
                kinds.update(r.format for r in rows)
                qk_maps = qk_maps or (rows[0].map, rows[1].map)   # the same in every layer
            for name, (w, s, b) in zip("qkv", parts):
                ptrs[f"w{name}"].append(w)
                ptrs[f"s{name}"].append(s)
                ptrs[f"b{name}"].append(b)
            if mlp.w_gate_up is not None:
                gu = _Rows(mlp.w_gate_up)
                gate, up = gu.at(0), gu.at(cfg.ffn_dim)
                kinds.add(gu.format)
                self._keep.append(gu)
                gate_up_rows = [gu] * 2
            else:
                g, u = _Rows(mlp.w_gate), _Rows(mlp.w_up)
                gate, up = g.at(), u.at()
                self._keep += [g, u]
                kinds.update((g.format, u.format))
                gate_up_rows = [g, u]
            o, down = _Rows(att.wo), _Rows(mlp.w_down)
            kinds.update((o.format, down.format))
            self._keep += [o, down]
            gtypes += [r.gtype for r in (*qkv_rows, o, *gate_up_rows, down)]
            for name, (w, s, _) in (("o", o.at()), ("gate", gate), ("up", up),
                                    ("down", down.at())):
                ptrs[f"w{name}"].append(w)
                ptrs[f"s{name}"].append(s)
            ptrs["attn_norm"].append(block.attn_norm.weight.data_ptr())
            ptrs["mlp_norm"].append(block.mlp_norm.weight.data_ptr())
        if len(kinds) != 1:
            raise ConfigError("--kernel c needs every projection in one format (float32, "
                              "int8 in one layout, or GGUF blocks)")
        head = _Rows(model.lm_head)
        k_layers, v_layers, self.block = self._cache_layout(cache)
        # C reads the RoPE tables by address: they must cover every slot before it is taken.
        slots = cache.capacity if isinstance(cache, ContiguousKVCache) \
            else cache.pool.num_blocks * self.block
        model.ensure_rope(slots)

        m = Model(dim=cfg.dim, n_layers=cfg.n_layers, n_heads=H, n_kv=KV, head_dim=hd,
                  ffn=cfg.ffn_dim, vocab=cfg.vocab_size, eps=cfg.norm_eps, format=kinds.pop(),
                  head_format=head.format, block=self.block)
        for name, values in ptrs.items():
            setattr(m, name, self._array(values))
        m.k_cache, m.v_cache = self._array(k_layers), self._array(v_layers)
        m.head, m.head_scale, _ = head.at()
        m.final_norm = model.norm.weight.data_ptr()
        m.rope_cos, m.rope_sin = model.rope_cos.data_ptr(), model.rope_sin.data_ptr()
        self._keep.append(head)             # the model itself is kept by self.model
        if isinstance(model.tok_emb, GGUFEmbedding):         # GGUF blocks (gguf_weights.py)
            m.tok_emb = model.tok_emb.blocks.data_ptr()
            m.emb_gtype = model.tok_emb.matrix.kernel_type(kernels.library())
        else:
            m.tok_emb, m.emb_gtype = model.tok_emb.weight.data_ptr(), -1
        m.head_gtype = head.gtype
        if m.format == 3:
            types = torch.tensor(gtypes, dtype=torch.int32)
            self._keep.append(types)
            m.gtype = types.data_ptr()
            # The row maps inverted (stored row r makes output outs[r]): C then reads Q's and
            # K's rows in the order they are stored.
            outs = [None if t is None else torch.empty_like(t).index_put_(
                (t.long(),), torch.arange(len(t), dtype=torch.int32)) for t in qk_maps]
            self._keep += outs
            m.q_outs, m.k_outs = (None if t is None else t.data_ptr() for t in outs)
        self.struct = m

    def _array(self, values: list) -> int:
        """A C array of pointers (NULLs allowed), kept alive as long as the decoder."""
        arr = torch.tensor([0 if v is None else v for v in values], dtype=torch.int64)
        self._keep.append(arr)
        return arr.data_ptr()

    @staticmethod
    def _cache_layout(cache) -> tuple[list[int], list[int], int]:
        """Per-layer base addresses of K and V, and the tokens per block. A contiguous cache is
        one block of `capacity` tokens: (1, n_kv, capacity, hd) is a block of the paged layout."""
        if isinstance(cache, ContiguousKVCache):
            k, v, block = cache.k, cache.v, cache.capacity
        elif isinstance(cache, PagedKVCache):
            k, v, block = cache.pool.k, cache.pool.v, cache.pool.block_size
        else:
            raise ConfigError("--kernel c needs a KV cache (strategy kv or paged)")
        if k.dtype != torch.float32:
            raise ConfigError("--kernel c needs a float32 KV cache")
        return [t.data_ptr() for t in k], [t.data_ptr() for t in v], block

    def _table(self) -> torch.Tensor:
        if isinstance(self.cache, PagedKVCache):
            return self.cache.block_table.to(torch.int32).contiguous()
        return torch.zeros(1, dtype=torch.int32)

    def step(self, token: int, pos: int) -> torch.Tensor:
        """Write position `pos` into the cache and return the next token's logits (vocab,)."""
        if not 0 <= token < self.model.cfg.vocab_size:     # C would read past the embedding
            raise IndexError(f"token id {token} is outside the vocabulary "
                             f"({self.model.cfg.vocab_size})")
        self.cache.reserve(pos + 1)
        table = self._table()
        logits = torch.empty(self.model.cfg.vocab_size, dtype=torch.float32)
        rows = None
        if self.record_rows:
            cfg = self.model.cfg
            rows = torch.empty(cfg.n_layers, cfg.n_heads, pos + 1, dtype=torch.float32)
        status = kernels.library().decode_step(ctypes.addressof(self.struct), token, pos,
                                               table.data_ptr(), logits.data_ptr(),
                                               None if rows is None else rows.data_ptr(),
                                               torch.get_num_threads())
        if status != 0:
            raise MemoryError("the C decode step could not allocate its scratch vectors")
        self.cache.commit(pos + 1)
        self.rows = None if rows is None else rows.to(torch.float16).numpy()
        return logits
