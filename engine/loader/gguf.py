"""GGUF files (llama.cpp's format): opening one safely, its metadata checked, its tensors named.

    open_gguf(path)          a GGUFReader on a regular file, any parse error → ModelLoadError
    gguf_config(reader)      the metadata as a ModelConfig, checked against the tensors present
    tensor_plan(reader, cfg) every tensor: its Hugging Face name and how to turn it into that
    gguf_state_dict(...)     dequantised float32 tensors under Hugging Face's names
    unpermute_qk(w, heads)   llama.cpp's Q/K row order → Hugging Face's

A GGUF's metadata is a claim, not a fact: `block_count` may say 10^9 while the file holds two
layers, `context_length` may say 5·10^7. Every size is range-checked (config.MODEL_LIMITS) and
compared with the tensors actually present before anything is allocated from it; the RoPE tables
are sized by what runs need, not by `context_length` (model.py).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..config import ConfigError, ModelConfig, UnsupportedModel, check_size
from ..files import fd_path, open_regular
from .errors import ModelLoadError
from .weights import check_shapes

ARCHITECTURES = ("llama", "qwen2", "gpt2")

# llama.cpp's tensor names → Hugging Face's. "{i}" is the layer. (llama.cpp's
# src/llama-arch.cpp and convert_hf_to_gguf.py define the GGUF side.)
LLAMA_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    **{f"blk.{{i}}.{g}.{kind}": f"model.layers.{{i}}.{hf}.{kind}"
       for g, hf in (("attn_q", "self_attn.q_proj"), ("attn_k", "self_attn.k_proj"),
                     ("attn_v", "self_attn.v_proj"), ("attn_output", "self_attn.o_proj"),
                     ("ffn_gate", "mlp.gate_proj"), ("ffn_up", "mlp.up_proj"),
                     ("ffn_down", "mlp.down_proj"), ("attn_norm", "input_layernorm"),
                     ("ffn_norm", "post_attention_layernorm"))
       for kind in ("weight", "bias")},
}
GPT2_TENSORS = {
    "token_embd.weight": "transformer.wte.weight",
    "position_embd.weight": "transformer.wpe.weight",
    "output_norm.weight": "transformer.ln_f.weight",
    "output_norm.bias": "transformer.ln_f.bias",
    "output.weight": "lm_head.weight",
    **{f"blk.{{i}}.{g}.{kind}": f"transformer.h.{{i}}.{hf}.{kind}"
       for g, hf in (("attn_norm", "ln_1"), ("attn_qkv", "attn.c_attn"),
                     ("attn_output", "attn.c_proj"), ("ffn_norm", "ln_2"),
                     ("ffn_up", "mlp.c_fc"), ("ffn_down", "mlp.c_proj"))
       for kind in ("weight", "bias")},
}
# GPT-2's Conv1D weights are stored (in, out) by Hugging Face; llama.cpp's converter transposes
# them to (out, in) like every other matrix. These four are transposed back.
GPT2_CONV1D = ("attn_qkv", "attn_output", "ffn_up", "ffn_down")
_LAYER = re.compile(r"^blk\.(\d+)\.(.+)$")


def open_gguf(path: str | os.PathLike, fd: int | None = None):
    """A `gguf.GGUFReader` for `path`, opened safely.

    The path must be a regular file (a FIFO named model.gguf would block `open()` forever); the
    reader maps the very file that was checked (/proc/self/fd/N on Linux) — or the file already
    open at `fd`. A truncated file or one whose header lies about its sizes fails here, as a
    ModelLoadError naming the file: the reader raises many kinds of exception on a bad file."""
    try:
        import gguf
    except ImportError:
        raise ModelLoadError("reading GGUF files needs the `gguf` package: pip install gguf") \
            from None
    path = Path(path)
    own = fd is None
    if own:
        fd = open_regular(path)          # UntrustedPath (an OSError) if not a regular file
    try:
        return gguf.GGUFReader(fd_path(fd, path))
    except Exception as exc:
        raise ModelLoadError(f"{path.name} is not a valid GGUF file ({type(exc).__name__}: "
                             f"{str(exc)[:120]})") from None
    finally:
        if own:
            os.close(fd)                 # the memory map keeps its own reference


# ----------------------------------------------------------------------------- metadata
def _field(reader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return default
    try:
        return f.contents()
    except Exception:                    # a field whose type the reader cannot decode
        raise ModelLoadError(f"GGUF metadata {key} cannot be read") from None


def tensor_shapes(reader) -> dict[str, tuple[int, ...]]:
    """Every tensor's logical shape, in PyTorch's (row-major) order. GGUF lists dimensions
    innermost first (ggml's ne[0] is the row length), so they are reversed."""
    return {t.name: tuple(int(d) for d in reversed(t.shape.tolist())) for t in reader.tensors}


def gguf_config(reader) -> ModelConfig:
    """The model a GGUF describes, every claim checked before it is believed.

    Sizes must be integers within config.MODEL_LIMITS; the layer count must equal the
    `blk.N` tensors present; the vocabulary is the embedding's row count, and must hold every
    token of the tokenizer; the head layout must match the tensors (checked in full, tensor by
    tensor, by `tensor_plan`). Raises UnsupportedModel for an architecture this engine does not
    implement, ModelLoadError for metadata that is missing, mistyped or untrue."""
    arch = _field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise UnsupportedModel(f"unsupported architecture {arch!r}"[:120] +
                               f"; supported: {', '.join(ARCHITECTURES)}")

    def size(key: str, field: str, default: Any = None) -> int:
        value = _field(reader, f"{arch}.{key}", default)
        if value is None:
            raise ModelLoadError(f"GGUF metadata has no {arch}.{key}")
        try:
            return check_size(value, field, f"{arch}.{key}")
        except ConfigError as exc:
            raise ModelLoadError(f"GGUF {exc}") from None

    def number(key: str, default: float) -> float:
        value = _field(reader, f"{arch}.{key}", default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ModelLoadError(f"GGUF metadata {arch}.{key} must be a number, got {value!r}"
                                 [:200])
        return float(value)

    shapes = tensor_shapes(reader)
    n_layers = size("block_count", "n_layers")
    present = sorted({int(m.group(1)) for name in shapes if (m := _LAYER.match(name))})
    if present != list(range(n_layers)):
        held = f"blk.{present[0]} … blk.{present[-1]}" if present else "none"
        raise ModelLoadError(f"GGUF metadata says {arch}.block_count = {n_layers}, but the file "
                             f"holds tensors for {len(present)} layers ({held})")
    dim = size("embedding_length", "dim")
    n_heads = size("attention.head_count", "n_heads")
    n_kv = size("attention.head_count_kv", "n_kv_heads", n_heads)
    head_dim = size("attention.key_length", "head_dim", dim // n_heads)

    tokens = _field(reader, "tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens:
        raise ModelLoadError("GGUF metadata has no tokenizer.ggml.tokens: without its "
                             "vocabulary the model cannot read or write text")
    emb = shapes.get("token_embd.weight")
    if emb is None or len(emb) != 2:
        raise ModelLoadError(f"GGUF has no 2-D token_embd.weight (found {emb})")
    vocab = check_size(emb[0], "vocab_size", "token_embd.weight rows")
    if emb[1] != dim:
        raise ModelLoadError(f"GGUF token_embd.weight is {emb[1]} wide, but "
                             f"{arch}.embedding_length says {dim}")
    if len(tokens) > vocab:
        raise ModelLoadError(f"GGUF vocabulary has {len(tokens):,} tokens but token_embd.weight "
                             f"only {vocab:,} rows")
    if arch != "gpt2":
        rot = _field(reader, f"{arch}.rope.dimension_count")
        if rot is not None and rot != head_dim:
            raise UnsupportedModel(f"partial rotary embeddings ({arch}.rope.dimension_count = "
                                   f"{rot!r} of head_dim {head_dim}) are not supported"[:200])
    scaling = None
    kind = _field(reader, f"{arch}.rope.scaling.type")
    if kind == "linear":
        scaling = {"rope_type": "linear", "factor": number("rope.scaling.factor", 1.0)}
    elif kind not in (None, "none"):
        raise UnsupportedModel(f"RoPE scaling {kind!r} from GGUF metadata is not supported"[:120])

    def token_id(key: str) -> int | None:
        value = _field(reader, f"tokenizer.ggml.{key}")
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < vocab:
            raise ModelLoadError(f"GGUF tokenizer.ggml.{key} = {value!r} is not a token id "
                                 f"of the {vocab:,}-token vocabulary"[:200])
        return value

    eos = token_id("eos_token_id")
    try:
        return ModelConfig(
            family=arch, vocab_size=vocab, dim=dim, n_layers=n_layers, n_heads=n_heads,
            n_kv_heads=n_kv, head_dim=head_dim, ffn_dim=size("feed_forward_length", "ffn_dim"),
            max_seq_len=size("context_length", "max_seq_len"),
            norm_eps=number("attention.layer_norm_rms_epsilon",
                            number("attention.layer_norm_epsilon", 1e-5)),
            rope_theta=number("rope.freq_base", 10000.0), rope_scaling=scaling,
            tie_embeddings=_tied(reader, shapes),
            qkv_bias=arch == "qwen2" or "blk.0.attn_q.bias" in shapes,
            bos_token_id=token_id("bos_token_id"), eos_token_ids=(eos,) if eos is not None else ())
    except ConfigError as exc:
        raise ModelLoadError(f"GGUF metadata: {exc}") from None


def _tied(reader, shapes: dict) -> bool:
    """Does the LM head share the embedding? Yes without an `output.weight`; llama.cpp also
    writes GPT-2's shared matrix twice, so an output byte-for-byte equal to the embedding is the
    same matrix too."""
    if "output.weight" not in shapes:
        return True
    t = {t.name: t for t in reader.tensors}
    out, emb = t["output.weight"], t["token_embd.weight"]
    return (out.tensor_type == emb.tensor_type and shapes["output.weight"] ==
            shapes["token_embd.weight"] and np.array_equal(out.data, emb.data))


# ----------------------------------------------------------------------------- tensors
def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp stores Llama's Q and K rows with each head's rotary pairs interleaved
    (x0,y0,x1,y1,…); Hugging Face (and this engine) keep halves (x0,x1,…,y0,y1,…). Undo it.

    w: (n_heads · head_dim, in) → same shape, rows reordered within each head."""
    out_dim, in_dim = w.shape
    return w.reshape(n_heads, out_dim // n_heads // 2, 2, in_dim).transpose(1, 2) \
        .reshape(out_dim, in_dim)


@dataclass(frozen=True)
class TensorPlan:
    """One GGUF tensor and what it becomes: its Hugging Face name and shape, and the change of
    layout on the way (None, "transpose" for GPT-2's Conv1D, "unpermute" with a head count)."""
    tensor: Any                       # gguf.ReaderTensor
    hf_name: str
    hf_shape: tuple[int, ...]
    fix: Callable[[torch.Tensor], torch.Tensor] | None = None


def tensor_plan(reader, cfg: ModelConfig, source: str = "GGUF") -> list[TensorPlan]:
    """Name every tensor as Hugging Face would, and check the whole set against `cfg` before
    any is dequantised (unknown tensors, a missing one, a wrong shape: ModelLoadError)."""
    table = GPT2_TENSORS if cfg.family == "gpt2" else LLAMA_TENSORS
    plan = []
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        m = _LAYER.match(t.name)
        key = f"blk.{{i}}.{m.group(2)}" if m else t.name
        if key not in table:
            raise ModelLoadError(f"{source}: unexpected tensor {t.name} for a {cfg.family} model")
        hf_name = table[key].replace("{i}", m.group(1)) if m else table[key]
        if hf_name == "lm_head.weight" and cfg.tie_embeddings:
            continue                      # GPT-2's copy of the embedding (see _tied)
        kind = m.group(2).split(".")[0] if m else ""
        fix = None
        if cfg.family == "gpt2" and kind in GPT2_CONV1D and t.name.endswith(".weight") \
                and len(shape) == 2:
            fix, shape = _transpose, shape[::-1]
        elif cfg.family == "llama" and kind in ("attn_q", "attn_k") and t.name.endswith(".weight"):
            heads = cfg.n_heads if kind == "attn_q" else cfg.n_kv_heads
            if len(shape) != 2 or shape[0] % (2 * heads):
                raise ModelLoadError(f"{source}: {t.name} of shape {shape} does not split into "
                                     f"{heads} heads of rotary pairs")
            fix = _Unpermute(heads)
        plan.append(TensorPlan(t, hf_name, shape, fix))
    check_shapes(cfg, {p.hf_name: p.hf_shape for p in plan}, source)
    return plan


def _transpose(w: torch.Tensor) -> torch.Tensor:
    return w.t().contiguous()


@dataclass(frozen=True)
class _Unpermute:
    heads: int

    def __call__(self, w: torch.Tensor) -> torch.Tensor:
        return unpermute_qk(w, self.heads)


def gguf_state_dict(reader, cfg: ModelConfig, progress=None,
                    source: str = "GGUF") -> dict[str, torch.Tensor]:
    """Dequantise every tensor to float32 and name it as Hugging Face would (shapes checked
    first, by `tensor_plan`)."""
    import gguf
    plan = tensor_plan(reader, cfg, source)
    sd = {}
    for i, p in enumerate(plan):
        t = p.tensor
        try:
            arr = gguf.quants.dequantize(t.data, t.tensor_type)
        except (NotImplementedError, ValueError, KeyError) as exc:
            raise ModelLoadError(f"{source}: cannot dequantise {t.name} of type "
                                 f"{getattr(t.tensor_type, 'name', t.tensor_type)} "
                                 f"({type(exc).__name__})") from None
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        w = torch.from_numpy(np.array(arr, dtype=np.float32).reshape(shape))  # a writable copy
        sd[p.hf_name] = p.fix(w) if p.fix else w
        if progress and i % 16 == 0:
            progress("dequantising weights", 0.1 + 0.5 * i / len(plan))
    return sd
