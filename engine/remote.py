"""A run on someone else's server: any OpenAI-compatible endpoint (our `serve`, vLLM, SGLang,
TGI, llama.cpp's llama-server) streamed into this engine's own events.

    endpoint = Endpoint.resolve("http://127.0.0.1:8000", model=None)   # asks /v1/models
    for event in stream_events(endpoint, RunRequest("Deep learning is", config)):
        …                               # Started, Token*, Finished — as a local run's

    source = RemoteSource(endpoint)     # engine/source.py's live source: start/submit/cancel

What comes back is measured here, at the client, and measured honestly (the known pitfalls of
streaming benchmarks):

  * **TTFT** is the time from sending the request to the first chunk that *carries a token* — a
    chat stream's first chunk often holds only {"role": "assistant"}; that is not a token.
  * **Tokens per chunk.** A chunk may carry several tokens (a server that batches its writes, a
    multi-byte character). Counted from, in this order: the chunk's logprob entries (one per
    token); the running `usage.completion_tokens` (vLLM's continuous_usage_stats); else one per
    chunk with text. Each token of a chunk gets an equal share of the time since the previous
    chunk (its ITL); the extra tokens of the *first* chunk get 0, since TTFT already holds that
    whole wait. TPOT (engine/metrics.py) is over the tokens after the first, so it does not
    depend on how a chunk's time is shared.
  * **The server's own figures beside the client's.** Where the server reports `timings`
    (llama-server, `serve`) they go into Finished.server_timings as sent, and, with per-token
    times (`serve`'s token_ms), into Finished.server_metrics by the same definitions — so
    client TTFT − server TTFT is the network and whatever the server does before its clock
    starts.

Token ids come from the logprobs when the server gives them (`serve` and llama-server: "id";
vLLM with return_tokens_as_token_ids: "token_id:N"); a token whose id is not known has id −1,
and `compare_remote` then compares the tokens' texts, or the whole texts, instead.

A race's remote contestant (`RunRequest.remote`) runs through `remote_events` inside the
engine's session, beside the local contestants, so the comparison stays in the engine.

HTTP is Python's own http.client (no third-party client in the engine); cancelling shuts the
socket down, so a blocked read returns at once and the server sees the client leave.
The module imports neither torch nor NumPy: the app's process may use it.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import math
import os
import queue
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence
from urllib.parse import urlsplit

from .compare import Comparison, compare
from .config import ConfigError, GenerationConfig
from .events import Envelope, Failed, Finished, Ready, Started, Token
from .metrics import compute_metrics
from .requests import REMOTE, RaceRequest, RunRequest
from .source import Deliver

API_KEY_ENV = ("MINILLM_API_KEY", "OPENAI_API_KEY")
MAX_LINE = 16 << 20                 # one SSE line; a token chunk is a few hundred bytes
CONNECT_S = 10.0                    # seconds to open the connection (then Endpoint.timeout)


class RemoteError(RuntimeError):
    """The server could not be reached or refused; the message says what to do.
    `user_error`: the command must change (a wrong URL, a bad request) — exit status 2."""

    def __init__(self, message: str, user_error: bool = False):
        super().__init__(message)
        self.user_error = user_error


# ----------------------------------------------------------------------------- where
@dataclass(frozen=True)
class Endpoint:
    base: str                        # http://host:port/v1 (no trailing slash)
    model: str
    api_key: str | None = None
    timeout: float = 600.0           # seconds without a byte from the server

    @staticmethod
    def base_url(url: str) -> str:
        """"host:8000", "http://host:8000", "…/v1/" → "http://host:8000/v1"."""
        url = url.strip()
        if "://" not in url:
            url = "http://" + url
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"--endpoint must be an http(s) URL such as "
                              f"http://127.0.0.1:8000/v1, got {url!r}")
        try:
            parts.port
        except ValueError:
            raise ConfigError(f"--endpoint has a bad port: {url!r}") from None
        path = parts.path.rstrip("/") or "/v1"
        return f"{parts.scheme}://{parts.netloc}{path}"

    @classmethod
    def resolve(cls, url: str, model: str | None = None, api_key: str | None = None,
                timeout: float = 600.0) -> "Endpoint":
        """The endpoint, its model asked of /v1/models when not given; the API key from the
        environment (MINILLM_API_KEY, then OPENAI_API_KEY) when not given."""
        base = cls.base_url(url)
        if api_key is None:
            api_key = next((os.environ[v] for v in API_KEY_ENV if os.environ.get(v)), None)
        endpoint = cls(base, model or "", api_key, timeout)
        if not model:
            ids = list_models(endpoint)
            if not ids:
                raise RemoteError(f"{base}/models lists no model; name one with --endpoint-model",
                                  user_error=True)
            if len(ids) > 1:
                raise RemoteError(f"{base} serves {len(ids)} models ({', '.join(ids[:5])}); "
                                  f"choose one with --endpoint-model", user_error=True)
            endpoint = cls(base, ids[0], api_key, timeout)
        return endpoint


# ----------------------------------------------------------------------------- HTTP
class Connection:
    """One request's HTTP connection; `close()` from another thread ends a blocked read."""

    def __init__(self, endpoint: Endpoint):
        parts = urlsplit(endpoint.base)
        self.endpoint, self.path_prefix = endpoint, parts.path
        kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        kw = {"context": ssl.create_default_context()} if parts.scheme == "https" else {}
        self.conn = kind(parts.hostname, parts.port, timeout=endpoint.timeout, **kw)
        self.sock = None
        self.closed = False

    def request(self, method: str, path: str, body: dict | None = None):
        headers = {"Accept": "application/json, text/event-stream"}
        if self.endpoint.api_key:
            headers["Authorization"] = f"Bearer {self.endpoint.api_key}"
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        url = f"{self.endpoint.base}{path}"
        try:
            if self.conn.sock is None:        # connect first, waiting CONNECT_S at most: an
                self.conn.timeout = CONNECT_S     # address that drops packets is said at
                try:                              # once, not after the OS gives up (minutes)
                    self.conn.connect()
                except TimeoutError:
                    raise RemoteError(f"cannot reach {url}: no answer in {CONNECT_S:.0f} s — "
                                      f"is the address right, and the port open?",
                                      user_error=True) from None
                self.conn.sock.settimeout(self.endpoint.timeout)
                self.sock = self.conn.sock    # kept: a response that ends with the
                                              # connection takes it from `conn`
            self.conn.request(method, self.path_prefix + path, body=data, headers=headers)
            resp = self.conn.getresponse()
        except (ConnectionRefusedError, socket.gaierror) as exc:
            raise RemoteError(f"cannot reach {url}: {exc.strerror or exc} — is the server "
                              f"running? (`python main.py serve` starts one)",
                              user_error=True) from None
        except (OSError, http.client.HTTPException) as exc:
            if self.closed:
                raise Cancelled() from None
            raise RemoteError(f"{url}: {type(exc).__name__}: {exc}") from None
        if resp.status >= 400:
            raise RemoteError(f"{url} answered HTTP {resp.status}: {_error_text(resp)}",
                              user_error=400 <= resp.status < 500 and resp.status != 429)
        return resp

    def interrupt(self) -> None:
        """Safe from any thread: shut the socket so a blocked read returns now. (Only that:
        closing the connection from another thread would pull the response's buffer away
        under the reading thread — http.client is not thread-safe.)"""
        self.closed = True
        sock = self.conn.sock or self.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        """From the thread that reads: interrupt, and release the connection."""
        self.interrupt()
        self.conn.close()


class Cancelled(Exception):
    pass


def _error_text(resp) -> str:
    raw = resp.read(64 << 10)
    try:
        err = json.loads(raw).get("error")
        message = err.get("message") if isinstance(err, dict) else err
        if message:
            return str(message)[:400]
    except (ValueError, AttributeError):
        pass
    return raw.decode("utf-8", "replace").strip()[:400] or resp.reason


def list_models(endpoint: Endpoint) -> list[str]:
    conn = Connection(endpoint)
    try:
        resp = conn.request("GET", "/models")
        try:
            data = json.loads(resp.read(16 << 20)).get("data", [])
            return [m["id"] for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)]
        except (ValueError, AttributeError) as exc:
            raise RemoteError(f"{endpoint.base}/models did not answer with OpenAI's model "
                              f"list ({exc})") from None
    finally:
        conn.close()


def sse_payloads(resp) -> Iterator[str]:
    """The `data:` payloads of a server-sent event stream, until [DONE] or the end."""
    data: list[str] = []
    while True:
        line = resp.readline(MAX_LINE + 1)
        if not line:
            break
        if len(line) > MAX_LINE:
            raise RemoteError("the server sent an event line over 16 MiB")
        line = line.decode("utf-8", "replace").rstrip("\r\n")
        if line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
        elif not line and data:                # a blank line ends an event
            payload, data = "\n".join(data), []
            if payload.strip() == "[DONE]":
                return
            yield payload
    if data and "\n".join(data).strip() != "[DONE]":
        yield "\n".join(data)


# ----------------------------------------------------------------------------- one run
def request_body(endpoint: Endpoint, prompt: str, cfg: GenerationConfig, chat: bool,
                 logprobs: bool) -> dict:
    """The OpenAI body for a run's settings. vLLM's extras (top_k, min_p, repetition_penalty,
    ignore_eos) only when set: a strict server would refuse them."""
    s = cfg.sampling
    body: dict = {"model": endpoint.model, "max_tokens": cfg.max_new_tokens,
                  "temperature": s.temperature, "stream": True,
                  "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    if chat:
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    for key, value in (("top_p", s.top_p), ("seed", s.seed), ("top_k", s.top_k),
                       ("min_p", s.min_p)):
        if value is not None:
            body[key] = value
    if s.repetition_penalty != 1.0:
        body["repetition_penalty"] = s.repetition_penalty
    if cfg.stop:
        body["stop"] = list(cfg.stop)
    if not cfg.stop_at_eos:
        body["ignore_eos"] = True
    if logprobs:
        if chat:
            body["logprobs"], body["top_logprobs"] = True, 0
        else:
            body["logprobs"] = 0                # the chosen token's only
    return body


def chunk_tokens(choice: dict, chat: bool) -> tuple[str, list[tuple[int, str]]]:
    """A chunk's text and its tokens as (id or −1, text) from its logprobs, if any."""
    if chat:
        text = (choice.get("delta") or {}).get("content") or ""
        entries = ((choice.get("logprobs") or {}).get("content") or [])
        tokens = [(_token_id(e.get("id"), e.get("token")), e.get("token") or "")
                  for e in entries if isinstance(e, dict)]
    else:
        text = choice.get("text") or ""
        lp = choice.get("logprobs") or {}
        strings = lp.get("tokens") or []
        ids = lp.get("token_ids") or [None] * len(strings)
        tokens = [(_token_id(i, s), s if isinstance(s, str) else "")
                  for i, s in zip(ids, strings)]
    return text, tokens


def _token_id(value, token) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(token, str) and token.startswith("token_id:"):
        try:
            return int(token[9:])
        except ValueError:
            pass
    return -1


def stream_events(endpoint: Endpoint, request: RunRequest, *, chat: bool = False,
                  logprobs: bool = True, cancel: threading.Event | None = None,
                  on_connection: Callable[[Connection | None], None] | None = None,
                  clock: Callable[[], float] = time.perf_counter) -> Iterator:
    """The run's events, as a local run's: Started, Token*, Finished (reason "error" with the
    message when the server fails mid-stream; a RemoteError before anything streamed).
    `on_connection(conn)` hands the connection to whoever may cancel (then None when done)."""
    cfg = request.config
    yield Started(strategy=REMOTE, backend=endpoint.model, device=endpoint.base, dtype="",
                  prompt=request.prompt, max_new_tokens=cfg.max_new_tokens,
                  sampling=cfg.sampling)
    conn = Connection(endpoint)
    if on_connection:
        on_connection(conn)
    run = _RemoteRun(chat)
    reason, error = "length", None
    try:
        if cancel is not None and cancel.is_set():
            raise Cancelled()
        start = clock()
        resp = conn.request("POST", "/chat/completions" if chat else "/completions",
                            request_body(endpoint, request.prompt, cfg, chat, logprobs))
        for payload in sse_payloads(resp):
            now = clock()
            try:
                chunk = json.loads(payload)
            except ValueError:
                raise RemoteError(f"the server sent an event that is not JSON: "
                                  f"{payload[:80]!r}") from None
            if isinstance(chunk, dict) and chunk.get("error"):
                err = chunk["error"]
                raise RemoteError(str(err.get("message") if isinstance(err, dict) else err))
            yield from run.take(chunk, now - start)
            if cancel is not None and cancel.is_set():
                raise Cancelled()
        if conn.closed or (cancel is not None and cancel.is_set()):
            raise Cancelled()
        if run.reason is None:
            raise RemoteError("the server ended the stream without a finish_reason")
        reason = run.reason
    except Cancelled:
        reason = "cancelled"
    except (OSError, http.client.HTTPException) as exc:
        if conn.closed or (cancel is not None and cancel.is_set()):
            reason = "cancelled"
        else:
            reason, error = "error", f"the connection to {endpoint.base} broke: {exc}"
    except RemoteError as exc:
        if not run.latencies:
            raise                                # nothing streamed: the caller says why
        reason, error = "error", str(exc)
    finally:
        if on_connection:
            on_connection(None)
        conn.close()
    yield run.finished(reason, error)


class _RemoteRun:
    """What a streamed answer adds up to: text, tokens, their client-side latencies, the
    server's usage and timings."""

    def __init__(self, chat: bool):
        self.chat = chat
        self.text = ""
        self.ids: list[int] = []
        self.latencies: list[float] = []         # TTFT, then each token's share of a gap
        self.last = 0.0                          # seconds from the request to the last token
        self.counted = 0                         # tokens per usage.completion_tokens …
        self.continuous = False                  # … sent with every chunk (vLLM's option)
        self.prompt_tokens = 0
        self.timings: dict = {}
        self.reason: str | None = None

    def take(self, chunk: dict, at: float) -> list[Token]:
        usage = chunk.get("usage") if isinstance(chunk.get("usage"), dict) else None
        if isinstance(chunk.get("timings"), dict):
            self.timings = {**self.timings, **chunk["timings"]}
        choices = chunk.get("choices") or []
        choice = choices[0] if choices and isinstance(choices[0], dict) else {}
        text, tokens = chunk_tokens(choice, self.chat) if choice else ("", [])
        finish = choice.get("finish_reason")
        if finish:
            self.reason = {"stop": "stop", "length": "length"}.get(finish, finish)
        # How many tokens this chunk carries: logprob entries, else the running usage count
        # (only from a server that sends it with every chunk: a usage that first comes with
        # the end is a total, not this chunk's share), else one if it has text.
        if usage:
            for key in ("prompt_tokens", "completion_tokens"):
                if isinstance(usage.get(key), int):
                    self.timings = {**self.timings, key: usage[key]}
            if isinstance(usage.get("prompt_tokens"), int):
                self.prompt_tokens = usage["prompt_tokens"]
            self.continuous |= bool(choice) and not finish
        n = len(tokens)
        if usage and self.continuous and isinstance(usage.get("completion_tokens"), int):
            total = usage["completion_tokens"]
            n = n or max(0, total - self.counted)
            self.counted = max(self.counted, total)
        elif not n and text:
            n = 1
        if not n:
            self.text += text                    # text without a token (rare): kept, not timed
            return []
        if len(tokens) != n or "".join(s for _, s in tokens) != text:
            tokens = [(tid, "") for tid, _ in tokens] if len(tokens) == n else [(-1, "")] * n
            tokens[0] = (tokens[0][0], text)     # the chunk's text on its first token
        first = not self.latencies
        share = (at - self.last) / n
        out = []
        for k, (tid, piece) in enumerate(tokens):
            latency = (at if k == 0 else 0.0) if first else share
            self.latencies.append(latency)
            self.ids.append(tid)
            index = len(self.ids) - 1
            out.append(Token(id=tid, text=piece, position=index, index=index,
                             latency_s=latency))
        self.text += text
        self.last = at
        return out

    def finished(self, reason: str, error: str | None) -> Finished:
        metrics = compute_metrics(self.prompt_tokens, 0.0, self.latencies, None, 0) \
            if self.latencies else None
        scalars = {k: float(v) for k, v in self.timings.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        return Finished(reason=reason, tokens=tuple(self.ids), text=self.text, metrics=metrics,
                        error=error, server_timings=scalars,
                        server_metrics=server_metrics(self.timings))


def server_metrics(timings: dict):
    """The server's per-token times (`serve`'s token_ms) through engine/metrics.py; None when
    the server gives only totals (llama-server: its own figures stay in server_timings)."""
    token_ms = timings.get("token_ms") if isinstance(timings, dict) else None
    if not isinstance(token_ms, list) or not token_ms or \
            not all(isinstance(x, (int, float)) for x in token_ms):
        return None
    prompt = timings.get("prompt_n", 0) + timings.get("cache_n", 0)
    return compute_metrics(int(prompt), float(timings.get("prompt_ms") or 0.0) / 1000,
                           [x / 1000 for x in token_ms], None, 0)


def compare_remote(remote: Sequence[Token], text: str, reference: Sequence[Token],
                   reference_text: str, *, piece: Callable[[int], str] | None = None,
                   encode: Callable[[str], list[int]] | None = None
                   ) -> tuple[Comparison | None, str]:
    """A remote run's tokens against the local reference run's (engine/compare.py), and how
    they were compared — or None and why not. docs/serve.md says when each way is sound.

    token ids    the server gave every token's id (`serve`, llama-server; vLLM with
                 return_tokens_as_token_ids): compared as ids — if the server's vocabulary is
                 this model's. `piece(id)` (the local tokenizer's text of one token) checks
                 that: where the server's token texts mostly disagree with ours for the same
                 ids, it is another vocabulary, and its ids say nothing here.
    token texts  every token's text, no ids (vLLM's default logprobs): the texts against the
                 reference's token pieces.
    text         nothing per token: both whole texts re-tokenised by `encode` (the local
                 tokenizer) — identical exactly when the texts are; where they differ, the
                 index is that of the re-tokenised texts, near the generated one.
    """
    if remote and all(t.id >= 0 for t in remote):
        foreign = _foreign_vocabulary(remote, piece) if piece is not None else None
        if foreign:
            return None, f"not compared: the server's vocabulary is not this model's ({foreign})"
        return compare([t.id for t in remote], [t.id for t in reference]), "token ids"
    if remote and all(t.text for t in remote):
        return compare([t.text for t in remote], [t.text for t in reference]), "token texts"
    if encode is not None and (text or reference_text):
        return compare(encode(text), encode(reference_text)), "text"
    return None, "not compared: the server sent no tokens"


def _foreign_vocabulary(remote: Sequence[Token], piece: Callable[[int], str]) -> str:
    """"its token 42 is 'x', here 'y'" when most checkable tokens (text known on both sides,
    whole characters) spell differently here; "" when the vocabularies agree."""
    checked, wrong = 0, []
    for t in remote:
        here = piece(t.id)
        if not t.text or "\ufffd" in t.text or not here or "\ufffd" in here:
            continue                      # a lone byte of a character, or a chunk's text
        checked += 1
        if here != t.text:
            wrong.append(f"its token {t.id} is {t.text!r}, here {here!r}")
    return wrong[0] if checked and len(wrong) * 2 > checked else ""


def server_figures(server_metrics, timings: dict) -> str:
    """The server's own figures for a run in a few words ("" when it sent none): `serve`'s
    per-token times as TTFT/TPOT/tok/s, else llama-server's totals."""
    s, t = server_metrics, timings or {}
    if s is not None:
        tpot = "—" if math.isnan(s.tpot_s) else f"{s.tpot_s * 1e3:.1f}"
        rate = "—" if math.isnan(s.decode_tokens_per_s) else f"{s.decode_tokens_per_s:.1f}"
        return f"server: TTFT {s.ttft_s * 1e3:.0f} ms · TPOT {tpot} ms · {rate} tok/s"
    if "predicted_ms" in t:
        return (f"server: prompt {t.get('prompt_n', 0):.0f} tokens in {t.get('prompt_ms', 0):.0f}"
                f" ms · {t.get('predicted_n', 0):.0f} tokens in {t['predicted_ms']:.0f} ms")
    return ""


def remote_events(request: RunRequest, cancel, endpoints: dict | None = None
                  ) -> Iterator:
    """A run request with `remote` (engine/requests.py Remote) as a session runs it: Started,
    Token*, Finished — a server that cannot be reached or refuses is a Finished with the one
    line that says why, never an exception. `cancel`: anything with is_set() (the session's
    flag, perhaps a multiprocessing Event); a thread watches it and shuts the connection, so a
    stop lands even while a read waits on a slow server. `endpoints`: a cache of resolved
    endpoints (the model id asked of /v1/models once per session)."""
    remote = request.remote
    key = (remote.url, remote.model)
    try:
        endpoint = (endpoints or {}).get(key) or Endpoint.resolve(remote.url, remote.model)
    except (RemoteError, ConfigError) as exc:
        cfg = request.config
        yield Started(strategy=REMOTE, backend=remote.name, device=remote.url, dtype="",
                      prompt=request.prompt, max_new_tokens=cfg.max_new_tokens,
                      sampling=cfg.sampling)
        yield Finished(reason="error", tokens=(), text="", error=str(exc))
        return
    if endpoints is not None:
        endpoints[key] = endpoint
    watch = _CancelWatch(cancel)
    failed = True
    try:
        for event in stream_events(endpoint, request, cancel=watch, on_connection=watch.hold):
            if isinstance(event, Started):       # named as the race names it
                event = dataclasses.replace(event, backend=remote.name)
            elif isinstance(event, Finished):
                failed = event.reason == "error"
            yield event
    except RemoteError as exc:            # refused before anything streamed
        yield Finished(reason="error", tokens=(), text="", error=str(exc))
    finally:
        watch.done()
        if failed and endpoints is not None:
            endpoints.pop(key, None)      # ask again next time: the server may have changed


class _CancelWatch:
    """Looks at a cancel flag every 50 ms while a connection is open, and closes it once the
    flag is set (http.client's blocked read does not look at flags). Is itself a flag for
    stream_events: set when the flag it watches is."""

    POLL_S = 0.05

    def __init__(self, flag):
        self.flag, self.conn = flag, None
        self.lock, self.stopped = threading.Lock(), threading.Event()
        self.thread: threading.Thread | None = None

    def is_set(self) -> bool:
        return self.flag is not None and self.flag.is_set()

    def hold(self, conn: Connection | None) -> None:
        with self.lock:
            self.conn = conn
        if conn is not None and self.flag is not None and self.thread is None:
            self.thread = threading.Thread(target=self._watch, name="remote-cancel", daemon=True)
            self.thread.start()

    def _watch(self) -> None:
        while not self.stopped.wait(self.POLL_S):
            if self.flag.is_set():
                with self.lock:
                    if self.conn is not None:
                        self.conn.interrupt()
                return

    def done(self) -> None:
        self.stopped.set()
        if self.thread is not None:
            self.thread.join(timeout=1)


# ----------------------------------------------------------------------------- as a source
class RemoteSource:
    """engine/source.py's live source for a remote server: `start(deliver)` checks the
    endpoint (Ready, or a fatal Failed), `submit(RunRequest)` streams it (runs one at a time, in
    order, on the source's thread), `cancel()` stops the current run at once (the connection
    is shut: the server frees the request), `stop()` ends the thread.

    Ready describes the remote model by name only: a server does not expose its layers, heads
    or cache (those Ready fields are 0, and `device` is the endpoint's URL)."""

    live = True

    def __init__(self, url: str, model: str | None = None, api_key: str | None = None,
                 chat: bool = False, logprobs: bool = True,
                 clock: Callable[[], float] = time.monotonic):
        self.url, self.model, self.api_key = url, model, api_key
        self.chat, self.logprobs, self.clock = chat, logprobs, clock
        self.endpoint: Endpoint | None = None
        self.requests: queue.Queue = queue.Queue()
        self.cancel_event = threading.Event()
        self._conn: Connection | None = None
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._deliver: Deliver | None = None
        self._closed = threading.Event()

    def start(self, deliver: Deliver) -> None:
        self._deliver = deliver
        self._thread = threading.Thread(target=self._main, name="remote-source", daemon=True)
        self._thread.start()

    def submit(self, request) -> None:
        self.cancel_event.clear()               # clear *before* queueing: a stop can't be lost
        self.requests.put(request)

    def cancel(self) -> None:
        self.cancel_event.set()
        with self._lock:
            if self._conn is not None:
                self._conn.interrupt()

    def stop(self) -> None:
        self._closed.set()
        self.cancel()
        self.requests.put(None)
        if self._thread is not None:
            self._thread.join(timeout=5)

    # ------------------------------------------------------------------ its thread
    def _send(self, run: int, event) -> None:
        if not self._closed.is_set():
            self._deliver([Envelope(run, self.clock(), event)], False)

    def _main(self) -> None:
        try:
            self.endpoint = Endpoint.resolve(self.url, self.model, self.api_key)
        except (RemoteError, ConfigError) as exc:
            self._send(0, Failed(str(exc), fatal=True))
            return
        self._send(0, Ready(model=self.endpoint.model, device=self.endpoint.base, dtype="",
                            n_layers=0, n_heads=0, n_kv_heads=0, head_dim=0, max_seq_len=0))
        while not self._closed.is_set():
            request = self.requests.get()
            if request is None:
                return
            if isinstance(request, RaceRequest):
                self._send(request.race_id, Failed(
                    "a remote server runs one request at a time: race it as one lane beside "
                    "local runs"))
                continue
            try:
                for event in stream_events(self.endpoint, request, chat=self.chat,
                                           logprobs=self.logprobs, cancel=self.cancel_event,
                                           on_connection=self._hold):
                    self._send(request.run_id, event)
            except RemoteError as exc:
                self._send(request.run_id, Finished(reason="error", tokens=(), text="",
                                                    error=str(exc)))

    def _hold(self, conn: Connection | None) -> None:
        with self._lock:
            self._conn = conn
        if conn is not None and self.cancel_event.is_set():
            conn.close()
