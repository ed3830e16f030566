"""The real `serve` process for the server tests, and `run`'s tokens to compare it with.

`start_server` launches `python main.py serve --port 0 …` (any free port) and waits for the
line on its stderr that names its URL — no sleeping, no guessed port. One server process is
shared by a whole test module (a start costs a few seconds of imports); it is stopped with
SIGINT at the end, which must exit 0.

The tiny random Llama is served in float64: batching may add in another order than a lone run,
which in float32 can flip a greedy token at a near-tie (docs/batching.md); in float64 every
token must equal `run`'s. Its folder gets a chat template, so chat is tested as well.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
API_KEY = "test-key-123"
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


def render(messages) -> str:
    """What CHAT_TEMPLATE makes of messages (written out by hand, to check the server's)."""
    return "".join(f"<{m['role']}>{m['content']}\n" for m in messages) + "<assistant>"


class Server:
    def __init__(self, proc: subprocess.Popen, base: str, lines: list[str]):
        self.proc, self.base, self.lines = proc, base, lines
        self.root = base.removesuffix("/v1")

    def get(self, path: str, headers: dict | None = None):
        """(status, body text) of a GET on the server's root."""
        return request(self.root + path, headers=headers)

    def metrics(self) -> dict:
        from tests.serve.prom import parse
        status, text = self.get("/metrics")
        assert status == 200
        return parse(text)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                return self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                raise
        return self.proc.returncode


def request(url: str, body=None, headers: dict | None = None, method: str | None = None,
            raw: bytes | None = None):
    """(status, text) of one HTTP request; an error status is returned, not raised."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, method=method or ("POST" if data else "GET"),
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def start_server(args: list[str], env: dict | None = None, timeout: float = 180) -> Server:
    proc = subprocess.Popen([sys.executable, "main.py", "serve", "--port", "0", *args],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, **(env or {})})
    lines: list[str] = []
    found: queue.Queue = queue.Queue()

    def read():                          # keeps draining stderr so the pipe never fills
        for line in proc.stderr:
            lines.append(line)
            if line.startswith("serving ") and " at http://" in line:
                found.put(line.split(" at ")[1].split()[0])
        found.put(None)

    threading.Thread(target=read, daemon=True).start()
    try:
        base = found.get(timeout=timeout)
    except queue.Empty:
        proc.kill()
        raise AssertionError(f"serve did not start in {timeout} s: {''.join(lines)[-2000:]}")
    if base is None:
        raise AssertionError(f"serve ended (rc {proc.wait()}): {''.join(lines)[-2000:]}")
    return Server(proc, base, lines)


@pytest.fixture(scope="session")
def chat_folder(tiny_folder, tmp_path_factory) -> Path:
    """The tiny Llama folder with a chat template in its tokenizer_config.json."""
    folder = tmp_path_factory.mktemp("tiny-chat")
    for f in Path(tiny_folder).iterdir():
        shutil.copy(f, folder / f.name)
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
    return folder


@pytest.fixture(scope="module")
def server(chat_folder):
    srv = start_server(["--model", str(chat_folder), "--dtype", "float64", "--threads", "1",
                        "--api-key", API_KEY, "--max-new-tokens", "24"])
    yield srv
    assert srv.stop() == 0, "".join(srv.lines)[-2000:]


_RUNS: dict = {}


def run_tokens(folder, prompt: str, max_new: int, *extra: str) -> tuple[list[int], str]:
    """`python main.py run PROMPT --json` in this process: (tokens, text) of its Finished."""
    from cli.main import main
    key = (str(folder), prompt, max_new, extra)
    if key not in _RUNS:
        import contextlib
        import io
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            rc = main(["run", prompt, "--model", str(folder), "--dtype", "float64",
                       "--max-new-tokens", str(max_new), "--json", *extra])
        assert rc == 0
        fin = [json.loads(line) for line in out.getvalue().splitlines()][-1]
        assert fin["type"] == "finished"
        _RUNS[key] = (fin["tokens"], fin["text"] + fin["tail"])
    return _RUNS[key]


def wait_for(condition, what: str, timeout: float = 30.0):
    """Poll `condition()` until it is truthy (returned) — for state only /metrics shows."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)
