"""End to end: the real app, the embedded model, a real terminal (tmux), keys sent as a user would.

It starts `python main.py` in a detached tmux session on a private socket, waits for the model,
presses enter, and reads the screen with `capture-pane` until the run has finished. The embedded
model is greedy-decoded, so the continuation is known (tests/engine/test_golden.py).
About 15–30 s with the conversion cache warm; the first run ever also converts the GGUF.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow,
              pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")]

ROOT = Path(__file__).resolve().parents[2]
COLS, ROWS = 150, 45


class Tmux:
    count = itertools.count()

    def __init__(self) -> None:
        # A socket of its own per test: the previous test's server may still be exiting on the
        # last one ("server exited unexpectedly" when a new session asks it).
        self.socket = f"minillm-e2e-{os.getpid()}-{next(self.count)}"
        self.session = "app"

    def cmd(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        # COLUMNS/LINES (set by pytest and some CI shells) would override the real window size
        # for the app (shutil.get_terminal_size reads them first); the server must not inherit.
        env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "TMUX")}
        return subprocess.run(["tmux", "-L", self.socket, *args], capture_output=True,
                              text=True, check=check, timeout=20, env=env)

    def start(self, command: str) -> None:
        self.cmd("new-session", "-d", "-s", self.session, "-x", str(COLS), "-y", str(ROWS),
                 "-c", str(ROOT), f"env -u COLUMNS -u LINES {command}")

    def screen(self) -> str:
        res = self.cmd("capture-pane", "-p", "-t", self.session, check=False)
        return res.stdout

    def keys(self, *keys: str) -> None:
        self.cmd("send-keys", "-t", self.session, *keys)

    def alive(self) -> bool:
        return self.cmd("has-session", "-t", self.session, check=False).returncode == 0

    def wait(self, predicate, timeout: float, what: str) -> str:
        end = time.monotonic() + timeout
        screen = ""
        while time.monotonic() < end:
            screen = self.screen()
            if predicate(screen):
                return screen
            time.sleep(0.25)
        raise AssertionError(f"timed out waiting for {what}; the screen was:\n{screen}")

    def kill(self) -> None:
        self.cmd("kill-server", check=False)
        path = Path(os.environ.get("TMUX_TMPDIR", "/tmp")) / f"tmux-{os.getuid()}" / self.socket
        path.unlink(missing_ok=True)


@pytest.fixture
def tmux():
    t = Tmux()
    yield t
    t.kill()


def test_real_app_generates_and_fills_the_panes(tmux):
    tmux.start(f"{sys.executable} main.py --max-new-tokens 8 --prompt 'Deep learning is'")
    # The model loads in the engine process; the UI is up at once and says so.
    tmux.wait(lambda s: "Token stream" in s, 30, "the app to start")
    tmux.wait(lambda s: "SmolLM2" in s, 120, "the model to load")
    tmux.keys("Enter")                                    # run the prompt
    screen = tmux.wait(lambda s: "tok/s · 8 tokens" in s, 90, "the run to finish")
    flat = " ".join(screen.split())
    assert "Deep learning is a mindset that prioritizes" in flat     # the golden continuation
    assert "preallocated buffer" in screen                # KV cache pane
    assert "layer 0 of 0–29" in screen                    # attention pane (30 layers)
    assert "ms per generated token" in screen             # latency chart
    assert "kv/sdpa" in screen                            # status bar
    tmux.keys("f")                                        # fast path: the decode step in C
    tmux.wait(lambda s: "kv/sdpa +c" in s, 10, "the fast path to change")
    tmux.keys("Enter")

    def body(s: str) -> str:                              # the panes, without status and footer
        return "\n".join(s.splitlines()[:-2])
    tmux.wait(lambda s: "kv/sdpa +c" in body(s), 60, "the C-step run in the latency legend")
    tmux.wait(lambda s: "Deep learning is a mindset that prioritizes" in " ".join(s.split()),
              90, "the C-step run's text (the same golden tokens)")
    tmux.keys("s")                                        # strategy kv → paged
    tmux.wait(lambda s: "paged/sdpa" in s, 10, "the strategy to change")
    tmux.keys("q")                                        # quit: the app and engine exit
    end = time.monotonic() + 15
    while tmux.alive() and time.monotonic() < end:
        time.sleep(0.2)
    assert not tmux.alive(), "the app did not exit on q"


def test_real_race_shows_lanes_table_and_flash_tiles(tmux):
    tmux.start(f"{sys.executable} main.py --max-new-tokens 6 --backend flash --flash-tile 4 "
               "--prompt 'Deep learning is'")
    # ready: the status bar names the device (a race needs to know what runs here)
    tmux.wait(lambda s: "SmolLM2" in s and "· cpu ·" in s, 120, "the model to load")
    tmux.keys("R")                                        # race every combination, in lanes
    tmux.wait(lambda s: "naive/sdpa" in s and "waiting" in s, 30, "the race lanes")
    screen = tmux.wait(lambda s: "identical tokens" in s or "tokens differ" in s, 300,
                       "the race table")
    assert "same tokens" in screen                        # the comparison table's header
    tmux.keys("Escape")                                   # close it: the lanes stay
    screen = tmux.wait(lambda s: "same tokens" not in s, 10, "the table to close")
    # naive/sdpa, kv/sdpa, paged/sdpa, kv/naive, kv/flash (and kv/triton where it can run)
    lanes = {label: next((line for line in screen.splitlines() if f" {label} " in line), "")
             for label in ("naive/sdpa", "kv/sdpa", "paged/sdpa", "kv/naive", "kv/flash")}
    assert "ref" in lanes["naive/sdpa"]                   # every lane finished, and agrees
    assert all("6/6" in line and "tok/s" in line for line in lanes.values()), screen
    assert all("✓" in line for label, line in lanes.items() if label != "naive/sdpa"), screen
    assert "a mindset that prioritizes" in screen         # each lane keeps its text
    tmux.keys("Enter")                                    # one flash run: the tile view
    tmux.wait(lambda s: "Token stream" in s and "flash tiles are traced in layer 29" in s,
              120, "a flash run")
    tmux.keys("2")                                        # the attention pane: its keys …
    tmux.wait(lambda s: "m View" in s.splitlines()[-1], 10, "the attention pane's keys")
    tmux.keys("m", "m")                                   # … row → matrix → flash
    screen = tmux.wait(lambda s: "keys 0–" in s, 10, "the flash tile view")
    Path(os.environ.get("MINILLM_E2E_SCREEN", os.devnull)).write_text(screen)
    # the last forward pass attends over 3 prompt + 5 fed-back tokens = 8 keys: 2 tiles of 4
    assert "2 tiles × 4 keys" in screen and "layer 29 head 0" in screen
    tmux.keys("q")


def test_real_server_view_at_80x24(tmux):
    """`B` on the embedded model in a real 80×24 terminal: 16 requests through the engine
    process's batching engine, drawn live, readable, and the app free again at the end."""
    tmux.cmd("new-session", "-d", "-s", tmux.session, "-x", "80", "-y", "24", "-c", str(ROOT),
             f"env -u COLUMNS -u LINES {sys.executable} main.py --max-new-tokens 8 "
             "--truecolor")                        # no 256-colour toast over the lanes
    tmux.wait(lambda s: "SmolLM2" in s, 120, "the model to load")
    tmux.keys("B")
    tmux.wait(lambda s: "running" in s and "KV block pool" in s, 30, "the server view")
    # Finished, and the lanes drawn with their verdicts (the stats line can come a batch first).
    screen = tmux.wait(lambda s: "16 done" in s and re.search(r"██ r\d+ +✓", s), 180,
                       "the batch to finish, its lanes drawn")
    lines = screen.splitlines()
    assert len(lines) <= 24 and all(len(line) <= 80 for line in lines)
    assert "contiguous reservations fit" in screen and "paged ran" in screen
    assert "done: " in screen and "(p50 / p99)" in screen      # the summary's short form
    assert "16 requests · ↑↓ scroll" in screen, screen
    tmux.keys("Escape")
    tmux.wait(lambda s: "Token stream" in s, 10, "the panes again")
    tmux.keys("q")
