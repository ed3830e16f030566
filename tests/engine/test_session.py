"""engine/session.py: requests in, envelopes out — runs, races compared in the engine, errors as
events, cancellation."""

from __future__ import annotations

import dataclasses
import json

import pytest

from engine.config import ConfigError, FastPathConfig, GenerationConfig, SamplingConfig
from engine.events import (Finished, RaceFinished, RaceStarted, Ready, Started, Token, to_json)
from engine.requests import RaceRequest, RunRequest
from engine.session import Session


def cfg(**kw) -> GenerationConfig:
    return GenerationConfig(**{"max_new_tokens": 6, "stop_at_eos": False, **kw})


def test_ready_describes_the_model(session):
    ready = session.ready()
    assert isinstance(ready, Ready) and ready.model == "tiny-llama" and ready.n_layers == 2
    assert ready.backends["sdpa"] is None and "" in ready.fast and ready.fast[""] is None
    assert session.ready(probe=False).backends == {}


def test_run_yields_envelopes_of_its_run(session):
    envs = list(session.run(RunRequest("The cat", cfg(strategy="paged"), run_id=7)))
    assert {e.run for e in envs} == {7}
    assert [e.t for e in envs] == sorted(e.t for e in envs)
    assert isinstance(envs[0].event, Started) and envs[0].event.strategy == "paged"
    fin = envs[-1].event
    assert isinstance(fin, Finished) and len(fin.tokens) == 6
    for e in envs:                       # every event crosses a boundary as it is
        json.dumps(to_json(e.event), allow_nan=False)


def test_a_failing_run_is_an_event_or_raises_when_asked(session):
    bad = RunRequest("   ", cfg(), run_id=3)
    envs = list(session.run(bad))
    assert len(envs) == 1 and envs[0].run == 3
    assert envs[0].event.reason == "error" and "whitespace" in envs[0].event.error
    with pytest.raises(ConfigError, match="whitespace"):
        list(session.run(bad, raise_errors=True))


def test_fast_path_options_go_through_the_sessions_step_builder(session):
    envs = list(session.run(RunRequest("The cat", cfg(fast=FastPathConfig(fuse=True)))))
    assert envs[0].event.fast == "fuse" and envs[-1].event.reason == "length"


def test_race_compares_in_the_engine_and_sends_no_logits(session):
    base = cfg()
    runs = tuple(RunRequest("The cat", dataclasses.replace(base, strategy=s, backend=b), i)
                 for i, (s, b) in enumerate([("naive", "sdpa"), ("kv", "flash"),
                                              ("kv", "sdpa")], start=11))
    envs = list(session.race(RaceRequest(10, runs)))
    assert isinstance(envs[0].event, RaceStarted) and envs[0].run == 10
    assert [c.label for c in envs[0].event.contestants] == ["naive/sdpa", "kv/flash", "kv/sdpa"]
    assert all(e.event.logits is None for e in envs if isinstance(e.event, Token))
    race = envs[-1].event
    assert isinstance(race, RaceFinished) and envs[-1].run == 10 and not race.cancelled
    assert [r.run for r in race.rows] == [11, 12, 13]
    assert race.rows[0].same_tokens is None                    # the reference
    assert race.identical is True and 0 <= race.max_delta < 1e-4
    assert [r.first_difference for r in race.rows] == [None, None, None]


def test_sampled_race_shares_a_seed(session):
    sampled = cfg(sampling=SamplingConfig(temperature=0.9))
    runs = tuple(RunRequest("The cat", dataclasses.replace(sampled, strategy=s), i)
                 for i, s in enumerate(["naive", "paged"], start=1))
    race = list(session.race(RaceRequest(9, runs)))[-1].event
    assert race.identical is True                              # same draws: same tokens


def test_cancel_stops_a_race_and_says_so(session):
    runs = tuple(RunRequest("The cat", cfg(max_new_tokens=40), i) for i in (1, 2))
    envs = []
    for env in session.race(RaceRequest(5, runs)):
        envs.append(env)
        if isinstance(env.event, Token) and env.event.index == 2:
            session.cancel()
    session.clear_cancel()
    race = envs[-1].event
    assert race.cancelled and len(race.rows) == 1 and race.rows[0].reason == "cancelled"
    assert not any(isinstance(e.event, Started) and e.run == 2 for e in envs)


def test_requests_round_trip_through_json_and_are_checked():
    run = RunRequest("hi", cfg(strategy="paged", fast=FastPathConfig(kernel="c")), 4)
    assert RunRequest.from_json(json.loads(json.dumps(run.to_json()))) == run
    race = RaceRequest(1, (run, dataclasses.replace(run, run_id=5)))
    assert RaceRequest.from_json(json.loads(json.dumps(race.to_json()))) == race
    with pytest.raises(ConfigError, match="same prompt"):
        RaceRequest(1, (run, RunRequest("other", run.config, 5)))
    with pytest.raises(ConfigError, match="own run id"):
        RaceRequest(1, (run, run))
    with pytest.raises(ConfigError, match="unknown generation setting"):
        RunRequest.from_json({"prompt": "x", "config": {"warp": 9}})


def test_each_race_contestant_warms_up_untimed_first(session):
    """The first run of a kind pays one-off costs (threads, kernels, converted weights): each
    contestant runs WARMUP_TOKENS tokens first, whose events are not sent, then its timed run."""
    from engine.session import WARMUP_TOKENS
    calls = []

    def counting(model, tokenizer, prompt, config, **kw):
        calls.append(config.max_new_tokens)
        return session.generate(model, tokenizer, prompt, config, **kw)

    racing = Session(session.lm, generate=counting)
    runs = tuple(RunRequest("The cat", cfg(strategy=s), i) for i, s in ((1, "naive"), (2, "kv")))
    envs = list(racing.race(RaceRequest(9, runs)))
    assert calls == [WARMUP_TOKENS, 6, WARMUP_TOKENS, 6]
    assert envs[0].event.warmup_tokens == WARMUP_TOKENS
    assert sum(isinstance(e.event, Started) for e in envs) == 2        # the warm-ups say nothing
    assert [len(r.tokens) for r in envs[-1].event.rows] == [6, 6]
    assert list(racing.race(RaceRequest(9, runs), warmup=0))[0].event.warmup_tokens == 0


def test_a_contestant_stopped_part_way_is_compared_on_its_tokens(session):
    runs = tuple(RunRequest("The cat", cfg(max_new_tokens=30), i) for i in (1, 2, 3))
    envs = []
    for env in session.race(RaceRequest(5, runs), warmup=0):
        envs.append(env)
        if isinstance(env.event, Token) and env.run == 2 and env.event.index == 4:
            session.cancel()
    session.clear_cancel()
    race = envs[-1].event
    assert race.cancelled and [r.reason for r in race.rows] == ["length", "cancelled"]
    stopped = race.rows[1]
    assert len(stopped.tokens) == 5 and stopped.same_tokens is True      # its 5 tokens agree
    assert stopped.first_difference is None and race.identical is True


def test_lossy_fast_paths_are_the_weights_in_fewer_bits():
    lossy = {spec: FastPathConfig.from_spec(spec).lossy
             for spec in ("", "c", "fuse+cols", "c+int8", "int8", "fp16", "bf16")}
    assert lossy == {"": False, "c": False, "fuse+cols": False, "c+int8": True, "int8": True,
                     "fp16": True, "bf16": True}
