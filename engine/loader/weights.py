"""State dicts: Hugging Face's names ↔ this engine's, checks, and building the model.

Every source (a Hugging Face folder, a converted GGUF, the conversion cache) ends as a state dict
with Hugging Face's tensor names; `assemble` turns one into the engine's model. Before a single
parameter is allocated, the tensors actually present are compared with the shapes the metadata
implies (`check_shapes`): metadata alone never decides how much memory is taken. After, every
weight is checked for NaN and Inf (`check_finite`), naming the first bad tensor.
"""

from __future__ import annotations

import contextlib

import torch

from ..config import ModelConfig
from ..model import Transformer
from .errors import ModelLoadError

# Llama/Qwen2 per-layer module names: Hugging Face's → this engine's.
HF_LLAMA_NAMES = {"self_attn.q_proj": "attn.wq", "self_attn.k_proj": "attn.wk",
                  "self_attn.v_proj": "attn.wv", "self_attn.o_proj": "attn.wo",
                  "mlp.gate_proj": "mlp.w_gate", "mlp.up_proj": "mlp.w_up",
                  "mlp.down_proj": "mlp.w_down", "input_layernorm": "attn_norm",
                  "post_attention_layernorm": "mlp_norm"}

# GPT-2's Conv1D layers: Hugging Face's → this engine's (weights stored (in, out) there).
HF_GPT2_CONV = {"attn.c_attn": "attn.wqkv", "attn.c_proj": "attn.wo",
                "mlp.c_fc": "mlp.w_fc", "mlp.c_proj": "mlp.w_proj"}


def hf_to_engine(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Rename a Hugging Face state dict to this engine's parameter names.

    Works on "meta" tensors too (shapes only), which is how shapes are checked before loading."""
    out: dict[str, torch.Tensor] = {}
    if cfg.family == "gpt2":
        sd = {k.removeprefix("transformer."): v for k, v in sd.items()}
        # GPT-2 uses Conv1D layers, whose weights are stored (in, out): transpose to (out, in).
        out["tok_emb.weight"] = sd["wte.weight"]
        out["pos_emb.weight"] = sd["wpe.weight"]
        for i in range(cfg.n_layers):
            p = f"h.{i}."
            for hf, ours in (("ln_1", "attn_norm"), ("ln_2", "mlp_norm")):
                out[f"layers.{i}.{ours}.weight"] = sd[p + hf + ".weight"]
                out[f"layers.{i}.{ours}.bias"] = sd[p + hf + ".bias"]
            for hf, ours in HF_GPT2_CONV.items():
                out[f"layers.{i}.{ours}.weight"] = sd[p + hf + ".weight"].t().contiguous()
                out[f"layers.{i}.{ours}.bias"] = sd[p + hf + ".bias"]
        out["norm.weight"], out["norm.bias"] = sd["ln_f.weight"], sd["ln_f.bias"]
        out["lm_head.weight"] = sd.get("lm_head.weight", sd["wte.weight"])
        return out
    out["tok_emb.weight"] = sd["model.embed_tokens.weight"]
    for i in range(cfg.n_layers):
        for hf, ours in HF_LLAMA_NAMES.items():
            for kind in ("weight", "bias"):
                key = f"model.layers.{i}.{hf}.{kind}"
                if key in sd:
                    out[f"layers.{i}.{ours}.{kind}"] = sd[key]
    out["norm.weight"] = sd["model.norm.weight"]
    out["lm_head.weight"] = sd.get("lm_head.weight", sd["model.embed_tokens.weight"])
    return out


def engine_to_hf(model: Transformer) -> dict[str, torch.Tensor]:
    """The inverse of `hf_to_engine`, for Llama/Qwen2."""
    cfg = model.cfg
    if cfg.family == "gpt2":
        raise NotImplementedError("writing GPT-2 checkpoints is not needed")
    inv = {ours: hf for hf, ours in HF_LLAMA_NAMES.items()}
    out = {}
    for name, t in model.state_dict().items():
        if name == "tok_emb.weight":
            out["model.embed_tokens.weight"] = t
        elif name == "norm.weight":
            out["model.norm.weight"] = t
        elif name == "lm_head.weight":
            if not cfg.tie_embeddings:
                out["lm_head.weight"] = t
        elif name.startswith("layers."):
            _, i, rest = name.split(".", 2)
            mod, kind = rest.rsplit(".", 1)
            out[f"model.layers.{i}.{inv[mod]}.{kind}"] = t
    return {k: v.contiguous() for k, v in out.items()}


@contextlib.contextmanager
def meta_model():
    """Build modules on the "meta" device (shapes, no storage) without initialising weights.

    Initialising is pointless there, and not free: `normal_` on a meta tensor (nn.Embedding's
    init) imports PyTorch's Python reference ops the first time — 1.3–2.5 s of every start on
    the project's 2-core machine. So init.normal_ does nothing inside this block."""
    normal = torch.nn.init.normal_
    torch.nn.init.normal_ = lambda tensor, *args, **kw: tensor
    try:
        with torch.device("meta"):
            yield
    finally:
        torch.nn.init.normal_ = normal


# ----------------------------------------------------------------------------- checks
def _summary(cfg: ModelConfig) -> str:
    return (f"{cfg.family}: {cfg.n_layers} layers, dim {cfg.dim}, {cfg.n_heads} heads "
            f"({cfg.n_kv_heads} kv) × {cfg.head_dim}, ffn {cfg.ffn_dim}, vocab {cfg.vocab_size}")


def check_shapes(cfg: ModelConfig, hf_shapes: dict[str, tuple[int, ...]], source: str) -> None:
    """Compare the tensors a checkpoint holds (Hugging Face names → shapes) with the model its
    metadata describes, without allocating either: both sides live on the "meta" device."""
    meta = {name: torch.empty(shape, device="meta") for name, shape in hf_shapes.items()}
    try:
        got = hf_to_engine(meta, cfg)
    except KeyError as exc:
        raise ModelLoadError(f"{source} has no tensor {exc} for a {_summary(cfg)}") from None
    except RuntimeError as exc:         # a transpose of a tensor that is not 2-D
        raise ModelLoadError(f"{source}: a tensor has the wrong number of dimensions "
                             f"({str(exc).splitlines()[0][:120]})") from None
    with meta_model():
        expected = {k: tuple(v.shape) for k, v in Transformer(cfg).state_dict().items()}
    if cfg.tie_embeddings:
        expected.pop("lm_head.weight")
        got.pop("lm_head.weight", None)
    for name, shape in expected.items():
        if name not in got:
            raise ModelLoadError(f"{source} has no tensor for {name} of a {_summary(cfg)}")
        if tuple(got[name].shape) != shape:
            raise ModelLoadError(f"{source}: {name} has shape {tuple(got[name].shape)}, but the "
                                 f"metadata ({_summary(cfg)}) needs {shape}")


def check_finite(sd: dict[str, torch.Tensor], source: str) -> None:
    """Refuse weights holding NaN or Inf, naming the first such tensor.

    One sum per tensor finds them almost for free (a NaN or an infinity anywhere makes the sum
    non-finite); only a sum that overflowed on finite values needs the element-wise check.
    """
    for name, t in sd.items():
        if not t.is_floating_point() or torch.isfinite(t.sum()):
            continue
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            raise ModelLoadError(f"{source}: tensor {name} holds {bad:,} NaN/Inf values of "
                                 f"{t.numel():,}; the file is damaged or the model diverged")


def check_tokenizer(cfg: ModelConfig, tokenizer_size: int, source: str) -> None:
    """Every id the tokenizer can produce, and the special ids, must have an embedding row."""
    if tokenizer_size > cfg.vocab_size:
        raise ModelLoadError(f"{source}: the tokenizer has {tokenizer_size:,} tokens but the "
                             f"model only {cfg.vocab_size:,} embedding rows")
    for what, ids in (("bos", (cfg.bos_token_id,)), ("eos", cfg.eos_token_ids)):
        for i in ids:
            if i is not None and not 0 <= i < cfg.vocab_size:
                raise ModelLoadError(f"{source}: the {what} token id {i} is outside the "
                                     f"vocabulary of {cfg.vocab_size:,}")


# ----------------------------------------------------------------------------- building
def build_model(cfg: ModelConfig, engine_sd: dict[str, torch.Tensor], device: torch.device,
                dtype: torch.dtype) -> Transformer:
    """Create the model without initialising random weights, then load `engine_sd` into it.

    Callers check shapes first (`check_shapes`): `to_empty` allocates what the config says."""
    with meta_model():
        model = Transformer(cfg)
    model = model.to_empty(device=device)
    model.init_rope()                  # buffers were created on "meta": compute them for real
    missing, unexpected = model.load_state_dict(engine_sd, strict=False, assign=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and cfg.tie_embeddings)]
    if missing or unexpected:
        raise ModelLoadError(f"checkpoint does not match a {cfg.family} model: "
                             f"missing {missing[:4]}, unexpected {unexpected[:4]}")
    if cfg.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight
    return model.to(dtype=dtype).eval()


def assemble(cfg: ModelConfig, hf_sd: dict[str, torch.Tensor], device: torch.device,
             dtype: torch.dtype, source: str, check_values: bool = True) -> Transformer:
    """A Hugging Face-named state dict → the engine's model: shapes checked before allocating,
    values (NaN/Inf) checked unless the caller already knows them (a verified cache entry)."""
    check_shapes(cfg, {k: tuple(v.shape) for k, v in hf_sd.items()}, source)
    if check_values:
        check_finite(hf_sd, source)
    return build_model(cfg, hf_to_engine(hf_sd, cfg), device, dtype)
