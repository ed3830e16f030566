"""The session's batch operation: the batching engine behind the session protocol.

A BatchRequest comes out as envelopes of the batch events (BatchStarted … BatchSummary), each
request's tokens the ones it gets alone (the same reference as tests/engine/test_batch.py, in
float64 for exact greedy ties), stopped by the session's cancel, and recorded and read back
like any run.
"""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import pytest

from engine import events as be
from engine.config import ConfigError, GenerationConfig, SamplingConfig
from engine.player import Player, token_stops
from engine.recording import Recorder, header, read_recording
from engine.requests import BatchRequest
from engine.session import Session
from engine.workload import BUILTIN_PROMPTS, SYSTEM_PROMPT, request_config
from tests.engine.test_batch import TOK, alone, model64


# Tiny models gain nothing from threads; on a shared 2-core machine they only wait.
pytestmark = pytest.mark.usefixtures("one_thread")


def session() -> Session:
    return Session(SimpleNamespace(model=model64(), tokenizer=TOK, name="tiny64", config=None))


def gen(max_new: int, **sampling) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=max_new, attention_rows=False,
                            sampling=SamplingConfig(**sampling))


PROMPTS = ("shared start, then one", "shared start, then two", "another prompt entirely",
           "shared start, then three and more")


def by_type(envelopes, cls) -> list:
    return [e.event for e in envelopes if isinstance(e.event, cls)]


def test_a_batch_is_envelopes_of_its_events_and_each_request_gets_its_alone_tokens():
    request = BatchRequest(PROMPTS, gen(8), batch_id=7, max_batch=3, num_blocks=40)
    envelopes = list(session().batch(request))
    assert {e.run for e in envelopes} == {7}
    assert isinstance(envelopes[0].event, be.BatchStarted)
    assert isinstance(envelopes[-1].event, be.BatchSummary)
    assert [e.t for e in envelopes] == sorted(e.t for e in envelopes)
    arrived = by_type(envelopes, be.RequestArrived)
    assert [a.prompt for a in arrived] == list(PROMPTS)
    done = {f.request: f for f in by_type(envelopes, be.RequestFinished)}
    for a in arrived:
        tokens, reason, _ = alone(model64(), TOK.encode(a.prompt), gen(8))
        assert done[a.request].tokens == tokens and done[a.request].reason == reason
    summary = envelopes[-1].event
    assert summary.requests == summary.finished == len(PROMPTS) and not summary.interrupted
    assert summary.peak_running == 3                       # max_batch held, and reached


def test_seeded_requests_sample_with_seed_plus_i_as_alone():
    cfg = gen(6, temperature=0.9, seed=11)
    envelopes = list(session().batch(BatchRequest(PROMPTS[:3], cfg, num_blocks=40)))
    done = {f.request: f.tokens for f in by_type(envelopes, be.RequestFinished)}
    for i, prompt in enumerate(PROMPTS[:3]):
        assert done[i] == alone(model64(), TOK.encode(prompt), request_config(cfg, i))[0]
    assert len(set(done.values())) == 3


def test_pool_snapshots_carry_the_live_figures_and_the_contiguous_fit():
    """Four requests of 12 tokens each (prompt + max new) in 10 blocks of 4 = 40 slots: one
    contiguous reservation each fits 3 of them; the paged pool runs all 4 (they share a
    prefix and most stop short of their reservation)."""
    prompts = ("abcdefg", "abcdefh", "abcdefi", "abcdefj")      # 7 bytes + 5 new = 12 each
    cfg = dataclasses.replace(gen(5), block_size=4)
    envelopes = list(session().batch(BatchRequest(prompts, cfg, num_blocks=10, max_batch=4)))
    snaps = by_type(envelopes, be.PoolSnapshot)
    assert snaps[-1].requests == 4 and snaps[-1].contiguous_fit == 3
    assert [s.new_tokens for s in snaps] == sorted(s.new_tokens for s in snaps)
    assert snaps[-1].new_tokens == sum(len(f.tokens)
                                       for f in by_type(envelopes, be.RequestFinished))
    assert all(s.tokens_per_s is None or s.tokens_per_s > 0 for s in snaps)
    assert snaps[-1].tokens_per_s > 0
    summary = envelopes[-1].event
    assert summary.contiguous_fit == 3 and summary.peak_running == 4


def test_cancel_stops_the_batch_at_the_next_step_and_reports_what_finished():
    s = session()
    out = []
    for env in s.batch(BatchRequest(PROMPTS, gen(30), max_batch=2, num_blocks=60)):
        out.append(env)
        if isinstance(env.event, be.RequestFinished) and not s.flag.is_set():
            s.cancel()                       # as the app's `x` does, from the first finish on
    summary = out[-1].event
    assert isinstance(summary, be.BatchSummary) and summary.interrupted
    reasons = [f.reason for f in by_type(out, be.RequestFinished)]
    assert reasons.count("cancelled") == summary.cancelled >= 1
    assert summary.finished == len(reasons) - reasons.count("cancelled") >= 1
    cut = next(i for i, e in enumerate(out) if isinstance(e.event, be.RequestFinished))
    assert not any(isinstance(e.event, be.StepDone) for e in out[cut + 1:])   # no step after


def test_a_batch_that_cannot_start_is_one_failed_event():
    bad = BatchRequest(PROMPTS, gen(4), batch_id=3, max_batch=8, max_step_tokens=4)
    (env,) = list(session().batch(bad))
    assert env.run == 3 and isinstance(env.event, be.Failed) and not env.event.fatal
    assert "the batch did not start" in env.event.message and "batch size" in env.event.message


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompts=()), "at least one prompt"),
    (dict(prompts=("a", 3)), "list of strings"),
    (dict(prompts=("a",), num_blocks=0), "'num_blocks' must be a positive integer"),
    (dict(prompts=("a",), arrival_rate=float("nan")), "arrival rate"),
    (dict(prompts=("a",), arrival_rate=-1.0), "arrival rate"),
    (dict(prompts=("a",), max_batch=True), "'max_batch' must be an integer"),
])
def test_batch_requests_refuse_nonsense_in_one_line(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        BatchRequest(**kwargs)


def test_batch_requests_travel_as_json():
    r = BatchRequest(("a", "b"), gen(3, temperature=0.5, seed=2), batch_id=4, max_batch=2,
                     num_blocks=9, reserve_for=1, prefix_caching=False, arrival_rate=3.5,
                     arrival_seed=8)
    assert BatchRequest.from_json(json.loads(json.dumps(r.to_json()))) == r
    with pytest.raises(ConfigError):
        BatchRequest.from_json({"prompts": "not a list"})


def test_the_built_in_prompts_share_a_system_prompt_and_differ_after_it():
    assert len(BUILTIN_PROMPTS) == 16 and len(set(BUILTIN_PROMPTS)) == 16
    assert all(p.startswith(SYSTEM_PROMPT) for p in BUILTIN_PROMPTS)


def test_a_recorded_batch_reads_back_equal_and_replays_a_step_at_a_time(tmp_path):
    s = session()
    path = tmp_path / "batch.jsonl.gz"
    rec = Recorder(str(path), header({"batch": True}, None, "test"))
    live = list(s.batch(BatchRequest(PROMPTS[:3], gen(4), batch_id=2, num_blocks=40)))
    rec.write(live)
    rec.close()
    back = read_recording(str(path))
    assert back.notice is None
    assert [(e.run, e.event) for e in back.envelopes] == [(e.run, e.event) for e in live]
    stops = token_stops(back.envelopes)
    snaps = [i for i, e in enumerate(back.envelopes) if isinstance(e.event, be.PoolSnapshot)]
    assert stops == [i + 1 for i in snaps] and len(stops) == live[-1].event.steps
    got = []
    player = Player(back, playing=False)
    player.start(lambda envs, restart: got.append((list(envs), restart)))
    player.step(1)
    player.step(1)
    player.step(-1)                                # back: the state up to step 1, afresh
    player.stop()
    assert got[-1][1] and got[-1][0] == back.envelopes[:stops[0]]
