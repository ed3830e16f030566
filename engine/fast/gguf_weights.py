"""`--weights gguf`: the model built straight from a GGUF file's memory map, weights kept in the
file's own quantised blocks.

The loader's usual path dequantises every tensor to float32 (538 MB for the embedded SmolLM2,
5.5× the file). Those float32 numbers *are* the blocks' formulas (d·q + m …), so nothing is lost
by keeping the blocks instead and rebuilding each weight in registers when it is used
(gguf_blocks.c): the same multiply-adds on the same numbers, at 4–8 bits of memory traffic per
weight instead of 32. The tests hold a block model to the float32 model of the same file:
logits within 1e-4 at every position, the same greedy tokens.

    GGUFLinear      a projection (or the LM head): y = W x with W in blocks. One token → the C
                    product straight from the blocks; a prompt → the matrix dequantised into a
                    reused float32 scratch and one GEMM: F.linear, as the float32 model (its
                    numbers bit for bit) — or, from ONEDNN_ROWS tokens on, oneDNN (2× faster
                    here, another order of additions)
    GGUFEmbedding   the token embedding: only the rows of the tokens asked for are dequantised
    load_block_model(path)   the Transformer, its projections pointing into the file's pages
    arrange_for_kernels(model)   each matrix put in the order this machine's kernels read

Nothing is copied at load time: norms and biases (a few KB) become float32 tensors, every other
weight stays a view of the file's copy-on-write memory map. Where the kernels read rows
rearranged (AVX-512 VNNI: 16 blocks at a time, GGUFMatrix.kernel_type), the rows are rearranged
in place once: those pages become this process's own — same size, the file is never written.
llama.cpp stores Llama's Q and K rows with each head's rotary halves interleaved; instead of
reordering them, the products read row `rows[i]` for output i (the loader's own
un-permutation, applied to row numbers; the C step inverts it and reads them in stored order).

Without a C compiler the same modules dequantise each matrix once, with gguf's numpy code, and
run float32 PyTorch (correct, without the bandwidth saving).
"""

from __future__ import annotations

import threading
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ConfigError, ModelConfig
from ..model import Transformer
from . import kernels, onednn
from .quant import reused_float32

# ggml type → name, for the types gguf_blocks.c reads (others are refused with their name).
TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0",
         12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 30: "BF16"}
# GGUF tensor name inside a block → (module path in this engine's Block, is it Q/K)
PROJECTIONS = {"attn_q": "attn.wq", "attn_k": "attn.wk", "attn_v": "attn.wv",
               "attn_output": "attn.wo", "ffn_gate": "mlp.w_gate", "ffn_up": "mlp.w_up",
               "ffn_down": "mlp.w_down"}
NORMS = {"attn_norm": "attn_norm", "ffn_norm": "mlp_norm"}

# From this many rows on, a prompt's product runs in oneDNN instead of MKL's F.linear: on the
# project's CPU (2 threads, the embedded model's shapes) 2.1–2.4× faster at 507 rows, the
# reorder included; below ~64 rows the reorder is not paid back.
ONEDNN_ROWS = 64


def row_bytes(ggml_type: int, cols: int) -> int:
    """Bytes of one stored row of `cols` weights (the block layout of gguf's own table)."""
    import gguf
    per_block, nbytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)]
    if cols % per_block:
        raise ConfigError(f"a row of {cols} weights is not a whole number of "
                          f"{TYPES.get(ggml_type, ggml_type)} blocks of {per_block}")
    return cols // per_block * nbytes


_NOT_YET = object()                     # GGUFMatrix._arranged_for before any reader asked


class GGUFMatrix:
    """One weight matrix as the file stores it: (rows, row_bytes) raw bytes of `ggml_type`.

    A build of the kernels may read some types faster with each row's blocks rearranged
    (gguf_blocks.c, "VNNI": 16 blocks at a time, same bytes): kernel_type() rearranges them in
    place, once, for the build about to read them — and back to the file's order for a build
    (or gguf's numpy code) that reads the file's order. Only a private copy-on-write map
    (`writable`) is ever rearranged; the file itself is never written."""

    def __init__(self, blocks: torch.Tensor, ggml_type: int, rows: int, cols: int,
                 writable: bool = False):
        if ggml_type not in TYPES:
            raise ConfigError(f"GGUF type {ggml_type} is not one the block kernels read "
                              f"(they read {', '.join(TYPES.values())})")
        expected = (rows, row_bytes(ggml_type, cols))
        if tuple(blocks.shape) != expected or blocks.dtype != torch.uint8:
            raise ConfigError(f"{TYPES[ggml_type]} matrix of {rows}×{cols}: expected "
                              f"{expected[0]}×{expected[1]} bytes, found {tuple(blocks.shape)}")
        self.blocks, self.type, self.rows, self.cols = blocks, ggml_type, rows, cols
        self.code = ggml_type            # the order the bytes are in now: a type code of a build
        self._writable, self._packer, self._lock = writable, None, threading.Lock()
        self._arranged_for = _NOT_YET    # the reader (kernel build or None) `code` was set for

    @property
    def type_name(self) -> str:
        return TYPES[self.type]

    def kernel_type(self, lib) -> int:
        """The type code to hand `lib` (a kernel build, or None for gguf's numpy code) with these
        blocks, after putting them in the order that reader expects."""
        if lib is self._arranged_for:    # every product after the first: no call into C
            return self.code
        want = self.type
        if lib is not None and self._writable:
            packed = lib.gguf_packed_type(self.type)
            want = packed if packed >= 0 else self.type
        if want != self.code:
            with self._lock:
                threads = torch.get_num_threads()
                args = (self.blocks.data_ptr(), self.rows, self.cols, threads)
                if want != self.code and self.code != self.type:      # back to the file's order
                    if self._packer.gguf_pack(self.code, *args) != self.type:
                        raise RuntimeError(f"gguf_pack could not restore a {self.type_name} matrix")
                    self.code = self.type
                if want != self.code:
                    if lib.gguf_pack(self.type, *args) != want:
                        raise RuntimeError(f"gguf_pack refused a {self.type_name} matrix")
                    self.code, self._packer = want, lib
        self._arranged_for = lib
        return self.code

    def dequantize(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The matrix (its rows `rows`, in that order, if given) as float32, exactly as
        gguf.quants.dequantize computes it."""
        n = self.rows if rows is None else rows.numel()
        lib = kernels.library()
        if lib is not None:
            out = torch.empty(n, self.cols, dtype=torch.float32)
            self._dequantize_into(out, rows)
            return out
        import gguf
        self.kernel_type(None)                             # the file's order, for numpy
        dense = gguf.quants.dequantize(self.blocks.numpy(), gguf.GGMLQuantizationType(self.type))
        dense = torch.from_numpy(np.ascontiguousarray(dense, dtype=np.float32))
        return dense if rows is None else dense[rows.long()]

    def _dequantize_into(self, out: torch.Tensor, rows: torch.Tensor | None) -> None:
        n = out.shape[0]
        idx = None if rows is None else rows.to(torch.int32).contiguous()
        lib = kernels.library()
        status = lib.gguf_dequant(
            self.kernel_type(lib), self.blocks.data_ptr(), None if idx is None else idx.data_ptr(),
            out.data_ptr(), n, self.cols, torch.get_num_threads())
        if status:
            raise RuntimeError(f"gguf_dequant refused a {self.type_name} matrix")


class GGUFLinear(nn.Module):
    """y = x Wᵀ (+ b) with W kept in GGUF blocks. `rows`: output i is stored row rows[i]."""

    def __init__(self, matrix: GGUFMatrix, bias: torch.Tensor | None = None,
                 rows: torch.Tensor | None = None):
        super().__init__()
        self.matrix = matrix
        self.in_features, self.out_features = matrix.cols, matrix.rows
        self.register_buffer("blocks", matrix.blocks, persistent=False)
        self.register_buffer("bias", None if bias is None else bias.float().contiguous())
        self.register_buffer("rows", None if rows is None else rows.to(torch.int32).contiguous(),
                             persistent=False)
        self._dense: torch.Tensor | None = None     # only without the C kernels

    @property
    def ggml_type(self) -> int:
        return self.matrix.type

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lib = kernels.library()
        if lib is not None and x.numel() == self.in_features and x.dtype == torch.float32 \
                and x.device.type == "cpu":
            # One token: the product straight from the blocks.
            xv = x.reshape(-1).contiguous()
            y = torch.empty(self.out_features, dtype=torch.float32)
            status = lib.gguf_gemv(self.matrix.kernel_type(lib), self.blocks.data_ptr(),
                                   None if self.rows is None else self.rows.data_ptr(),
                                   xv.data_ptr(), None if self.bias is None else
                                   self.bias.data_ptr(), y.data_ptr(), self.out_features,
                                   self.in_features, torch.get_num_threads())
            if status:
                raise RuntimeError(f"gguf_gemv refused a {self.matrix.type_name} matrix")
            return y.view(*x.shape[:-1], self.out_features)
        w = self.weight_for_prompt()
        rows = x.numel() // self.in_features
        if rows >= ONEDNN_ROWS and x.dtype == torch.float32 and x.device.type == "cpu":
            if onednn.onednn_works():
                # A long prompt: the freshly dequantised matrix reordered into oneDNN's blocks
                # for this many rows (~5 % of the product's time) and multiplied there.
                return onednn.linear(x, onednn.reorder(w, rows), self.bias)
        return F.linear(x, w, self.bias)

    def weight_for_prompt(self) -> torch.Tensor:
        """The float32 weight for a GEMM over several tokens: dequantised into the per-thread
        scratch (valid until the next call), or once and kept when there are no C kernels."""
        if kernels.library() is not None:
            w = reused_float32(self.out_features * self.in_features).view(self.out_features,
                                                                            self.in_features)
            self.matrix._dequantize_into(w, self.rows)
            return w
        if self._dense is None:
            self._dense = self.matrix.dequantize(self.rows)
        return self._dense

    def stored_bytes(self) -> int:
        return self.blocks.nbytes + (0 if self.bias is None else self.bias.nbytes)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, {self.matrix.type_name} "
                f"blocks{', rows reordered' if self.rows is not None else ''}")


class GGUFEmbedding(nn.Module):
    """Token embedding kept in GGUF blocks: forward dequantises only the rows it looks up."""

    def __init__(self, matrix: GGUFMatrix):
        super().__init__()
        self.matrix = matrix
        self.num_embeddings, self.embedding_dim = matrix.rows, matrix.cols
        self.register_buffer("blocks", matrix.blocks, persistent=False)

    @property
    def ggml_type(self) -> int:
        return self.matrix.type

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        flat = tokens.reshape(-1)
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= self.num_embeddings):
            raise IndexError(f"token id out of range for a vocabulary of {self.num_embeddings}")
        out = self.matrix.dequantize(flat)                              # (B·T, dim)
        return out.view(*tokens.shape, self.embedding_dim)

    def stored_bytes(self) -> int:
        return self.blocks.nbytes // self.num_embeddings       # one row per token, as nn.Embedding

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.matrix.type_name} blocks"


def is_block_model(model: nn.Module) -> bool:
    """True for a model made by load_block_model (its embedding is GGUF blocks)."""
    return isinstance(getattr(model, "tok_emb", None), GGUFEmbedding)


# ----------------------------------------------------------------------------- loading
def _matrix(tensor, rows: int, cols: int, what: str) -> GGUFMatrix:
    """A GGUFMatrix viewing `tensor`'s bytes in the file, after checking everything the C
    kernels will trust: the type, the shape the model expects, and the byte count."""
    ggml_type = int(tensor.tensor_type)
    shape = tuple(int(n) for n in tensor.shape)           # GGUF order: (cols, rows)
    if shape != (cols, rows):
        raise ConfigError(f"{what}: the file says {shape[::-1]}, the model needs ({rows}, {cols})")
    if ggml_type not in TYPES:
        raise ConfigError(f"{what} is {tensor.tensor_type.name}, which --weights gguf does not "
                          f"read (it reads {', '.join(TYPES.values())}); use --weights same")
    data = np.asarray(tensor.data)
    nbytes = rows * row_bytes(ggml_type, cols)
    if data.nbytes != nbytes:
        raise ConfigError(f"{what}: {data.nbytes} bytes in the file, {nbytes} expected "
                          f"(truncated or inconsistent GGUF)")
    with warnings.catch_warnings():
        # A read-only map stays so (PyTorch warns because it cannot mark a tensor read-only);
        # GGUFFile's copy-on-write map is writable, and only ever rearranged (kernel_type).
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        raw = torch.from_numpy(data.reshape(-1).view(np.uint8)).view(rows, nbytes // rows)
    return GGUFMatrix(raw, ggml_type, rows, cols, writable=data.flags.writeable)


def _floats(tensor, numel: int, what: str) -> torch.Tensor:
    """A small tensor (norm gain, bias) as a float32 copy."""
    import gguf
    if int(np.prod([int(n) for n in tensor.shape])) != numel:
        raise ConfigError(f"{what}: {tuple(int(n) for n in tensor.shape)} in the file, "
                          f"{numel} values expected")
    values = gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type)
    return torch.from_numpy(np.array(values, dtype=np.float32).reshape(numel))


def qk_rows(cfg: ModelConfig, n_heads: int) -> torch.Tensor | None:
    """For Llama: the stored row behind each output of Q (or K, with its head count) — the
    loader's un-permutation applied to row numbers. Qwen2 files keep Hugging Face's order."""
    if cfg.family != "llama":
        return None
    from ..loader import unpermute_qk
    out = n_heads * cfg.head_dim
    return unpermute_qk(torch.arange(out).view(out, 1), n_heads).reshape(out).to(torch.int32)


def load_block_model(path: str | Path, reader=None) -> Transformer:
    """The Transformer of a GGUF file with every matrix kept in the file's blocks (see above).

    Raises ConfigError when the file cannot be decoded this way (another architecture, a type
    the kernels do not read, shapes or sizes that do not add up)."""
    from ..loader import gguf_config
    from ..loader.weights import meta_model
    from .gguf_file import GGUFFile
    path = Path(path)
    reader = reader or GGUFFile(path)
    if getattr(reader, "byte_order", "I") == "S":
        raise ConfigError(f"{path.name} is a big-endian GGUF; --weights gguf reads "
                          f"little-endian files only")
    cfg = gguf_config(reader)
    if cfg.family not in ("llama", "qwen2"):
        raise ConfigError(f"--weights gguf decodes Llama and Qwen2 models, not {cfg.family}")
    tensors = {t.name: t for t in reader.tensors}
    H, KV, hd, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.dim
    out_dims = {"attn_q": (H * hd, D), "attn_k": (KV * hd, D), "attn_v": (KV * hd, D),
                "attn_output": (D, H * hd), "ffn_gate": (cfg.ffn_dim, D),
                "ffn_up": (cfg.ffn_dim, D), "ffn_down": (D, cfg.ffn_dim)}
    reorder = {"attn_q": qk_rows(cfg, H), "attn_k": qk_rows(cfg, KV)}

    def need(name: str):
        if name not in tensors:
            raise ConfigError(f"{path.name} has no tensor {name}")
        return tensors[name]

    with meta_model():                   # shapes only: every float module is replaced below
        model = Transformer(cfg)
    known = {"token_embd.weight", "output_norm.weight", "output.weight"}
    emb = _matrix(need("token_embd.weight"), cfg.vocab_size, D, "token_embd.weight")
    model.tok_emb = GGUFEmbedding(emb)
    head = emb if cfg.tie_embeddings else _matrix(need("output.weight"), cfg.vocab_size, D,
                                                  "output.weight")
    model.lm_head = GGUFLinear(head)
    model.norm.weight = nn.Parameter(_floats(need("output_norm.weight"), D, "output_norm"),
                                     requires_grad=False)
    for i, block in enumerate(model.layers):
        for g, (rows, cols) in out_dims.items():
            name = f"blk.{i}.{g}.weight"
            known.add(name)
            bias = None
            if cfg.qkv_bias and g in ("attn_q", "attn_k", "attn_v"):
                known.add(f"blk.{i}.{g}.bias")
                bias = _floats(need(f"blk.{i}.{g}.bias"), rows, f"blk.{i}.{g}.bias")
            parent, attr = PROJECTIONS[g].split(".")
            setattr(getattr(block, parent), attr,
                    GGUFLinear(_matrix(need(name), rows, cols, name), bias, reorder.get(g)))
        for g, attr in NORMS.items():
            name = f"blk.{i}.{g}.weight"
            known.add(name)
            getattr(block, attr).weight = nn.Parameter(_floats(need(name), D, name),
                                                       requires_grad=False)
    extra = sorted(set(tensors) - known)
    if extra:
        raise ConfigError(f"{path.name}: unexpected tensor {extra[0]} for a {cfg.family} model")
    # Only the RoPE tables are left on the meta device: compute them (float32, CPU).
    model.rope_cos = torch.empty(0)
    model.init_rope()
    model.gguf_path = str(path)            # (each block tensor keeps the memory map alive)
    return model.eval()


def arrange_for_kernels(model: Transformer) -> Transformer:
    """Put every matrix of a block model in the order this machine's kernels read (gguf_pack),
    now rather than at the first product, whose time would count as time to first token.
    (Done after the tokenizer is built: packing makes the weights' pages resident, and the
    tokenizer's temporary memory then no longer adds to the peak.)"""
    lib = kernels.library()
    if lib is not None:
        for matrix in {id(m.matrix): m.matrix for m in model.modules()
                       if isinstance(m, (GGUFLinear, GGUFEmbedding))}.values():
            matrix.kernel_type(lib)
    return model


def load_gguf_blocks(spec: str | None = None, device: str = "cpu", dtype: str = "float32",
                     progress=None):
    """`--weights gguf`: the model in the file's own quantised blocks, memory-mapped, and the
    tokenizer from its metadata — no conversion, no cache, no float32 copy. `spec` is found as
    engine.loader.load_model finds it (None: the embedded model). Returns a LoadedModel."""
    import time

    from ..loader import LoadedModel, begin_load, is_gguf
    from ..loader.gguf_tokenizer import tokenizer_from_gguf
    from ..loader.weights import check_tokenizer
    from ..tokenizer import Tokenizer
    from .gguf_file import GGUFFile
    t0 = time.perf_counter()
    dev, dt, path, name = begin_load(spec, device, dtype, progress)
    if path.is_dir() or not is_gguf(path):
        raise ConfigError(f"--weights gguf reads a GGUF file's own blocks; {path.name} is not "
                          f"a .gguf file")
    if dev.type != "cpu" or dt != torch.float32:
        raise ConfigError("--weights gguf computes in float32 on the CPU: use --device cpu and "
                          "--dtype float32")
    if progress:
        progress("mapping the GGUF blocks", 0.2)
    reader = GGUFFile(path)
    model = load_block_model(path, reader)
    if progress:
        progress("building the tokenizer", 0.6)
    tok, add_bos = tokenizer_from_gguf(reader)
    cfg = model.cfg
    check_tokenizer(cfg, tok.get_vocab_size(), path.name)
    reader.release_header()
    del reader          # its decoded metadata (~10 MB for the embedded vocabulary) goes now,
    arrange_for_kernels(model)          # before packing makes every weight page resident
    if progress:
        progress("ready", 1.0)
    return LoadedModel(model=model, tokenizer=Tokenizer(tok, cfg.bos_token_id, cfg.eos_token_ids,
                                                        add_bos),
                       config=cfg, name=name or path.name, source=str(path),
                       load_seconds=time.perf_counter() - t0)
