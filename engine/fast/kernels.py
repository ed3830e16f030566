"""Build and load the fast path's C kernels with the system C compiler.

    gemv.c          float32 and int8 matrix–vector products that run at memory bandwidth
                    (PyTorch has no fast int8 weight-only GEMV for an AVX2 CPU: its
                    `_weight_int8pack_mm` is vectorised for AVX-512 only)
    gguf_blocks.c   products and dequantisation straight from GGUF blocks (`--weights gguf`)
    decode_step.c   a whole Llama-family decode step in one call (`--kernel c`, c_step.py)

decode_step.c includes the other two, so one shared library holds every function. It is
compiled once into the per-user cache (engine.files.cache_root(), so $MINILLM_CACHE is
respected), named by a hash of the sources, the flags and the machine's CPU flags (a home
directory shared between machines never loads a build for another CPU), and called through
ctypes. Three builds of the same sources:

    native     cc -O3 -march=native -fopenmp   AVX2 kernels where the CPU has them (and the
               AVX-512 rows of gguf_blocks.c where it has those too), threads; a compiler
               without OpenMP (Apple clang) gets the same build single-threaded
    avx2       native with -mno-avx512f        what an AVX2-only CPU runs: on an AVX-512 machine
               it is how the tests hold the AVX2 code to the same tokens
    portable   cc -O3 -DMINILLM_PORTABLE       no intrinsics, no OpenMP: the plain C loops any
               CPU runs (the tests hold this fallback to the same tokens)

`library()` is the native build unless MINILLM_KERNELS names another. All use -ffp-contract=off:
the compiler may not fuse a multiply and an add on its own, so a dequantised weight is rounded
exactly as numpy rounds it (the kernels ask for fused multiply-adds where they want them).
No compiler, or a failed build, simply means `available()` is False (`why_unavailable()` says
why, in one line): the int8 option then widens the weights in PyTorch (same numbers, slower),
GGUF blocks are dequantised once to float32, and `--kernel c` reports that it cannot run.

Loading a shared library runs its code, so a library on disk is loaded only when it is beyond
doubt ours (engine.files has the rules):

  * the kernel folder and every folder up to the cache root are 0700, owned by this user; a
    folder someone else owns is not used at all (the kernels are then built in a private
    temporary folder, loaded, and the folder removed);
  * the library is owned by this user, writable by no one else, and its SHA-256 equals the one
    recorded beside it (`<name>.sha256`, itself checked the same way) when it was built;
  * the hash is computed on an open descriptor and `dlopen` is given /proc/self/fd/N: the bytes
    checked are the bytes loaded, with no window to swap the file in between.

Anything else is not loaded: a fresh build replaces it. The compiler runs in its own process
group, writing into a private `.partial-<pid>-…` folder (its temporary files too, via TMPDIR);
an exception, Ctrl+C or SIGTERM during the build kills the whole group and removes the folder,
and after a SIGKILL the next start sweeps it.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import torch

from ..files import (UntrustedPath, cache_root, fd_path, notice, open_regular, partial_dir,
                     private_dir, read_regular, remove, signals_raise, sweep_partials,
                     why_not_private)

_SOURCES = [Path(__file__).with_name(n) for n in ("gemv.c", "gguf_blocks.c", "decode_step.c")]
# Build name → its compiler flag sets, tried in order until one compiles.
VARIANTS = {
    "native": (["-O3", "-march=native", "-fopenmp"], ["-O3", "-march=native"]),
    "avx2": (["-O3", "-march=native", "-mno-avx512f", "-fopenmp"],
             ["-O3", "-march=native", "-mno-avx512f"]),
    "portable": (["-O3", "-DMINILLM_PORTABLE"],),
}
COMMON = ["-ffp-contract=off", "-shared", "-fPIC"]
CFLAGS = VARIANTS["native"][0] + COMMON     # the usual build's flags
_libs: dict[str, ctypes.CDLL | None] = {}
_reasons: dict[str, str] = {}               # why a build is not available, once known


def build_id(flags: list[str] = CFLAGS) -> str:
    """Names a build: the sources, the compiler flags and the CPU they were built for."""
    digest = hashlib.sha256(_cpu_flags())
    digest.update(" ".join(flags).encode())
    for source in _SOURCES:
        digest.update(source.read_bytes())
    return digest.hexdigest()[:16]


def kernel_dir() -> Path:
    return cache_root() / "kernels"


def library_path(flags: list[str] = CFLAGS) -> Path:
    """Where this build's library is kept (a predictable name: its content is what is checked)."""
    return kernel_dir() / f"minillm-kernels-{build_id(flags)}.so"


def _load(variant: str) -> ctypes.CDLL | None:
    if variant in _libs:
        return _libs[variant]
    lib = None
    for flags in VARIANTS[variant]:          # e.g. without -fopenmp when the compiler has none
        try:
            lib = _open_library(flags + COMMON)
            _declare(lib)
            break
        except Exception as exc:            # no compiler, no OpenMP, a read-only home: fall back
            lib, _reasons[variant] = None, (str(exc).splitlines()[0] if str(exc)
                                            else type(exc).__name__)
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
    lib.gguf_packed_type.restype = lib.gguf_pack.restype = I
    lib.gguf_packed_type.argtypes = [I]
    lib.gguf_pack.argtypes = [I, P, I64, I64, I]


def _open_library(flags: list[str]) -> ctypes.CDLL:
    """This build's library: the verified one in the kernel folder, or a fresh build."""
    path = library_path(flags)
    folder, root = path.parent, cache_root()
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
        private_dir(folder, root)
    except UntrustedPath as exc:
        notice(f"not using the kernel cache: {exc}; building the C kernels in a private "
               f"temporary folder")
        with tempfile.TemporaryDirectory(prefix="minillm-kernels-") as tmp:
            return _build_and_open(Path(tmp) / path.name, flags)   # the mapping outlives it
    sweep_partials(folder)
    lib = _open_verified(path)
    return lib if lib is not None else _build_and_open(path, flags)


def _sha256_fd(fd: int) -> str:
    h, offset = hashlib.sha256(), 0
    while chunk := os.pread(fd, 1 << 20, offset):
        h.update(chunk)
        offset += len(chunk)
    return h.hexdigest()


def _open_verified(path: Path) -> ctypes.CDLL | None:
    """The library at `path` if every check passes; None if there is none, or (with a notice)
    if there is one that must not be loaded."""
    if not os.path.lexists(path):
        return None
    try:
        fd = open_regular(path)
    except OSError as exc:
        notice(f"ignoring the kernel library {path}: {exc}; building a fresh one")
        return None
    try:
        reason = why_not_private(os.fstat(fd), str(path))
        if reason is None:
            try:
                recorded = read_regular(f"{path}.sha256", 128, private=True).decode().strip()
            except (OSError, UnicodeDecodeError) as exc:
                recorded, reason = None, f"no trustworthy recorded hash ({exc})"
            if recorded is not None and _sha256_fd(fd) != recorded:
                reason = "its content is not what was built"
        if reason:
            notice(f"ignoring the kernel library {path}: {reason}; building a fresh one")
            return None
        return _dlopen(fd, path)
    finally:
        if fd not in _held:
            os.close(fd)


_held: list[int] = []                    # descriptors of loaded libraries, kept open


def _dlopen(fd: int, path: Path) -> ctypes.CDLL:
    """Load the library open at `fd` through /proc/self/fd/N, and keep `fd` open for good:
    dlopen knows a library by the name it was given, so a second build (the portable one)
    opened later through a reused N would be taken for the first."""
    lib = ctypes.CDLL(fd_path(fd, path))
    _held.append(fd)
    return lib


def _build_and_open(path: Path, flags: list[str]) -> ctypes.CDLL:
    """Compile into a private partial folder, record the hash, move both into place, and load
    the library through the descriptor that was hashed."""
    named = os.environ.get("CC")
    cc = shutil.which(named) if named else (shutil.which("cc") or shutil.which("gcc"))
    if cc is None:
        raise RuntimeError(f"no C compiler found ({'CC=' + named if named else 'cc, gcc'}); "
                           f"install gcc or clang, or set CC")
    work = None
    with signals_raise():
        try:
            work = partial_dir(path.parent)
            built = work / path.name
            _compile(cc, built, work, flags)
            os.chmod(built, 0o600)
            fd = open_regular(built)
            try:
                digest = _sha256_fd(fd)
                (work / "sha256").write_text(digest + "\n")
                os.chmod(work / "sha256", 0o600)
                os.replace(built, path)
                os.replace(work / "sha256", f"{path}.sha256")
                return _dlopen(fd, path)
            finally:
                if fd not in _held:
                    os.close(fd)
        finally:
            if work is not None:
                remove(work)


def _compile(cc: str, out: Path, tmpdir: Path, flags: list[str]) -> None:
    """Run the compiler in its own process group (so a Ctrl+C meant for us reaches it only
    through us), with its temporary files in `tmpdir`; on any exit Python sees, kill the group."""
    cmd = [cc, *flags, str(_SOURCES[-1]), "-o", str(out), "-lm"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, "TMPDIR": str(tmpdir)})
    try:
        _, err = proc.communicate()
    except BaseException:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()
        raise
    if proc.returncode != 0:
        raise RuntimeError(f"the C compiler failed: "
                           f"{err.decode(errors='replace').strip().splitlines()[-1:]}")


def default_variant() -> str:
    """The build `library()` returns: MINILLM_KERNELS=portable or =avx2 selects that one."""
    chosen = os.environ.get("MINILLM_KERNELS", "").lower()
    return chosen if chosen in VARIANTS else "native"


def why_unavailable(variant: str | None = None) -> str | None:
    """None when the kernels load, else one line that says why not."""
    variant = variant or default_variant()
    return None if _load(variant) is not None else _reasons.get(variant, "unknown reason")


def _cpu_flags() -> bytes:
    """The CPU's feature flags (Linux), part of the build's name: -march=native depends on them."""
    try:
        with open("/proc/cpuinfo", "rb") as f:
            return next((line for line in f if line.startswith(b"flags")), b"")
    except OSError:
        return b""


def library(variant: str | None = None) -> ctypes.CDLL | None:
    """The loaded kernels (`variant`, else the default build), or None if they cannot be built."""
    return _load(variant or default_variant())


def available() -> bool:
    return library() is not None


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
