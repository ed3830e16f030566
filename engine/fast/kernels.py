"""Build and load the fast path's C kernels with the system C compiler.

    gemv.c          float32 and int8 matrix–vector products that run at memory bandwidth
                    (PyTorch has no fast int8 weight-only GEMV for an AVX2 CPU: its
                    `_weight_int8pack_mm` is vectorised for AVX-512 only)
    decode_step.c   a whole Llama-family decode step in one call (`--kernel c`, c_step.py)

decode_step.c includes gemv.c, so one shared library holds all three functions. It is compiled
once with `cc -O3 -march=native -fopenmp` into the per-user cache (engine.files.cache_root(),
so $MINILLM_CACHE is respected), named by a hash of the sources, the flags and the machine's
CPU flags (a home directory shared between machines never loads a build for another CPU), and
called through ctypes. No compiler, or a failed build, simply means `available()` is False: the
int8 option then widens the weights in PyTorch (same numbers, slower) and `--kernel c` reports
that it cannot run.

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

_SOURCES = [Path(__file__).with_name(n) for n in ("gemv.c", "decode_step.c")]
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
_lib: ctypes.CDLL | None = None
_failed = False
_reason: str | None = None              # why the kernels are not available, once known


def build_id() -> str:
    """Names a build: the sources, the compiler flags and the CPU they were built for."""
    digest = hashlib.sha256(_cpu_flags())
    digest.update(" ".join(CFLAGS).encode())
    for source in _SOURCES:
        digest.update(source.read_bytes())
    return digest.hexdigest()[:16]


def kernel_dir() -> Path:
    return cache_root() / "kernels"


def library_path() -> Path:
    """Where this build's library is kept (a predictable name: its content is what is checked)."""
    return kernel_dir() / f"minillm-kernels-{build_id()}.so"


def _load() -> ctypes.CDLL | None:
    global _lib, _failed, _reason
    if _lib is not None or _failed:
        return _lib
    try:
        lib = _open_library()
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
    except Exception as exc:               # no compiler, no OpenMP, a read-only home: fall back
        _failed, _reason = True, str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return _lib


def _open_library() -> ctypes.CDLL:
    """This build's library: the verified one in the kernel folder, or a fresh build."""
    path = library_path()
    folder, root = path.parent, cache_root()
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
        private_dir(folder, root)
    except UntrustedPath as exc:
        notice(f"not using the kernel cache: {exc}; building the C kernels in a private "
               f"temporary folder")
        with tempfile.TemporaryDirectory(prefix="minillm-kernels-") as tmp:
            return _build_and_open(Path(tmp) / path.name)   # the mapping outlives the file
    sweep_partials(folder)
    lib = _open_verified(path)
    return lib if lib is not None else _build_and_open(path)


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
        return ctypes.CDLL(fd_path(fd, path))
    finally:
        os.close(fd)


def _build_and_open(path: Path) -> ctypes.CDLL:
    """Compile into a private partial folder, record the hash, move both into place, and load
    the library through the descriptor that was hashed."""
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler")
    work = None
    with signals_raise():
        try:
            work = partial_dir(path.parent)
            built = work / path.name
            _compile(cc, built, work)
            os.chmod(built, 0o600)
            fd = open_regular(built)
            try:
                digest = _sha256_fd(fd)
                (work / "sha256").write_text(digest + "\n")
                os.chmod(work / "sha256", 0o600)
                os.replace(built, path)
                os.replace(work / "sha256", f"{path}.sha256")
                return ctypes.CDLL(fd_path(fd, path))
            finally:
                os.close(fd)
        finally:
            if work is not None:
                remove(work)


def _compile(cc: str, out: Path, tmpdir: Path) -> None:
    """Run the compiler in its own process group (so a Ctrl+C meant for us reaches it only
    through us), with its temporary files in `tmpdir`; on any exit Python sees, kill the group."""
    cmd = [cc, *CFLAGS, str(_SOURCES[-1]), "-o", str(out), "-lm"]
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


def why_unavailable() -> str | None:
    """Why the kernels could not be loaded (None if they are, or were never asked for)."""
    _load()
    return _reason


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
