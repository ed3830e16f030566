"""engine/remote.py: a remote server's stream as this engine's events.

Against our own `serve` (the real process): `run --endpoint` prints what a local `run` prints and
gives the same tokens; RemoteSource runs requests and cancels them (the server frees them).
Against a scripted stream (a tiny HTTP server that replays canned SSE chunks, with the client's
clock replaced by the times each chunk "arrives"): the honest-metrics rules, exactly.
"""

from __future__ import annotations

import io
import json
import contextlib
import queue

import pytest

from engine import events as be
from engine.config import GenerationConfig
from engine.remote import Endpoint, RemoteError, RemoteSource, compare_remote, stream_events
from engine.requests import RaceRequest, RunRequest
from tests.serve.conftest import API_KEY, run_tokens, wait_for
from tests.serve.prom import value
from tests.sse_server import SSEServer


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv("MINILLM_API_KEY", API_KEY)


def cli(*argv) -> tuple[int, str, str]:
    from cli.main import main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(argv))
    return rc, out.getvalue(), err.getvalue()


# ----------------------------------------------------------------------------- our own server
def test_run_endpoint_prints_what_a_local_run_prints(server, chat_folder, key):
    tokens, text = run_tokens(chat_folder, "Deep learning is", 20)
    rc, out, err = cli("run", "Deep learning is", "--endpoint", server.base,
                       "--max-new-tokens", "20", "--temperature", "0")
    assert rc == 0 and out == text + "\n"
    assert f"[{len(tokens)} tokens · TTFT" in err and f"remote {chat_folder.name}" in err
    assert "[server: TTFT" in err                    # the server's own figures beside


def test_run_endpoint_json_has_the_same_tokens(server, chat_folder, key):
    tokens, text = run_tokens(chat_folder, "The cat sat on", 20)
    rc, out, _ = cli("run", "The cat sat on", "--endpoint", server.root, "--max-new-tokens",
                     "20", "--json")
    lines = [json.loads(line) for line in out.splitlines()]
    assert rc == 0 and [d["type"] for d in lines[:3]] == ["header", "ready", "started"]
    fin = be.from_json(lines[-1])
    assert list(fin.tokens) == tokens and fin.text == text
    assert [be.from_json(d).id for d in lines if d["type"] == "token"] == tokens
    m, s = fin.metrics, fin.server_metrics
    assert m.new_tokens == s.new_tokens == len(tokens)
    assert m.ttft_s >= s.ttft_s > 0                  # the client waits for the network too
    assert fin.server_timings["predicted_n"] == len(tokens)


def test_run_endpoint_mistakes_are_one_line(server, key):
    rc, _, err = cli("run", "x", "--endpoint", server.base, "--endpoint-model", "nope")
    assert rc == 2 and "HTTP 404" in err and "does not exist" in err
    assert err.count("\n") == 1
    rc, _, err = cli("run", "x", "--endpoint", server.base, "--max-new-tokens", "600")
    assert rc == 2 and "exceeds the model's context" in err


def test_run_endpoint_without_the_key(server, monkeypatch):
    monkeypatch.delenv("MINILLM_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    rc, _, err = cli("run", "x", "--endpoint", server.base)
    assert rc == 2 and "HTTP 401" in err
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)             # the second variable is read too
    assert cli("run", "x", "--endpoint", server.base, "--max-new-tokens", "2")[0] == 0


def collect():
    """A deliver() that queues every envelope, and a way to wait for one kind."""
    got: queue.Queue = queue.Queue()

    def deliver(envelopes, restart):
        for env in envelopes:
            got.put(env)

    def until(kind, timeout=60):
        seen = []
        while True:
            env = got.get(timeout=timeout)
            seen.append(env)
            if isinstance(env.event, kind):
                return seen
    return deliver, until


def test_remote_source_runs_and_compares(server, chat_folder):
    deliver, until = collect()
    src = RemoteSource(server.base, api_key=API_KEY)
    src.start(deliver)
    try:
        ready = until(be.Ready)[-1].event
        assert ready.model == chat_folder.name and ready.device == server.base
        src.submit(RunRequest("Once upon", GenerationConfig(max_new_tokens=12), run_id=5))
        seen = until(be.Finished)
        assert {e.run for e in seen} == {5}
        assert isinstance(seen[0].event, be.Started) and seen[0].event.strategy == "remote"
        remote = [e.event for e in seen if isinstance(e.event, be.Token)]
        tokens, text = run_tokens(chat_folder, "Once upon", 12)
        local = [be.Token(i, t.text, 0, 0, 0.0) for i, t in zip(tokens, remote)]
        c, how = compare_remote(remote, text, local, text)
        assert how == "token ids" and c.identical and c.first_difference is None
        changed = local[:5] + [be.Token((tokens[5] + 1) % 256, "", 0, 0, 0.0)] + local[6:]
        assert compare_remote(remote, text, changed, text)[0].first_difference == 5
        no_ids = [be.Token(-1, t.text or "?", 0, 0, 0.0) for t in remote]
        c, how = compare_remote(no_ids, text, [be.Token(i, "?", 0, 0, 0.0) for i in tokens], "")
        assert how == "token texts" and c is not None
        src.submit(RaceRequest(9, (RunRequest("x", run_id=10),)))
        assert "one request at a time" in until(be.Failed)[-1].event.message
    finally:
        src.stop()


def test_a_race_with_the_server_as_a_contestant(server, chat_folder, monkeypatch):
    """engine/session.py races our own server beside the local model (the same folder, float64):
    identical by token ids; without the key the server's 401 is the lane's one line."""
    from engine.requests import Remote
    from engine.session import Session
    session = Session.load(str(chat_folder), "cpu", "float64")
    cfg = GenerationConfig(max_new_tokens=10)
    race = RaceRequest(1, (RunRequest("Once upon", cfg, run_id=2),
                           RunRequest("Once upon", cfg, run_id=3, remote=Remote(server.base))))
    monkeypatch.setenv("MINILLM_API_KEY", API_KEY)
    fin = list(session.race(race))[-1].event
    local, remote = fin.rows
    assert remote.same_tokens is True and remote.comparison == "token ids"
    assert remote.tokens == local.tokens and remote.text == local.text
    assert remote.server_metrics.new_tokens == len(local.tokens)
    monkeypatch.delenv("MINILLM_API_KEY")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    session.endpoints.clear()             # (the key was read when the endpoint was resolved)
    fin = list(session.race(race))[-1].event
    assert fin.rows[1].reason == "error" and "HTTP 401" in fin.rows[1].error
    assert "\n" not in fin.rows[1].error and fin.rows[0].error is None


def test_remote_source_cancel_frees_the_request_on_the_server(server):
    deliver, until = collect()
    src = RemoteSource(server.base, api_key=API_KEY)
    before = server.metrics()
    src.start(deliver)
    try:
        until(be.Ready)
        cfg = GenerationConfig(max_new_tokens=480, stop_at_eos=False)
        src.submit(RunRequest("The cat", cfg, run_id=1))
        until(be.Token)
        src.cancel()
        fin = until(be.Finished)[-1].event
        assert fin.reason == "cancelled" and 1 <= len(fin.tokens) < 480
        wait_for(lambda: value(server.metrics(), "vllm:request_success_total",
                               finished_reason="abort") >
                 value(before, "vllm:request_success_total", finished_reason="abort"),
                 "the server to abort the request")
        m = server.metrics()
        assert value(m, "vllm:num_requests_running") == 0
        assert value(m, "minillm:kv_blocks_used") == 0
        src.submit(RunRequest("The cat", GenerationConfig(max_new_tokens=3), run_id=2))
        assert until(be.Finished)[-1].event.reason in ("length", "eos", "stop")   # usable again
    finally:
        src.stop()


def test_remote_source_says_when_there_is_no_server():
    deliver, until = collect()
    src = RemoteSource("http://127.0.0.1:9/v1")
    src.start(deliver)
    failed = until(be.Failed)[-1].event
    assert failed.fatal and "cannot reach" in failed.message
    src.stop()


# ----------------------------------------------------------------------------- scripted streams
class Script(SSEServer):
    """A one-shot HTTP server replaying `chunks` as SSE (and a model list); with another
    `status`, an OpenAI-style error instead."""

    def __init__(self, chunks: list, status: int = 200):
        def respond(h):
            if status != 200:
                return h.send(status, {"error": {"message": "no such thing"}})
            h.start_stream()
            for c in chunks:
                h.event(c)
        super().__init__(respond)


def clock(*times):
    """The client's clock: the request goes out at 0, chunk i "arrives" at times[i]."""
    it = iter((0.0, *times))
    return lambda: next(it)


def chat_chunk(content=None, role=None, entries=None, finish=None, usage=None, timings=None):
    delta = {k: v for k, v in (("role", role), ("content", content)) if v is not None}
    choice = {"index": 0, "delta": delta, "finish_reason": finish,
              "logprobs": {"content": entries} if entries else None}
    out = {"choices": [choice]}
    if usage:
        out["usage"] = usage
    if timings:
        out["timings"] = timings
    return out


def run_script(chunks, *times, chat=True, cfg=GenerationConfig(max_new_tokens=16)):
    s = Script(chunks)
    try:
        events = list(stream_events(Endpoint(s.url, "m"), RunRequest("hi", cfg), chat=chat,
                                    clock=clock(*times)))
    finally:
        s.close()
    return [e for e in events if isinstance(e, be.Token)], events[-1], s.body


def test_ttft_is_the_first_chunk_with_a_token_not_the_role_chunk():
    tokens, fin, body = run_script(
        [chat_chunk("", role="assistant"), chat_chunk("Hel"), chat_chunk("lo"),
         chat_chunk(finish="stop", timings={"prompt_ms": 5.0, "predicted_n": 2}), "[DONE]"],
        1.0, 3.0, 4.0, 4.5)
    assert [t.text for t in tokens] == ["Hel", "lo"] and fin.text == "Hello"
    assert fin.metrics.ttft_s == 3.0                     # not 1.0: that chunk had no token
    assert [t.latency_s for t in tokens] == [3.0, 1.0]
    assert fin.reason == "stop" and fin.server_timings == {"prompt_ms": 5.0, "predicted_n": 2}
    assert fin.server_metrics is None                    # totals only: no per-token times
    assert body["stream"] and body["messages"] == [{"role": "user", "content": "hi"}]


def test_a_chunk_with_several_tokens_shares_its_gap():
    e = lambda i, s: {"id": i, "token": s, "logprob": -0.1}     # noqa: E731
    tokens, fin, _ = run_script(
        [chat_chunk("ab", entries=[e(1, "a"), e(2, "b")]),
         chat_chunk("cde", entries=[e(3, "c"), e(4, "d"), e(5, "e")]),
         chat_chunk(finish="length"), "[DONE]"],
        2.0, 5.0, 5.0)
    assert [t.id for t in tokens] == [1, 2, 3, 4, 5] and [t.text for t in tokens] == list("abcde")
    # TTFT holds the first chunk's whole wait; its second token arrived with it (0); the next
    # chunk's 3 s are shared by its three tokens.
    assert [t.latency_s for t in tokens] == [2.0, 0.0, 1.0, 1.0, 1.0]
    m = fin.metrics
    assert (m.new_tokens, m.ttft_s, m.tpot_s) == (5, 2.0, 0.75)   # (5 − 2) / 4: any split


def test_continuous_usage_counts_tokens_and_a_final_total_is_no_token():
    u = lambda n: {"prompt_tokens": 3, "completion_tokens": n}   # noqa: E731
    tokens, fin, _ = run_script(
        [chat_chunk("", role="assistant", usage=u(0)), chat_chunk("中", usage=u(3)),
         chat_chunk("x", usage=u(4)), chat_chunk(finish="stop", usage=u(4)),
         {"choices": [], "usage": u(4)}, "[DONE]"],
        1.0, 4.0, 5.0, 5.0, 5.0)
    assert len(tokens) == 4 and [t.text for t in tokens] == ["中", "", "", "x"]
    assert [t.latency_s for t in tokens] == [4.0, 0.0, 0.0, 1.0]
    assert fin.metrics.prompt_tokens == 3 and fin.server_timings["completion_tokens"] == 4

    # A server that sends usage only at the end (OpenAI, llama-server): one token per chunk.
    tokens, fin, _ = run_script([chat_chunk("a"), chat_chunk("b"),
                                 chat_chunk(finish="stop", usage=u(2)), "[DONE]"], 1.0, 2.0, 3.0)
    assert len(tokens) == 2 and fin.metrics.new_tokens == 2


def test_completions_token_ids_and_vllm_token_id_strings():
    def c(text, **lp):
        return {"choices": [{"index": 0, "text": text, "finish_reason": None,
                             "logprobs": lp or None}]}
    tokens, fin, body = run_script(
        [c("ab", tokens=["a", "b"], token_ids=[7, 8]), c("c", tokens=["token_id:9"]),
         {"choices": [{"index": 0, "text": "", "finish_reason": "length"}]}, "[DONE]"],
        1.0, 2.0, 2.0, chat=False)
    assert [t.id for t in tokens] == [7, 8, 9] and fin.text == "abc"
    assert [t.text for t in tokens] == ["a", "b", "c"]     # "token_id:9" is no text: chunk's
    assert body["prompt"] == "hi" and body["logprobs"] == 0


def test_errors_from_the_stream():
    with pytest.raises(RemoteError, match="boom"):           # before any token: raised
        run_script([{"error": {"message": "boom"}}], 1.0)
    tokens, fin, _ = run_script([chat_chunk("a"), {"error": {"message": "engine died"}}],
                                1.0, 2.0)
    assert fin.reason == "error" and fin.error == "engine died" and fin.tokens == (-1,)
    tokens, fin, _ = run_script([chat_chunk("a")], 1.0)      # the stream just stops
    assert fin.reason == "error" and "without a finish_reason" in fin.error
    s = Script([], status=404)
    try:
        with pytest.raises(RemoteError, match="HTTP 404: no such thing") as err:
            list(stream_events(Endpoint(s.url, "m"), RunRequest("hi")))
        assert err.value.user_error
    finally:
        s.close()


def test_endpoint_urls():
    assert Endpoint.base_url("127.0.0.1:8080") == "http://127.0.0.1:8080/v1"
    assert Endpoint.base_url("http://h:1/v1/") == "http://h:1/v1"
    assert Endpoint.base_url("https://h/api/v1") == "https://h/api/v1"
    for bad in ("ftp://h", "http://", "http://h:99999"):
        with pytest.raises(Exception, match="--endpoint"):
            Endpoint.base_url(bad)
    s = Script([])
    try:
        assert Endpoint.resolve(s.url).model == "m"
    finally:
        s.close()
