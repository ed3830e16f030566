"""The conversion cache: a converted GGUF kept as an ordinary Hugging Face folder.

Dequantising the embedded model takes seconds, so the result is written once and later starts
read it back. What comes back from disk is checked before it is believed:

  * **the key is the source's content**: the entry's name holds a SHA-256 of the whole GGUF
    (~0.07 s for 98 MB with SHA-NI, ~0.25 s without), so an edited or replaced file — even one
    with the old size and mtime — never meets a stale conversion;
  * **a manifest, written last**: `complete.json` records the format, the source's hash, a
    SHA-256 of every small file and a CRC-32 of every tensor, computed from the very bytes being
    written. On load every small file is hashed and every tensor's bytes are checksummed (CRC-32
    runs at ~3 GB/s: ~0.16 s for the embedded model's 538 MB); a mismatch names the folder, the
    entry is removed and the GGUF converted again. CRC-32 catches flipped bits and truncation;
    deliberate tampering is kept out by the next rule, not by the checksum;
  * **private**: the cache root and every entry are 0700 and must belong to this user with no
    write access for others (engine.files), or they are not read;
  * **atomic**: an entry is written under `.partial-<pid>-…` and renamed into place when
    complete. Ctrl+C and SIGTERM remove the partial folder; after a SIGKILL the next start sweeps
    it; a write that fails (disk full, read-only) is one line of notice, and the model loads
    from memory.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import ConfigError, ModelConfig
from ..files import (UntrustedPath, fd_path, notice, open_regular, partial_dir, read_regular,
                     remove, signals_raise, why_not_private)

CACHE_FORMAT = 2        # 1: keyed on path, size and mtime, sizes only in the manifest
MANIFEST = "complete.json"
WEIGHTS = "model.safetensors"
SMALL_LIMIT = 1 << 28   # bytes: config and tokenizer files (a tokenizer.json is ~1–30 MB)


@dataclass
class Converted:
    """A GGUF converted to Hugging Face's terms: what a cache entry holds."""
    cfg: ModelConfig
    state_dict: dict[str, torch.Tensor]     # Hugging Face names, float32
    tokenizer_json: str
    tokenizer_config: dict


class CorruptEntry(Exception):
    """A cache entry that fails a check; the message says which."""


# ----------------------------------------------------------------------------- keys, checksums
def source_digest(fd: int) -> str:
    """SHA-256 of the whole file open at `fd`, read through that descriptor."""
    h = hashlib.sha256()
    offset = 0
    while chunk := os.pread(fd, 1 << 22, offset):
        h.update(chunk)
        offset += len(chunk)
    return h.hexdigest()


def entry_name(path: Path, digest: str) -> str:
    return f"{path.stem}-{digest[:16]}-v{CACHE_FORMAT}"


def gguf_cache_key(path: Path) -> str:
    """The cache entry's folder name for the GGUF at `path`: its name, content and format."""
    fd = open_regular(path)
    try:
        return entry_name(Path(path), source_digest(fd))
    finally:
        os.close(fd)


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The tensor's bytes as stored in a safetensors file (contiguous, native little-endian)."""
    return memoryview(t.detach().contiguous().view(-1).view(torch.uint8).numpy())


def tensor_checksums(sd: dict[str, torch.Tensor]) -> dict[str, str]:
    return {name: f"{zlib.crc32(tensor_bytes(t)):08x}" for name, t in sd.items()}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------------------- reading
def read_entry(entry: Path, digest: str) -> Converted:
    """A verified cache entry, or CorruptEntry saying what failed."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        reason = why_not_private(os.stat(entry), f"folder {entry}")
        if reason:
            raise CorruptEntry(reason)
        manifest = json.loads(read_regular(entry / MANIFEST, 1 << 24, private=True))
        if manifest.get("format") != CACHE_FORMAT:
            raise CorruptEntry(f"format {manifest.get('format')!r}, not {CACHE_FORMAT}")
        if manifest.get("source_sha256") != digest:
            raise CorruptEntry("it was converted from another file")
        small = {}
        for name, expected in manifest["files"].items():
            data = read_regular(entry / name, SMALL_LIMIT, private=True)
            if _sha256(data) != expected:
                raise CorruptEntry(f"{name} does not match its recorded hash")
            small[name] = data
        fd = open_regular(entry / WEIGHTS)
        try:
            st = os.fstat(fd)
            reason = why_not_private(st, WEIGHTS)
            if reason:
                raise CorruptEntry(reason)
            if st.st_size != manifest["weights_size"]:
                raise CorruptEntry(f"{WEIGHTS} is {st.st_size:,} bytes, "
                                   f"{manifest['weights_size']:,} were written")
            sd = load_file(fd_path(fd, entry / WEIGHTS))
        finally:
            os.close(fd)
        expected = manifest["tensors"]
        if set(sd) != set(expected):
            raise CorruptEntry(f"{WEIGHTS} holds other tensors than were written")
        for name, t in sd.items():
            if f"{zlib.crc32(tensor_bytes(t)):08x}" != expected[name]:
                raise CorruptEntry(f"tensor {name} does not match its checksum")
        cfg = ModelConfig.from_hf(json.loads(small["config.json"]))
        return Converted(cfg, sd, small["tokenizer.json"].decode(),
                         json.loads(small["tokenizer_config.json"]))
    except CorruptEntry:
        raise
    except (OSError, ValueError, KeyError, TypeError, AttributeError, SafetensorError,
            ConfigError) as exc:            # a missing file, bad JSON, a header that lies…
        raise CorruptEntry(f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
                           if str(exc) else type(exc).__name__) from None


# ----------------------------------------------------------------------------- writing
def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def write_entry(root: Path, name: str, conv: Converted, source: Path, digest: str,
                progress=None) -> Path | None:
    """Write `conv` as the entry `root/name`; None (after one line of notice) if it cannot be
    written. Nothing is left behind on any exit Python controls."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file
    tmp = None
    with signals_raise():
        try:
            tmp = partial_dir(root)
            if progress:
                progress("writing the conversion cache", 0.8)
            sums = tensor_checksums(conv.state_dict)        # the bytes about to be written
            save_file(conv.state_dict, str(tmp / WEIGHTS), metadata={"format": "pt"})
            os.chmod(tmp / WEIGHTS, 0o600)
            if progress:
                progress("writing the conversion cache", 0.9)
            small = {"config.json": json.dumps(conv.cfg.to_hf(), indent=2).encode(),
                     "tokenizer.json": conv.tokenizer_json.encode(),
                     "tokenizer_config.json": json.dumps(conv.tokenizer_config).encode()}
            for file, data in small.items():
                _write_private(tmp / file, data)
            manifest = {"format": CACHE_FORMAT, "source": str(source), "source_sha256": digest,
                        "files": {file: _sha256(data) for file, data in small.items()},
                        "weights_size": (tmp / WEIGHTS).stat().st_size, "tensors": sums}
            _write_private(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
            final = root / name
            if final.exists():
                remove(final)             # a damaged leftover: replace it
            os.replace(tmp, final)
            tmp = None
            sweep_superseded(root, keep=final, source=source)
            return final
        except (OSError, SafetensorError) as exc:
            text = str(exc).splitlines()[0][:100] if str(exc) else type(exc).__name__
            notice(f"could not write the conversion cache in {root} ({text}); loading from "
                   f"memory, the next start converts again")
            return None
        finally:
            if tmp is not None:
                remove(tmp)


def sweep_superseded(root: Path, keep: Path, source: Path) -> None:
    """Remove this user's older entries for the same source file (an older format, or the file
    as it was before it changed): they can never be used again."""
    for entry in root.iterdir():
        if entry == keep or entry.name.startswith("."):
            continue
        try:
            if why_not_private(entry.stat(), str(entry)):
                continue
            manifest = json.loads(read_regular(entry / MANIFEST, 1 << 24, private=True))
        except (OSError, ValueError, UntrustedPath):
            continue
        if isinstance(manifest, dict) and manifest.get("source") == str(source):
            remove(entry)
