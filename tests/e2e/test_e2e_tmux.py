"""End to end: the real app, the embedded model, a real terminal (tmux), keys sent as a user would.

It starts `python main.py` in a detached tmux session on a private socket, waits for the model,
presses enter, and reads the screen with `capture-pane` until the run has finished. The embedded
model is greedy-decoded, so the continuation is known (tests/engine/test_golden.py).
About 15–30 s with the conversion cache warm; the first run ever also converts the GGUF.
"""

from __future__ import annotations

import os
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
    def __init__(self) -> None:
        self.socket = f"minillm-e2e-{os.getpid()}"
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
    assert "layer 0/29" in screen                         # attention pane (30 layers)
    assert "latency per token" in screen                  # latency chart
    assert "kv/sdpa" in screen                            # status bar
    tmux.keys("s")                                        # strategy kv → paged
    tmux.wait(lambda s: "paged/sdpa" in s, 10, "the strategy to change")
    tmux.keys("q")                                        # quit: the app and engine exit
    end = time.monotonic() + 15
    while tmux.alive() and time.monotonic() < end:
        time.sleep(0.2)
    assert not tmux.alive(), "the app did not exit on q"
