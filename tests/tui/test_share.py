"""Sharing the screen: `--share` streams a live session to read-only viewers over a real
socket, `watch URL` follows it (each viewer with its own layer, head and pane), and `web`
serves the app to a browser."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from engine.events import Finished, Ready, Started
from engine.recording import read_recording
from tui.app import MiniLLMApp
from tui.settings import Settings
from tui.share import ShareServer, WatchSource, parse_address
from tui.widgets.attention import AttentionPane
from tui.widgets.status_bar import StatusBar
from tui.widgets.token_stream import TokenStream

from .conftest import drive, finished, make_app, ready, wait_for

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "fixtures" / "fake_session.jsonl"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_share_addresses():
    assert parse_address(None) == ("127.0.0.1", 8765)
    assert parse_address(":9000") == ("127.0.0.1", 9000)
    assert parse_address("0.0.0.0:80") == ("0.0.0.0", 80)
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_address("nowhere")


class Collector:
    """A viewer without a screen: what a WatchSource delivers, batch by batch."""

    def __init__(self) -> None:
        self.batches: list[tuple[list, bool]] = []

    def __call__(self, envelopes, restart) -> None:
        self.batches.append((list(envelopes), restart))

    def events(self, kind) -> list:
        return [e.event for b, _ in self.batches for e in b if isinstance(e.event, kind)]


async def test_a_live_session_is_shared_with_its_state_then_live(tmp_path):
    port = free_port()
    app = make_app(max_new_tokens=6, share=f"127.0.0.1:{port}")
    async with drive(app) as (pilot, seen):
        await ready(pilot)
        await wait_for(pilot, lambda: seen.said("sharing read-only", "this machine only"))
        assert "shared on 127.0.0.1" in str(app.query_one(StatusBar).render())
        await pilot.press("enter")
        first = await finished(pilot, seen)
        # A viewer arriving now gets the state so far in one batch, to draw from scratch …
        viewer = Collector()
        source = WatchSource(f"127.0.0.1:{port}")
        source.start(viewer)
        await wait_for(pilot, lambda: viewer.batches, what="the viewer's first batch")
        state, restart = viewer.batches[0]
        assert restart and isinstance(state[0].event, Ready)
        assert [e.event for e in state if isinstance(e.event, Finished)][0].tokens == first.tokens
        # … then every batch as the presenter draws it.
        await pilot.press("s", "enter")
        await finished(pilot, seen, 2)
        await wait_for(pilot, lambda: len(viewer.events(Finished)) == 2, what="the live run")
        assert viewer.events(Started)[-1].strategy == "paged"
        assert not any(restart for _, restart in viewer.batches[1:])
        # Saved as it comes, the stream is a recording `replay` plays.
        def save() -> None:                      # (in a thread: the app serves on this loop)
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/events", timeout=5) as s:
                head = s.readline()
                lines = [s.readline() for _ in range(json.loads(head)["state"])]
            (tmp_path / "saved.jsonl").write_bytes(head + b"".join(lines))
        await asyncio.to_thread(save)
        source.stop()
    rec = read_recording(str(tmp_path / "saved.jsonl"))
    assert rec.notice is None and sum(isinstance(e.event, Finished) for e in rec.envelopes) == 2


class ServerThread:
    """A ShareServer on its own event loop in a thread, as in a presenter's app."""

    def __init__(self, server: ShareServer) -> None:
        self.server, self.loop = server, asyncio.new_event_loop()
        started = threading.Event()

        def run():
            asyncio.set_event_loop(self.loop)
            self.loop.run_until_complete(server.start(lambda *a, **k: None, lambda t: None))
            started.set()
            self.loop.run_forever()
            self.loop.run_until_complete(server.stop())
            self.loop.close()
        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert started.wait(10)

    def publish(self, envelopes) -> None:
        self.loop.call_soon_threadsafe(self.server.publish, envelopes)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


async def test_watch_opens_the_app_on_a_shared_session_each_viewer_its_own_view():
    port = free_port()
    server = ServerThread(ShareServer(f"127.0.0.1:{port}", lambda: {}))
    publish = server.publish
    envelopes = read_recording(str(FIXTURE)).envelopes
    ends = [i for i, e in enumerate(envelopes) if isinstance(e.event, Finished)]
    first_run_end, second_run_end = ends[0], ends[1]
    publish(envelopes[:first_run_end + 1])             # a run already shown to the room
    viewer = MiniLLMApp(Settings(prompt=""), source=WatchSource(f"http://127.0.0.1:{port}"),
                        color_depth="truecolor")
    async with drive(viewer) as (pilot, seen):
        stream = viewer.query_one(TokenStream)
        await wait_for(pilot, lambda: stream.generated_text, what="the state so far")
        assert viewer.info is not None and "watching http://127.0.0.1" in str(
            viewer.query_one(StatusBar).render())
        assert stream.text.startswith("Deep learning is")
        await pilot.press("enter", "s", "R")           # a viewer cannot ask the engine anything
        att = viewer.query_one(AttentionPane)
        await pilot.press("2", "right_square_bracket", "m")   # its own layer and view
        assert (att.shown_layer, att.mode) == (1, "matrix")
        publish(envelopes[first_run_end + 1:second_run_end + 1])   # the presenter goes on …
        await wait_for(pilot, lambda: att.flash is not None, what="the next run")
        assert viewer.settings.backend == "flash"       # … shown with its own settings
    server.stop()


async def test_watching_nothing_says_so_and_keeps_trying():
    viewer = MiniLLMApp(Settings(prompt=""), source=WatchSource(f"127.0.0.1:{free_port()}",
                                                                retry=0.2))
    async with drive(viewer) as (pilot, seen):
        await wait_for(pilot, lambda: seen.said("cannot follow", "trying again"))
        assert viewer.info is None


def test_web_serves_the_app_page_over_http():
    port = free_port()
    proc = subprocess.Popen([sys.executable, "main.py", "web", "--port", str(port), "--",
                             "replay", str(FIXTURE)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        end, page = time.monotonic() + 60, ""
        while time.monotonic() < end and not page:
            try:
                with urllib.request.urlopen(f"http://localhost:{port}/", timeout=5) as r:
                    page = r.read().decode()
            except OSError:
                assert proc.poll() is None, proc.communicate()[1][-2000:]
                time.sleep(0.2)
        assert "Mini LLM" in page and "textual" in page.lower()
    finally:
        proc.terminate()
        proc.wait(10)
    assert "replay" in proc.communicate()[1]            # the command it serves, said on stderr


def test_a_bad_share_address_is_one_line_on_stderr(capsys):
    from cli.main import main
    assert main(["--share", "nowhere"]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err.strip() == (
        "error: --share wants HOST:PORT (e.g. 127.0.0.1:8765), got 'nowhere'")
