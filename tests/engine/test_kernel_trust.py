"""The C kernels' shared library is code: it is loaded only when it is beyond doubt ours
(engine/fast/kernels.py, engine/files.py).

A library planted at the predictable path — without a recorded hash, with a forged one but
writable by others, owned by someone else, in a folder someone else owns — must never be
loaded: its constructor would write a marker file the moment it was. Each case runs in a fresh
process (a loaded library cannot be unloaded), under a cache folder of its own. An interrupted
build leaves no compiler running and no temporary file behind.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.fast import kernels

ROOT = Path(__file__).resolve().parents[2]
CC = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
IS_ROOT = hasattr(os, "getuid") and os.getuid() == 0
OTHER_UID = 65534
pytestmark = pytest.mark.skipif(CC is None or not sys.platform.startswith("linux"),
                                reason="needs a C compiler on Linux")

PLANTED_C = r"""
#include <stdio.h>
#include <stdlib.h>
__attribute__((constructor)) static void planted(void) {
    const char *path = getenv("PLANTED_MARKER");
    FILE *f = fopen(path ? path : "/tmp/minillm-planted-marker", "w");
    if (f) { fputs("the planted library ran\n", f); fclose(f); }
}
int gemv_vectorised(void) { return 0; }
"""

PROBE = """
from engine.fast import kernels
print(kernels.available(), kernels.why_unavailable())
"""


@pytest.fixture
def env(tmp_path, monkeypatch):
    """A private cache for this test, both here and in the children it starts."""
    cache = tmp_path / "cache"
    marker = tmp_path / "PLANTED-RAN"
    monkeypatch.setenv("MINILLM_CACHE", str(cache))
    return {**os.environ, "MINILLM_CACHE": str(cache), "PLANTED_MARKER": str(marker)}


@pytest.fixture(scope="module")
def planted_so(tmp_path_factory) -> bytes:
    folder = tmp_path_factory.mktemp("planted")
    (folder / "p.c").write_text(PLANTED_C)
    subprocess.run([CC, "-shared", "-fPIC", str(folder / "p.c"), "-o", str(folder / "p.so")],
                   check=True, capture_output=True)
    return (folder / "p.so").read_bytes()


def probe(env: dict, **extra) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**env, **extra})


def plant(data: bytes, hash_too: bool, mode: int = 0o600) -> Path:
    path = kernels.library_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chmod(path, mode)
    if hash_too:                    # a forged record: the right hash of the planted bytes
        Path(f"{path}.sha256").write_text(hashlib.sha256(data).hexdigest() + "\n")
        os.chmod(f"{path}.sha256", mode)
    return path


def marker(env) -> Path:
    return Path(env["PLANTED_MARKER"])


# ----------------------------------------------------------------------------- planted libraries
def test_a_planted_library_without_a_recorded_hash_is_replaced_not_loaded(env, planted_so):
    path = plant(planted_so, hash_too=False)
    proc = probe(env)
    assert proc.stdout.split()[0] == "True", proc.stderr
    assert not marker(env).exists()
    assert "ignoring the kernel library" in proc.stderr and "recorded hash" in proc.stderr
    assert path.read_bytes() != planted_so                 # a fresh build took its place
    recorded = Path(f"{path}.sha256").read_text().strip()
    assert recorded == hashlib.sha256(path.read_bytes()).hexdigest()
    again = probe(env)                                     # … and is trusted from now on
    assert again.stdout.split()[0] == "True" and "ignoring" not in again.stderr


def test_a_library_others_may_write_is_not_loaded(env, planted_so):
    plant(planted_so, hash_too=True, mode=0o666)
    proc = probe(env, CC="false")              # no rebuild: we only ask whether it was loaded
    assert proc.stdout.split()[0] == "False"
    assert "writable by others" in proc.stderr
    assert not marker(env).exists()


def test_content_that_differs_from_the_recorded_hash_is_not_loaded(env, planted_so):
    path = plant(planted_so, hash_too=True)
    Path(f"{path}.sha256").write_text("0" * 64 + "\n")
    proc = probe(env, CC="false")
    assert proc.stdout.split()[0] == "False" and "is not what was built" in proc.stderr
    assert not marker(env).exists()


@pytest.mark.skipif(not IS_ROOT, reason="needs root to give a file to another user")
def test_a_library_owned_by_someone_else_is_not_loaded(env, planted_so):
    path = plant(planted_so, hash_too=True)
    os.chown(path, OTHER_UID, OTHER_UID)
    os.chown(f"{path}.sha256", OTHER_UID, OTHER_UID)
    proc = probe(env, CC="false")
    assert proc.stdout.split()[0] == "False" and f"owned by uid {OTHER_UID}" in proc.stderr
    assert not marker(env).exists()


@pytest.mark.skipif(not IS_ROOT, reason="needs root to give a folder to another user")
def test_a_kernel_folder_someone_else_owns_is_not_used(env, planted_so):
    """/tmp/shared/minillm/kernels made by another user (XDG_CACHE_HOME=/tmp/shared, a cache folder others write to):
    nothing in it is read; the kernels are built in a private temporary folder instead."""
    path = plant(planted_so, hash_too=True)
    for p in (path.parent.parent, path.parent, path, Path(f"{path}.sha256")):
        os.chown(p, OTHER_UID, OTHER_UID)
        os.chmod(p, 0o777)
    proc = probe(env)
    assert proc.stdout.split()[0] == "True", proc.stderr
    assert "not using the kernel cache" in proc.stderr and f"uid {OTHER_UID}" in proc.stderr
    assert not marker(env).exists()
    assert path.read_bytes() == planted_so                 # theirs: left as it was


def test_a_world_writable_kernel_folder_of_ours_is_closed_and_built_private(env):
    """Left by an old umask 000: no one else may write in the folders any more, and the
    library and its hash are 0600."""
    folder = kernels.library_path().parent
    folder.mkdir(parents=True)
    os.chmod(folder.parent, 0o777)
    os.chmod(folder, 0o777)
    old = os.umask(0)
    try:
        proc = probe(env)
    finally:
        os.umask(old)
    assert proc.stdout.split()[0] == "True", proc.stderr
    assert proc.stderr.count("was writable by others (mode 777); it is now 755") == 2
    for p in (folder.parent, folder):
        assert stat.S_IMODE(p.stat().st_mode) == 0o755, p    # only our write bit is left
    lib = kernels.library_path()
    for p in (lib, Path(f"{lib}.sha256")):
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
        assert p.stat().st_uid == os.getuid()


def test_the_kernels_follow_minillm_cache(env, tmp_path):
    assert kernels.library_path().is_relative_to(tmp_path / "cache")


# ----------------------------------------------------------------------------- interrupted builds
FAKE_CC = """#!/bin/sh
# A compiler that never finishes: a temporary file in $TMPDIR, the -o target, and a child.
touch "$TMPDIR/fake-cc-temp.s"
while [ $# -gt 0 ]; do [ "$1" = "-o" ] && touch "$2"; shift; done
sleep 600 &
echo $! > "$FAKE_CC_DIR/child.pid"
echo $$ > "$FAKE_CC_DIR/cc.pid"
wait
"""


def gone(pid: int) -> bool:
    """The process no longer runs (absent, or a zombie nobody has reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def wait_for(path: Path, proc: subprocess.Popen, limit_s: float = 120.0) -> None:
    """Wait until `path` exists (the fake compiler wrote it) or the process ended."""
    deadline = time.monotonic() + limit_s
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the fake compiler never started"
        time.sleep(0.02)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_build_kills_the_compiler_and_removes_its_files(env, tmp_path, sig):
    fake = tmp_path / "fake-cc"
    fake.write_text(FAKE_CC)
    fake.chmod(0o755)
    proc = subprocess.Popen([sys.executable, "-c", PROBE], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**env, "CC": str(fake), "FAKE_CC_DIR": str(tmp_path)})
    wait_for(tmp_path / "cc.pid", proc)
    cc_pid = int((tmp_path / "cc.pid").read_text())
    child_pid = int((tmp_path / "child.pid").read_text())
    proc.send_signal(sig)
    proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert gone(cc_pid) and gone(child_pid)                # the whole process group
    folder = kernels.library_path().parent
    assert list(folder.iterdir()) == []                    # no .partial-*, no half library
