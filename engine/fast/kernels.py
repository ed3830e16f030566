"""Build and load the fast path's C kernels with the system C compiler.

    gemv.c          float32 and int8 matrix–vector products that run at memory bandwidth
                    (PyTorch has no fast int8 weight-only GEMV for an AVX2 CPU: its
                    `_weight_int8pack_mm` is vectorised for AVX-512 only)
    decode_step.c   a whole Llama-family decode step in one call (`--kernel c`, c_step.py)

decode_step.c includes gemv.c, so one shared library holds all three functions. It is compiled
once into a per-user cache with `cc -O3 -march=native -fopenmp` (named by a hash of the sources
and of the machine's CPU flags, so a home directory shared between machines never loads a build
for another CPU) and called through ctypes. No compiler, or a failed build, simply means
`available()` is False: the int8 option then widens the weights in PyTorch (same numbers,
slower) and `--kernel c` reports that it cannot run.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import torch

_SOURCES = [Path(__file__).with_name(n) for n in ("gemv.c", "decode_step.c")]
_lib: ctypes.CDLL | None = None
_failed = False


def _build_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "minillm" / "kernels"


def _load() -> ctypes.CDLL | None:
    global _lib, _failed
    if _lib is not None or _failed:
        return _lib
    try:
        digest = hashlib.sha256(_cpu_flags())
        for source in _SOURCES:
            digest.update(source.read_bytes())
        out = _build_dir() / f"minillm-kernels-{digest.hexdigest()[:16]}.so"
        if not out.exists():
            cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
            if cc is None:
                raise RuntimeError("no C compiler")
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_suffix(f".{os.getpid()}.tmp")
            subprocess.run([cc, "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC",
                            str(_SOURCES[-1]), "-o", str(tmp), "-lm"],
                           check=True, capture_output=True)
            os.replace(tmp, out)          # atomic: a concurrent build never sees half a file
        lib = ctypes.CDLL(str(out))
        lib.int8_gemv.restype = lib.f32_gemv.restype = None
        lib.decode_step.restype = ctypes.c_int
        lib.gemv_vectorised.restype = ctypes.c_int
        lib.int8_gemv.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64, ctypes.c_int64,
                                                          ctypes.c_int, ctypes.c_int]
        lib.f32_gemv.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64, ctypes.c_int64,
                                                         ctypes.c_int]
        lib.decode_step.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                    ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                    ctypes.c_int]
        _lib = lib
    except Exception:                      # no compiler, no OpenMP, a read-only home: fall back
        _failed = True
    return _lib


def _cpu_flags() -> bytes:
    """The CPU's feature flags (Linux), part of the build's name: -march=native depends on them."""
    try:
        with open("/proc/cpuinfo", "rb") as f:
            return next((line for line in f if line.startswith(b"flags")), b"")
    except OSError:
        return b""


def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None when they could not be built here."""
    return _load()


def available() -> bool:
    return _load() is not None


def vectorised() -> bool:
    """The kernels were built with AVX2 + FMA (needed for the tiled int8 layout)."""
    return available() and bool(_lib.gemv_vectorised())


def int8_gemv(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
              rows: int, cols: int, tiled: bool) -> torch.Tensor:
    """x: (cols,) float32 contiguous CPU; q: int8 (rows, cols) row-major, or in 4×8 tiles
    (quant.pack_tiles) when `tiled`; scale, bias: (rows,) → y: (rows,)."""
    y = torch.empty(rows, dtype=torch.float32)
    _lib.int8_gemv(x.data_ptr(), q.data_ptr(), scale.data_ptr(),
                   None if bias is None else bias.data_ptr(), y.data_ptr(), rows, cols,
                   int(tiled), torch.get_num_threads())
    return y


def f32_gemv(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x: (in,) float32 contiguous CPU; w: (out, in) float32 contiguous; bias: (out,) → y."""
    rows, cols = w.shape
    y = torch.empty(rows, dtype=torch.float32)
    _lib.f32_gemv(x.data_ptr(), w.data_ptr(), None if bias is None else bias.data_ptr(),
                  y.data_ptr(), rows, cols, torch.get_num_threads())
    return y
