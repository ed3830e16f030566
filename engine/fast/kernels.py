"""Build and load the small C kernel(s) of the fast path with the system C compiler.

PyTorch has no fast int8 weight-only matrix–vector product for an AVX2 CPU (its
`_weight_int8pack_mm` is vectorised for AVX-512 only), so `int8_gemv.c` provides one: 30 lines,
compiled once into a per-user cache with `cc -O3 -march=native -fopenmp` and called through
ctypes. No compiler, or a failed build, simply means `available()` is False and the int8 option
falls back to widening the weights in PyTorch (same numbers, slower).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import torch

_SOURCE = Path(__file__).with_name("int8_gemv.c")
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
        source = _SOURCE.read_bytes()
        tag = hashlib.sha256(source).hexdigest()[:16]
        out = _build_dir() / f"int8_gemv-{tag}.so"
        if not out.exists():
            cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
            if cc is None:
                raise RuntimeError("no C compiler")
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_suffix(f".{os.getpid()}.tmp")
            subprocess.run([cc, "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC",
                            str(_SOURCE), "-o", str(tmp)], check=True, capture_output=True)
            os.replace(tmp, out)          # atomic: a concurrent build never sees half a file
        lib = ctypes.CDLL(str(out))
        lib.int8_gemv.restype = None
        lib.int8_gemv.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64, ctypes.c_int64,
                                                          ctypes.c_int]
        _lib = lib
    except Exception:                      # no compiler, no OpenMP, a read-only home: fall back
        _failed = True
    return _lib


def available() -> bool:
    return _load() is not None


def int8_gemv(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
              bias: torch.Tensor | None) -> torch.Tensor:
    """x: (in,) float32 contiguous CPU; q: (out, in) int8; scale, bias: (out,) → y: (out,)."""
    rows, cols = q.shape
    y = torch.empty(rows, dtype=torch.float32)
    _lib.int8_gemv(x.data_ptr(), q.data_ptr(), scale.data_ptr(),
                   None if bias is None else bias.data_ptr(), y.data_ptr(), rows, cols,
                   torch.get_num_threads())
    return y
