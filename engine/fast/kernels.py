"""Build and load the fast path's C kernels with the system C compiler.

    gemv.c          float32 and int8 matrix–vector products that run at memory bandwidth
                    (PyTorch has no fast int8 weight-only GEMV for an AVX2 CPU: its
                    `_weight_int8pack_mm` is vectorised for AVX-512 only)
    gguf_blocks.c   products and dequantisation straight from GGUF blocks (`--weights gguf`)
    decode_step.c   a whole Llama-family decode step in one call (`--kernel c`, c_step.py)

decode_step.c includes the other two, so one shared library holds every function. It is compiled
once into a per-user cache (named by a hash of the sources, the flags and the machine's CPU
flags, so a home directory shared between machines never loads a build for another CPU) and
called through ctypes. Two builds of the same sources:

    native     cc -O3 -march=native -fopenmp   AVX2 kernels where the CPU has them, threads;
               a compiler without OpenMP (Apple clang) gets the same build single-threaded
    portable   cc -O3 -DMINILLM_PORTABLE       no intrinsics, no OpenMP: the plain C loops that
               any CPU runs (tests use it to hold the fallback to the same tokens)

`library()` is the native build unless MINILLM_KERNELS=portable. Both use -ffp-contract=off:
the compiler may not fuse a multiply and an add on its own, so a dequantised weight is rounded
exactly as numpy rounds it (the kernels ask for fused multiply-adds explicitly where they want
them). No compiler, or a failed build, simply means `available()` is False (`why_unavailable()`
says why, in one line): the int8 option then widens the weights in PyTorch (same numbers,
slower), gguf weights are dequantised once to float32, and `--kernel c` reports that it cannot
run.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import torch

_SOURCES = [Path(__file__).with_name(n) for n in ("gemv.c", "gguf_blocks.c", "decode_step.c")]
VARIANTS = {   # build name → compiler flag sets, tried in order until one compiles
    "native": (["-O3", "-march=native", "-fopenmp"], ["-O3", "-march=native"]),
    "portable": (["-O3", "-DMINILLM_PORTABLE"],),
}
_libs: dict[str, ctypes.CDLL | None] = {}
_errors: dict[str, str] = {}


def _build_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "minillm" / "kernels"


def _build(variant: str) -> Path:
    """Compile `variant` into the cache (once) and return the library's path."""
    errors = []
    for flags in VARIANTS[variant]:
        flags = [*flags, "-ffp-contract=off"]
        digest = hashlib.sha256(_cpu_flags() + " ".join(flags).encode())
        for source in _SOURCES:
            digest.update(source.read_bytes())
        out = _build_dir() / f"minillm-kernels-{variant}-{digest.hexdigest()[:16]}.so"
        if out.exists():
            return out
        named = os.environ.get("CC")
        cc = shutil.which(named) if named else (shutil.which("cc") or shutil.which("gcc"))
        if cc is None:
            raise RuntimeError(f"no C compiler found ({'CC=' + named if named else 'cc, gcc'}); "
                               f"install gcc or clang, or set CC")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(f".{os.getpid()}.tmp")
        done = subprocess.run([cc, *flags, "-shared", "-fPIC", str(_SOURCES[-1]), "-o", str(tmp),
                               "-lm"], capture_output=True, text=True)
        if done.returncode == 0:
            os.replace(tmp, out)          # atomic: a concurrent build never sees half a file
            return out
        errors.append((done.stderr.strip().splitlines() or ["failed"])[0][:160])
    raise RuntimeError(f"the C compiler failed: {errors[-1]}")


def _load(variant: str = "native") -> ctypes.CDLL | None:
    if variant in _libs:
        return _libs[variant]
    lib = None
    try:
        lib = ctypes.CDLL(str(_build(variant)))
        _declare(lib)
    except Exception as exc:               # no compiler, a read-only home: fall back
        lib = None
        _errors[variant] = str(exc).strip().splitlines()[0] if str(exc).strip() else \
            type(exc).__name__
    _libs[variant] = lib
    return lib


def _declare(lib: ctypes.CDLL) -> None:
    P, I64, I = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.int8_gemv.restype = lib.f32_gemv.restype = lib.int8_widen.restype = None
    lib.decode_step.restype = lib.gemv_vectorised.restype = I
    lib.gguf_gemv.restype = lib.gguf_dequant.restype = I
    lib.gguf_row_bytes.restype = I64
    lib.int8_gemv.argtypes = [P] * 5 + [I64, I64, I, I]
    lib.f32_gemv.argtypes = [P] * 4 + [I64, I64, I]
    lib.int8_widen.argtypes = [P, I, I64, I64, P, I]
    lib.decode_step.argtypes = [P, I64, I64, P, P, P, I]
    lib.gguf_gemv.argtypes = [I] + [P] * 5 + [I64, I64, I]
    lib.gguf_dequant.argtypes = [I] + [P] * 3 + [I64, I64, I]
    lib.gguf_row_bytes.argtypes = [I, I64]


def _cpu_flags() -> bytes:
    """The CPU's feature flags (Linux), part of the build's name: -march=native depends on them."""
    try:
        with open("/proc/cpuinfo", "rb") as f:
            return next((line for line in f if line.startswith(b"flags")), b"")
    except OSError:
        return b""


def default_variant() -> str:
    """The build `library()` returns: MINILLM_KERNELS=portable selects the portable one."""
    return "portable" if os.environ.get("MINILLM_KERNELS", "").lower() == "portable" else "native"


def library(variant: str | None = None) -> ctypes.CDLL | None:
    """The loaded kernels (`variant`, else the default build), or None if they cannot be built."""
    return _load(variant or default_variant())


def available() -> bool:
    return library() is not None


def why_unavailable(variant: str | None = None) -> str | None:
    """None when the kernels load, else one line that says why not."""
    variant = variant or default_variant()
    return None if _load(variant) is not None else _errors.get(variant, "unknown reason")


def vectorised() -> bool:
    """The kernels were built with AVX2 + FMA (needed for the tiled int8 layout)."""
    lib = library()
    return lib is not None and bool(lib.gemv_vectorised())


def int8_gemv(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
              rows: int, cols: int, tiled: bool) -> torch.Tensor:
    """x: (cols,) float32 contiguous CPU; q: int8 (rows, cols) row-major, or in 4×8 tiles
    (quant.pack_tiles) when `tiled`; scale, bias: (rows,) → y: (rows,)."""
    y = torch.empty(rows, dtype=torch.float32)
    library().int8_gemv(x.data_ptr(), q.data_ptr(), scale.data_ptr(),
                   None if bias is None else bias.data_ptr(), y.data_ptr(), rows, cols,
                   int(tiled), torch.get_num_threads())
    return y


def f32_gemv(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x: (in,) float32 contiguous CPU; w: (out, in) float32 contiguous; bias: (out,) → y."""
    rows, cols = w.shape
    y = torch.empty(rows, dtype=torch.float32)
    library().f32_gemv(x.data_ptr(), w.data_ptr(), None if bias is None else bias.data_ptr(),
                  y.data_ptr(), rows, cols, torch.get_num_threads())
    return y
