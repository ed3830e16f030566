"""Files the engine writes and reads back, and how far it trusts them.

Two kinds of file come back from disk into this process: the conversion cache (weights and a
tokenizer, loader/cache.py) and the C kernels (a shared library, fast/kernels.py — loading one
*runs* it). Both live under one cache root, and both follow the rules of this file:

  * **private folders.** Folders we create are 0700. A folder is trusted only when this user
    owns it and no one else can write to it, from the file's folder up to the cache root: in a
    folder others can write to, any file could be theirs, whatever its name says.
  * **private files.** A file is trusted only when this user owns it and no one else can write
    to it — checked on the open file (fstat), so what was checked is what is read.
  * **regular files only.** `open()` on a FIFO waits for a writer forever, a device never ends:
    every file is opened without blocking and refused unless fstat says it is a regular file.
  * **partial work is named `.partial-<pid>-…`.** It is removed on any exit Python controls
    (an exception, Ctrl+C, SIGTERM: see `signals_raise`), and swept at the next start when the
    process that made it is gone (SIGKILL, a power cut).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import stat
import sys
import tempfile
import threading
from pathlib import Path

PARTIAL = ".partial-"


class UntrustedPath(OSError):
    """A file or folder this process must not trust; the message says why, for the user."""


def cache_root() -> Path:
    """$MINILLM_CACHE, else $XDG_CACHE_HOME/minillm, else ~/.cache/minillm."""
    if os.environ.get("MINILLM_CACHE"):
        return Path(os.environ["MINILLM_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "minillm"


def notice(message: str) -> None:
    """One line on stderr about something the user should know but that did not stop the run."""
    print(f"note: {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- who may write
def why_not_private(st: os.stat_result, what: str) -> str | None:
    """None when `st` is owned by this user and writable by no one else; else the reason."""
    if not hasattr(os, "getuid"):          # Windows: no POSIX owners or modes to check
        return None
    if st.st_uid != os.getuid():
        return f"{what} is owned by uid {st.st_uid}, not by you (uid {os.getuid()})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{what} is writable by others (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def private_dir(folder: Path, root: Path) -> Path:
    """Create `folder` (inside `root`, or `root` itself) as 0700 and check every folder from it
    up to `root`. A folder we own that others may write to (made under an old umask 000) loses
    their write permission, with a notice; one owned by someone else raises UntrustedPath —
    nothing in it can be trusted."""
    folder, root = Path(folder), Path(root)
    chain = [folder, *[p for p in folder.parents if p == root or root in p.parents]]
    for path in reversed(chain):           # root first, then down to `folder`
        try:
            os.mkdir(path, 0o700)
            os.chmod(path, 0o700)          # mkdir's mode is filtered by the umask
        except FileExistsError:
            pass
        st = os.stat(path)
        if not stat.S_ISDIR(st.st_mode):
            raise UntrustedPath(f"{path} is not a folder")
        reason = why_not_private(st, f"folder {path}")
        if reason and hasattr(os, "getuid") and st.st_uid == os.getuid():
            mode = stat.S_IMODE(st.st_mode)
            os.chmod(path, mode & ~0o022)                 # ours: only we may write in it
            notice(f"{path} was writable by others (mode {mode:o}); it is now "
                   f"{mode & ~0o022:o}")
        elif reason:
            raise UntrustedPath(reason)
    return folder


# ----------------------------------------------------------------------------- regular files
def open_regular(path: str | os.PathLike, flags: int = os.O_RDONLY) -> int:
    """Open `path` and return the fd, or raise UntrustedPath if it is not a regular file.

    O_NONBLOCK makes opening a FIFO return at once instead of waiting for a writer; fstat on the
    open file then says what it really is (no window between a check and the open).
    """
    nonblock = getattr(os, "O_NONBLOCK", 0)
    fd = os.open(path, flags | nonblock | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = ("a FIFO" if stat.S_ISFIFO(st.st_mode) else "a device"
                    if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else "a socket"
                    if stat.S_ISSOCK(st.st_mode) else "not a regular file")
            raise UntrustedPath(f"{path} is {kind}, not a regular file")
        if nonblock:
            import fcntl
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~nonblock)
        return fd
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: str | os.PathLike, limit: int, private: bool = False) -> bytes:
    """The bytes of a regular file of at most `limit` bytes (and, if `private`, ours alone)."""
    fd = open_regular(path)
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if private and (reason := why_not_private(st, str(path))):
            raise UntrustedPath(reason)
        if st.st_size > limit:
            raise UntrustedPath(f"{path} is {st.st_size:,} bytes; more than the {limit:,} "
                                f"expected of it")
        return f.read(limit + 1)[:limit]


def fd_path(fd: int, fallback: str | os.PathLike) -> str:
    """A path that names exactly the open file `fd` (Linux: /proc/self/fd/N), so that a library
    that wants a path (dlopen, np.memmap) opens the very file we checked; else `fallback`."""
    proc = f"/proc/self/fd/{fd}"
    return proc if os.path.exists(proc) else str(fallback)


# ----------------------------------------------------------------------------- partial work
def partial_dir(parent: Path) -> Path:
    """A new private folder `parent/.partial-<pid>-<random>` for work that is not done yet."""
    return Path(tempfile.mkdtemp(prefix=f"{PARTIAL}{os.getpid()}-", dir=parent))


def partial_file(parent: Path, suffix: str = "") -> Path:
    """A new private (0600) empty file `parent/.partial-<pid>-<random><suffix>`."""
    fd, name = tempfile.mkstemp(prefix=f"{PARTIAL}{os.getpid()}-", suffix=suffix, dir=parent)
    os.close(fd)
    return Path(name)


def remove(path: Path) -> None:
    """Remove a file or a folder tree; what is already gone is fine."""
    with contextlib.suppress(FileNotFoundError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink()


def _process_gone(pid: int, made_at: float) -> bool:
    """Is the process that made a `.partial-<pid>-…` entry, last written at `made_at`, gone?

    Gone: no such pid, a zombie, or a pid reused by a process that started after the entry was
    last written (Linux: the start time in /proc/<pid>/stat, in clock ticks after boot)."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:                # alive, someone else's
        pass
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()   # after "(command name)"
        with open("/proc/stat", "rb") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith(b"btime"))
    except (OSError, ValueError, IndexError, StopIteration):
        return False                       # not Linux: keep it (a later start may sweep it)
    if fields[0] == b"Z":
        return True
    started = boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")    # field 22: starttime
    return started > made_at + 2.0         # btime has a resolution of one second


def sweep_partials(folder: Path) -> list[Path]:
    """Remove this user's `.partial-<pid>-…` entries in `folder` whose process is gone."""
    swept = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return swept
    for entry in entries:
        if not entry.name.startswith(PARTIAL):
            continue
        try:
            pid = int(entry.name[len(PARTIAL):].split("-", 1)[0])
            st = entry.lstat()
        except (ValueError, OSError):
            continue
        if hasattr(os, "getuid") and st.st_uid != os.getuid():
            continue                       # not ours to judge
        if _process_gone(pid, st.st_mtime):
            remove(entry)
            swept.append(entry)
    return swept


@contextlib.contextmanager
def signals_raise():
    """Within this block, SIGTERM and SIGHUP raise SystemExit(128 + signal) instead of killing
    the process outright, so `finally` and `except` clauses run and partial work is removed.
    (Ctrl+C already raises KeyboardInterrupt.) Only the main thread can set handlers: elsewhere
    this does nothing, and the next start's sweep is the fallback."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    previous = {}
    for sig in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)):
        if sig is not None:
            with contextlib.suppress(ValueError, OSError):
                previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
