"""Share a live session read-only (`--share`), and follow one from elsewhere (`watch URL`).

    presenter   python main.py --share                  → http://127.0.0.1:8765/events
    attendee    python main.py watch http://HOST:8765   (no torch, no model)

The presenter's app serves, from its own event loop (aiohttp), what it draws: one envelope
JSON line per engine event (docs/events.md), batches separated by an empty line. A viewer
first gets a header line (a recording header whose `state` says how many lines follow), then
the state so far — the model's `ready` and the recent runs — which it draws from scratch, as a
replay does after a step back (`restart=True`), then every batch as it comes. Saved with curl,
the stream is a recording `replay` plays.

Viewers cannot send anything: the server has one GET route. Each viewer's app is its own, so
each picks its own layer, head, view and zoom. It listens on the loopback interface unless told
otherwise (use `ssh -L 8765:localhost:8765 host` to reach it), and says so loudly when bound
elsewhere: anyone who can reach that port can watch, prompts included.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import threading
import time
import urllib.parse
from typing import Callable

from engine.events import Envelope, Failed
from engine.recording import header
from engine.source import Deliver

DEFAULT_ADDRESS = "127.0.0.1:8765"
HISTORY_LINES = 50_000     # envelopes kept for a newcomer (a 7-way race of 50 tokens: ~1 600)
QUEUE_BATCHES = 256        # batches a slow viewer may lag behind before it is dropped
HEARTBEAT_S = 5.0          # an empty line this often, so a viewer can tell a quiet session
RETRY_S = 2.0              # from a lost connection


def parse_address(text: str | None) -> tuple[str, int]:
    """"HOST:PORT", ":PORT" or "PORT" → (host, port); loopback when no host is given."""
    text = (text or DEFAULT_ADDRESS).strip()
    host, _, port = text.rpartition(":")
    try:
        number = int(port)
    except ValueError:
        raise ValueError(f"--share wants HOST:PORT (e.g. {DEFAULT_ADDRESS}), got {text!r}") \
            from None
    if not 0 < number < 65536:
        raise ValueError(f"port {number} is out of range (1–65535)")
    return host.strip("[]") or "127.0.0.1", number


def is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


class ShareServer:
    """The presenter's side: `publish` every batch the app draws; viewers get it all."""

    def __init__(self, address: str, settings: Callable[[], dict]) -> None:
        self.host, self.port = parse_address(address)
        self.settings = settings
        self.history: list[tuple[str, str]] = []     # (event type, JSON line)
        self.viewers: set[asyncio.Queue] = set()
        self._runner = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def start(self, say: Callable[..., None], show: Callable[[str], None]) -> None:
        from aiohttp import web        # installed with textual-serve; only the sharer needs it
        app = web.Application()
        app.router.add_get("/events", self.events)
        app.router.add_get("/", self.events)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        try:
            await web.TCPSite(self._runner, self.host, self.port).start()
        except OSError as exc:
            say(f"cannot share on {self.host}:{self.port}: {exc.strerror or exc}",
                title="Share", severity="error", timeout=10)
            return
        show(f"shared on {self.host}:{self.port}")
        where = ("this machine only (ssh -L forwards it)" if is_loopback(self.host) else
                 "every network this machine is on: anyone who reaches the port can watch, "
                 "prompts included")
        say(f"sharing read-only on {self.url} — {where}; viewers run "
            f"`python main.py watch {self.url}`", title="Share",
            severity="information" if is_loopback(self.host) else "warning", timeout=12)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def publish(self, envelopes, restart: bool = False) -> None:
        """A batch the app received (restart: the state from the beginning)."""
        lines = [(env.to_json()["type"], json.dumps(env.to_json(), separators=(",", ":")))
                 for env in envelopes]
        if restart:
            self.history = []
        self.history += [item for item in lines if item[0] != "loading"]   # past progress
        self._trim()
        if not self.viewers:
            return
        chunk = "".join(line + "\n" for _, line in lines) + "\n"
        for queue in list(self.viewers):
            if queue.qsize() >= QUEUE_BATCHES:
                self.viewers.discard(queue)          # too slow: it reconnects and resyncs
                queue.put_nowait(None)
            else:
                queue.put_nowait(chunk)

    def _trim(self) -> None:
        """Keep the newest runs whole: cut at a run's or race's start, keep `ready`."""
        if len(self.history) <= HISTORY_LINES:
            return
        cut = len(self.history) - HISTORY_LINES
        starts = [i for i, (kind, _) in enumerate(self.history)
                  if i >= cut and kind in ("started", "race_started")]
        keep = [item for item in self.history[:cut] if item[0] == "ready"][-1:]
        self.history = keep + self.history[starts[0] if starts else cut:]

    async def events(self, request):
        from aiohttp import web
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson",
                                               "Cache-Control": "no-store"})
        await response.prepare(request)
        queue: asyncio.Queue = asyncio.Queue()
        head = dict(header(self.settings(), None, "share"), state=len(self.history))
        state = [line for _, line in self.history]
        self.viewers.add(queue)
        try:
            await response.write("".join(line + "\n" for line in [json.dumps(head), *state])
                                 .encode() + b"\n")
            while True:
                try:
                    chunk = await asyncio.wait_for(queue.get(), HEARTBEAT_S)
                except asyncio.TimeoutError:
                    chunk = "\n"
                if chunk is None:
                    break
                await response.write(chunk.encode())
        except (ConnectionError, RuntimeError, asyncio.CancelledError):
            pass                                  # the viewer left, or the app is closing
        finally:
            self.viewers.discard(queue)
        return response


class WatchSource:
    """The viewer's side: a Source (engine/source.py) that follows a shared session. Not live
    (it takes no requests) and not steerable; stdlib only — no torch, no aiohttp."""

    live = False

    def __init__(self, url: str, retry: float = RETRY_S) -> None:
        url = url if "://" in url else f"http://{url}"
        self.url = url.rstrip("/") + ("" if url.rstrip("/").endswith("/events") else "/events")
        self.retry = retry
        self._closed = threading.Event()
        self._deliver: Deliver | None = None
        self._connection: http.client.HTTPConnection | None = None
        self._thread: threading.Thread | None = None

    def start(self, deliver: Deliver) -> None:
        self._deliver = deliver
        self._thread = threading.Thread(target=self._run, name="watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop following: the reading thread is woken (its socket shut) and ends."""
        self._closed.set()
        connection = self._connection
        if connection is not None and connection.sock is not None:
            try:
                connection.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=2)

    def _say(self, text: str) -> None:
        self._deliver([Envelope(0, time.monotonic(), Failed(text, fatal=False))], False)

    def _run(self) -> None:
        lost = False
        while not self._closed.is_set():
            try:
                self._follow()
                why = "the shared session ended"
            except (OSError, ValueError, http.client.HTTPException) as exc:
                why = f"cannot follow {self.url}: {exc.strerror or exc}" if isinstance(
                    exc, OSError) else f"cannot follow {self.url}: {exc}"
            if self._closed.is_set():
                return
            if not lost:
                self._say(f"{why}; trying again every {self.retry:g} s")
            lost = True
            self._closed.wait(self.retry)

    def _follow(self) -> None:
        parts = urllib.parse.urlsplit(self.url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError("watch wants an http:// address, e.g. http://127.0.0.1:8765")
        self._connection = http.client.HTTPConnection(parts.hostname, parts.port or 80,
                                                      timeout=4 * HEARTBEAT_S)
        try:
            self._connection.request("GET", parts.path or "/events")
            stream = self._connection.getresponse()
            if stream.status != 200:
                raise ValueError(f"the address answered HTTP {stream.status}")
            self._read(stream)
        finally:
            self._connection.close()

    def _read(self, stream) -> None:
        """A header, the state so far (one restart batch), then batches until the end."""
        head = json.loads(stream.readline() or b"null")
        if not isinstance(head, dict) or head.get("command") != "share":
            raise ValueError("that address does not serve a shared minillm session")
        count = head.get("state", 0)
        state = [Envelope.from_json(json.loads(stream.readline())) for _ in range(count)]
        self._deliver(state, True)               # the state so far: draw it from scratch
        batch: list[Envelope] = []
        for raw in stream:
            if self._closed.is_set():
                return
            line = raw.strip()
            if line:
                batch.append(Envelope.from_json(json.loads(line)))
            elif batch:                           # an empty line ends a batch
                self._deliver(batch, False)
                batch = []
