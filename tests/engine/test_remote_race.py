"""A race with a remote contestant (engine/session.py + engine/remote.py): the server's run
streams inside the session, beside the local ones, and the session compares it with the local
reference — by token ids, token texts or re-tokenised text, by what the server sent.

The "server" here is a small scripted HTTP server that streams whatever tokens the test tells it
(the local model's own, or changed ones); tests/serve/test_remote_race.py races our real `serve`.
"""

from __future__ import annotations

import json
import threading
import time

import pytest

from engine.config import GenerationConfig, SamplingConfig
from engine.events import Finished, RaceFinished, Started, Token, from_json, to_json
from engine.remote import compare_remote
from engine.requests import RaceRequest, Remote, RunRequest
from tests.conftest import byte_tokenizer

PROMPT = "The cat"


def cfg(**kw) -> GenerationConfig:
    return GenerationConfig(**{"max_new_tokens": 8, "stop_at_eos": False, **kw})


@pytest.fixture(scope="module")
def local(session):
    """The local greedy run's tokens: what a server with this model would stream."""
    events = [e.event for e in session.run(RunRequest(PROMPT, cfg()))]
    return [e for e in events if isinstance(e, Token)]


def race(session, url, config=None, locals_=("kv", "naive"), model=None):
    """A race of local strategies and the server at `url`, last: (RaceStarted, the remote
    run's events, RaceFinished)."""
    c = config or cfg()
    runs = [RunRequest(PROMPT, GenerationConfig(**{**vars_of(c), "strategy": s}), run_id=i + 1)
            for i, s in enumerate(locals_)]
    runs.append(RunRequest(PROMPT, c, run_id=len(runs) + 1, remote=Remote(url, model)))
    session.clear_cancel()
    envs = list(session.race(RaceRequest(100, tuple(runs))))
    remote_id = runs[-1].run_id
    return (envs[0].event, [e.event for e in envs if e.run == remote_id],
            envs[-1].event)


def vars_of(c: GenerationConfig) -> dict:
    import dataclasses
    return {f.name: getattr(c, f.name) for f in dataclasses.fields(c)}


# ----------------------------------------------------------------------------- compared by ids
def test_a_server_with_the_same_tokens_is_identical_by_ids(session, local, scripted):
    server = scripted([(t.id, t.text) for t in local])
    started, events, fin = race(session, server.url)
    assert [c.label for c in started.contestants][-1] == f"remote/{server.url[7:-3]}"
    assert isinstance(events[0], Started) and events[0].strategy == "remote"
    row = fin.rows[-1]
    assert row.label == started.contestants[-1].label and row.error is None
    assert row.same_tokens is True and row.first_difference is None
    assert row.comparison == "token ids" and list(row.tokens) == [t.id for t in local]
    assert row.server_timings["predicted_n"] == len(local)
    assert row.max_logit_delta is None           # a server sends no logits
    assert fin.rows[0].same_tokens is None       # the first local run is the reference
    # the server was asked for the local run's settings, and for logprobs (the token ids)
    body = server.bodies[-1]
    assert body["prompt"] == PROMPT and body["max_tokens"] == 8 and body["temperature"] == 0
    assert body["logprobs"] == 0 and body["ignore_eos"] is True
    assert len(server.bodies) == 2               # a warm-up, untimed, then the timed run
    assert from_json(to_json(fin)) == fin        # the rows travel to the app as JSON


def test_a_different_token_is_the_first_difference(session, local, scripted):
    tokens = [(t.id, t.text) for t in local]
    i = 3
    tokens[i] = ((tokens[i][0] + 1) % 256, "?")
    _, _, fin = race(session, scripted(tokens).url)
    row = fin.rows[-1]
    assert row.same_tokens is False and row.first_difference == i and row.comparison == "token ids"
    assert all(r.same_tokens for r in fin.rows[1:-1])    # the local ones still agree


def test_another_vocabulary_is_not_compared(session, local, scripted):
    """The same ids spelling other texts: the server runs a model with another tokenizer, and
    its ids say nothing about ours."""
    tokens = [(t.id, f"<w{t.id}>") for t in local]
    _, _, fin = race(session, scripted(tokens).url)
    row = fin.rows[-1]
    assert row.same_tokens is None and row.error is None
    assert row.comparison.startswith("not compared: the server's vocabulary is not this model's")


def test_without_ids_tokens_are_compared_by_text(session, local, scripted):
    tokens = [(None, t.text) for t in local]
    _, _, fin = race(session, scripted(tokens, ids=False).url)
    row = fin.rows[-1]
    assert row.same_tokens is True and row.comparison == "token texts"
    # no logprobs at all: a chunk with text is one token (engine/remote.py), its text the
    # chunk's
    _, _, fin = race(session, scripted(tokens[:-2] + [(None, "X"), (None, "Y")],
                                       ids=False, logprobs=False).url)
    row = fin.rows[-1]
    assert row.comparison == "token texts" and row.same_tokens is False
    assert row.first_difference == len(tokens) - 2


def test_a_sampled_race_does_not_compare_the_server(session, local, scripted):
    c = cfg(sampling=SamplingConfig(temperature=0.8, seed=1))
    _, _, fin = race(session, scripted([(t.id, t.text) for t in local]).url, config=c)
    assert fin.rows[-1].same_tokens is None
    assert "sampled" in fin.rows[-1].comparison and fin.rows[-1].error is None


def test_an_unreachable_server_is_a_one_line_error_and_the_race_goes_on(session):
    started, events, fin = race(session, "http://127.0.0.1:9/v1", locals_=("kv", "paged"))
    assert [type(e) for e in events] == [Started, Finished]
    row = fin.rows[-1]
    assert row.reason == "error" and "cannot reach" in row.error and "\n" not in row.error
    assert not fin.cancelled and fin.rows[1].same_tokens is True     # paged vs kv compared
    assert row.label == started.contestants[-1].label == "remote/127.0.0.1:9"


def test_the_server_is_never_the_reference(session, local, scripted):
    """Every local contestant failed: nothing to compare the server with (it does not become
    the reference)."""
    runs = (RunRequest(PROMPT, cfg(backend="nope"), run_id=1),
            RunRequest(PROMPT, cfg(), run_id=2,
                       remote=Remote(scripted([(t.id, t.text) for t in local]).url)))
    session.clear_cancel()
    fin = list(session.race(RaceRequest(7, runs)))[-1].event
    assert fin.rows[0].error and fin.rows[1].error is None
    assert fin.rows[1].same_tokens is None and "no local contestant" in fin.rows[1].comparison


def test_stop_lands_while_the_server_holds_the_stream(session, local, scripted):
    """The server sends one token and then nothing: a stop must not wait for it."""
    stall = threading.Event()
    server = scripted([(t.id, t.text) for t in local], stall=stall)
    runs = (RunRequest(PROMPT, cfg(), run_id=1),
            RunRequest(PROMPT, cfg(), run_id=2, remote=Remote(server.url)))
    session.clear_cancel()
    got: list = []
    seen_token = threading.Event()

    def consume():
        for env in session.race(RaceRequest(8, runs), warmup=0):
            got.append(env)
            if env.run == 2 and isinstance(env.event, Token):
                seen_token.set()
    worker = threading.Thread(target=consume)
    worker.start()
    try:
        assert seen_token.wait(60)
        t0 = time.monotonic()
        session.cancel()
        worker.join(10)
        assert not worker.is_alive() and time.monotonic() - t0 < 5
    finally:
        stall.set()
        session.clear_cancel()
    fin = got[-1].event
    assert isinstance(fin, RaceFinished) and fin.cancelled
    assert fin.rows[-1].reason == "cancelled" and len(fin.rows[-1].tokens) == 1
    assert fin.rows[-1].same_tokens is True        # compared on the token it made


# ----------------------------------------------------------------------------- the rules
def tok(i: int, text: str) -> Token:
    return Token(id=i, text=text, position=0, index=0, latency_s=0.0)


def test_compare_remote_chooses_ids_then_texts_then_text():
    tokenizer = byte_tokenizer()
    h, i = tokenizer.encode("Hi")
    ref = [tok(h, "H"), tok(i, "i")]
    assert compare_remote(ref, "Hi", ref, "Hi")[1] == "token ids"
    c, how = compare_remote([tok(-1, "H"), tok(-1, "o")], "Ho", ref, "Hi")
    assert how == "token texts" and c.first_difference == 1
    c, how = compare_remote([tok(-1, "")], "Hi", ref, "Hi", encode=tokenizer.encode)
    assert how == "text" and c.identical
    assert compare_remote([], "", ref, "Hi") == (None, "not compared: the server sent no tokens")
    # ids checked against the local pieces: most agree → compared by ids
    piece = tokenizer.token_text
    assert compare_remote(ref, "Hi", ref, "Hi", piece=piece)[1] == "token ids"
    c, how = compare_remote([tok(h, "Hello"), tok(i, " there")], "Hello there", ref, "Hi",
                            piece=piece)
    assert c is None and f"its token {h} is 'Hello', here 'H'" in how


def test_remote_requests_round_trip_and_are_checked():
    r = RunRequest(PROMPT, cfg(), run_id=3, remote=Remote("http://h:8000/v1", "m"))
    assert RunRequest.from_json(json.loads(json.dumps(r.to_json()))) == r
    assert r.label == "remote/h:8000"
    assert RunRequest.from_json(RunRequest(PROMPT).to_json()).remote is None
    from engine.config import ConfigError
    with pytest.raises(ConfigError, match="cannot pause"):
        RunRequest(PROMPT, remote=Remote("h:1"), step=True)
    with pytest.raises(ConfigError, match="URL"):
        Remote("  ")
    with pytest.raises(ConfigError, match="'remote'"):
        RunRequest.from_json({"prompt": "x", "remote": "h:1"})
