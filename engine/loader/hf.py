"""Hugging Face model folders (config.json + *.safetensors + tokenizer files), and hub ids.

Only safetensors are read: a pickle checkpoint (.bin/.pt/.pth) can run arbitrary code when
loaded, so it is refused. Nothing here can execute a checkpoint's code: config.json is read as
data by `ModelConfig.from_hf` (an `auto_map` in it is ignored), the tokenizer is built by the
`tokenizers` library from tokenizer.json alone, and transformers is never asked to load anything.
Every file is opened as a regular file of bounded size (engine.files), so a FIFO or a device
planted under a model's file name cannot hang the load.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..config import ConfigError, ModelConfig, UnsupportedModel
from ..files import UntrustedPath, fd_path, open_regular, read_regular
from ..model import Transformer
from ..tokenizer import Tokenizer
from .errors import ModelLoadError, ModelNotFound
from .weights import assemble, check_tokenizer

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
CONFIG_LIMIT = 1 << 20                    # bytes: a config.json is a few hundred


def refuse_pickles(folder: Path) -> None:
    pickles = [p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if pickles and not list(folder.glob("*.safetensors")):
        raise ModelLoadError(
            f"{folder} holds only pickle checkpoints ({', '.join(pickles[:3])}), which can run "
            f"arbitrary code when loaded; convert them to safetensors first")


def read_config(folder: Path) -> ModelConfig:
    """config.json → ModelConfig, every size checked for type and range (ConfigError)."""
    path = folder / "config.json"
    try:
        hf = json.loads(read_regular(path, CONFIG_LIMIT))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{path} is not valid JSON: {exc}") from None
    except UntrustedPath as exc:
        raise ModelLoadError(str(exc)) from None
    try:
        return ModelConfig.from_hf(hf)
    except UnsupportedModel:
        raise
    except ConfigError as exc:            # a lying or broken config.json: the file's fault
        raise ModelLoadError(f"{path}: {exc}") from None


def read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every *.safetensors file of `folder`, merged (memory-mapped by safetensors)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"no .safetensors weights in {folder}")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            fd = open_regular(f)
            try:
                sd.update(load_file(fd_path(fd, f)))   # the file just checked, not a swapped one
            finally:
                os.close(fd)
        except UntrustedPath as exc:
            raise ModelLoadError(str(exc)) from None
        except (SafetensorError, OSError, ValueError) as exc:
            raise ModelLoadError(f"corrupt or truncated safetensors file {f}: "
                                 f"{str(exc).splitlines()[0][:160]}") from None
    return sd


def load_hf_folder(folder: Path, device: torch.device, dtype: torch.dtype,
                   progress=None) -> tuple[Transformer, Tokenizer, ModelConfig]:
    folder = Path(folder)
    if not os.path.lexists(folder / "config.json"):   # exists, of any kind: read_config checks
        refuse_pickles(folder) if folder.is_dir() else None
        raise ModelLoadError(f"{folder} has no config.json: not a Hugging Face model folder")
    refuse_pickles(folder)
    cfg = read_config(folder)
    if progress:
        progress("reading weights", 0.2)
    sd = read_safetensors(folder)
    if progress:
        progress("building the model", 0.7)
    model = assemble(cfg, sd, device, dtype, source=str(folder))
    try:
        tokenizer = Tokenizer.from_folder(folder, cfg.bos_token_id, cfg.eos_token_ids)
    except Exception as exc:           # the tokenizers library raises plain Exception
        raise ModelLoadError(f"{folder}: cannot read the tokenizer "
                             f"({str(exc).splitlines()[0][:160]})") from None
    check_tokenizer(cfg, tokenizer.vocab_size, str(folder))
    return model, tokenizer, cfg


# ----------------------------------------------------------------------------- hub ids
FILE_SUFFIXES = (".gguf", ".safetensors", ".json", ".txt", *PICKLE_SUFFIXES)


def looks_like_hub_id(spec: str) -> bool:
    """"org/name" and nothing that looks like a local path: a relative path whose first
    folder exists here, or one ending in a file suffix, is a typo to report, not an id."""
    parts = spec.split("/")
    if len(parts) != 2 or not all(parts) or spec.startswith((".", "/", "~")):
        return False
    if Path(parts[0]).exists() or spec.lower().endswith(FILE_SUFFIXES):
        return False
    return True


def hub_download(repo_id: str, progress=None) -> Path:
    """Fetch config, safetensors and tokenizer files only (never code, never pickles)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ModelNotFound(f"model path not found: {repo_id} (as a hub id it needs "
                            f"huggingface_hub: pip install huggingface_hub)") from None
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
