"""Continuous batching keeps each request's answer: its tokens are the ones
engine.decoding.generate gives it alone, whatever else is in the batch and whatever was preempted.

Why float64 for the exact checks: a batched matrix product may add in another order than a
single-row one (a different BLAS kernel for a different shape), so float32 logits of the same
request can differ by ~1e-6 between a batch and a lone run — enough to flip a greedy choice at a
near-tie. In float64 the same reordering costs ~1e-15, which no random model's top-2 gap comes
near: any difference in tokens is a real bug. float32 gets a tolerance on the logits instead
(while the tokens agree), and the embedded model (a `slow` test) must give exactly the same
tokens in float32.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from engine import events as be
from engine.batch import BatchEngine, serve
from engine.config import GenerationConfig, SamplingConfig
from engine.decoding import run_to_end
from engine.scheduler import SchedulerConfig
from tests.conftest import FAMILIES, byte_tokenizer, tiny_model

EOS = 7
TOK = byte_tokenizer(eos_token_ids=(EOS,))


# Tiny models gain nothing from threads; on a shared 2-core machine they only wait.
pytestmark = pytest.mark.usefixtures("one_thread")


_MODELS: dict = {}


def model64(family: str = "llama"):
    if (family, torch.float64) not in _MODELS:
        _MODELS[family, torch.float64] = tiny_model(family, dtype=torch.float64)
    return _MODELS[family, torch.float64]


_ALONE: dict = {}


def alone(model, prompt: list[int], cfg: GenerationConfig):
    """The reference: one request through engine.decoding.generate (kv cache, sdpa).
    Returns (tokens, finish reason, each step's logits)."""
    cfg = dataclasses.replace(cfg, keep_logits=True)
    key = (id(model), tuple(prompt), repr(cfg))
    if key not in _ALONE:
        events, fin = run_to_end(model, TOK, prompt, cfg)
        _ALONE[key] = (fin.tokens, fin.reason,
                       [e.logits for e in events if type(e).__name__ == "Token"])
    return _ALONE[key]


def gen(max_new: int, temperature: float = 0.0, seed: int | None = None, **kw):
    return GenerationConfig(max_new_tokens=max_new, attention_rows=False, keep_logits=True,
                            sampling=SamplingConfig(temperature=temperature, seed=seed, **kw))


def drive(engine: BatchEngine, arrivals: dict[int, list], check=True) -> list:
    """Step the engine, adding requests before the step given as their key; check the block
    manager's invariants after every step. Returns every event."""
    events, step = [], 0
    while arrivals or engine.has_work():
        for prompt, cfg in arrivals.pop(step, []):
            engine.add(prompt, cfg)
        events += engine.step()
        if check:
            engine.blocks.check()
        step += 1
    return events


def finished(events) -> dict[int, be.RequestFinished]:
    return {e.request: e for e in events if isinstance(e, be.RequestFinished)}


def assert_as_alone(model, events, requests, logits_tol=1e-5):
    """Every request: the lone run's tokens and finish reason, and — since a K/V mix-up between
    sequences need not flip a token of a random model — its logits at every step, within
    float32 rounding (the model returns float32 logits even when it computes in float64)."""
    done = finished(events)
    mine: dict[int, list] = {}
    for e in events:
        if isinstance(e, be.RequestToken):
            mine.setdefault(e.request, []).append(e.logits)
    for rid, (prompt, cfg) in enumerate(requests):
        tokens, reason, ref_logits = alone(model, prompt, cfg)
        assert (done[rid].tokens, done[rid].reason) == (tokens, reason), rid
        for step, (a, b) in enumerate(zip(mine.get(rid, []), ref_logits)):
            diff = (a - b).abs().max().item()
            assert diff <= logits_tol * max(1.0, b.abs().max().item()), (rid, step, diff)


# --------------------------------------------------------------------------- exact, float64
SYSTEM = list(b"You are a helpful assistant. Answer briefly. ")


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_greedy_and_sampled_tokens_equal_alone(family):
    model = model64(family)
    requests = [
        (SYSTEM + list(b"What is 2+2?"), gen(12)),
        (SYSTEM + list(b"Name a colour."), gen(9, temperature=0.9, seed=3)),
        (list(b"abc"), gen(15, temperature=1.3, seed=11, top_k=20, top_p=0.9)),
        (SYSTEM + list(b"What is 2+2?"), gen(12, temperature=0.7, seed=5, min_p=0.05,
                                            repetition_penalty=1.3)),
        (list(b"x"), gen(1)),
    ]
    engine = BatchEngine(model, TOK, SchedulerConfig(max_batch=4, max_step_tokens=24,
                                                     block_size=4, num_blocks=64))
    events = drive(engine, {0: requests[:3], 2: requests[3:]})
    assert_as_alone(model, events, requests)
    done = finished(events)
    assert done[1].cached_tokens >= 40 and done[3].cached_tokens >= 40     # the system prompt
    assert engine.blocks.num_used == 0


@pytest.mark.parametrize("backend", ["naive", "flash"])
def test_other_backends_attend_one_sequence_at_a_time(backend):
    """Backends without a mask (naive, flash) get one call per sequence; same answers."""
    from engine.attention import get_backend
    model = model64()
    requests = [(SYSTEM + list(b"one"), gen(6)), (list(b"two"), gen(5, temperature=0.9, seed=1))]
    engine = BatchEngine(model, TOK, SchedulerConfig(max_batch=2, max_step_tokens=16,
                                                     block_size=4, num_blocks=40),
                         backend=get_backend(backend, "cpu", tile=8))
    assert_as_alone(model, drive(engine, {0: requests[:1], 1: requests[1:]}), requests)


def test_preempted_requests_resume_with_the_same_tokens():
    """A pool too small for everyone: the newest is preempted, recomputed, and continues."""
    model = model64()
    requests = [(list(range(10 + i, 30 + i)), gen(24, temperature=0.8, seed=i)) for i in range(4)]
    engine = BatchEngine(model, TOK, SchedulerConfig(max_batch=4, max_step_tokens=64,
                                                     block_size=4, num_blocks=22))
    events = drive(engine, {0: requests})
    done = finished(events)
    assert sum(d.preemptions for d in done.values()) > 0
    assert any(isinstance(e, be.RequestResumed) for e in events)
    assert_as_alone(model, events, requests)


def test_stop_strings_and_eos_end_requests_as_alone():
    model = model64()
    cfg_stop = dataclasses.replace(gen(30, temperature=1.5, seed=1), stop=("gg",))
    cfg_eos = gen(60, temperature=2.0, seed=15)          # samples the EOS id after 52 tokens
    requests = [(list(b"hello"), cfg_stop), (list(b"eos?"), cfg_eos), (list(b"q"), gen(20))]
    engine = BatchEngine(model, TOK, SchedulerConfig(max_batch=3, max_step_tokens=16,
                                                     block_size=2, num_blocks=80))
    events = drive(engine, {0: requests})
    assert_as_alone(model, events, requests)
    assert {e.reason for e in finished(events).values()} == {"stop", "eos", "length"}


PREFIXES = [[], list(b"shared prefix one, "), list(b"another shared start ")]


@st.composite
def workloads(draw):
    block_size = draw(st.sampled_from([1, 2, 3, 4, 8, 16]))
    n = draw(st.integers(1, 6))
    requests = []
    for _ in range(n):
        prefix = draw(st.sampled_from(PREFIXES))
        suffix = draw(st.lists(st.integers(0, 255), min_size=0 if prefix else 1, max_size=12))
        max_new = draw(st.integers(1, 10))
        if draw(st.booleans()):
            cfg = gen(max_new)
        else:
            cfg = gen(max_new, temperature=draw(st.sampled_from([0.7, 1.0, 1.5])),
                      seed=draw(st.integers(0, 1000)))
        arrival = draw(st.integers(0, 8))
        requests.append((arrival, prefix + suffix, cfg))
    need = max(-(-(len(p) + c.max_new_tokens) // block_size) for _, p, c in requests)
    # Half the time a pool barely larger than the largest request: preemption is the rule.
    num_blocks = need + draw(st.one_of(st.integers(0, 2), st.integers(0, 3 * need)))
    max_batch = draw(st.integers(1, 5))
    max_step = draw(st.integers(max_batch, 48))
    family = draw(st.sampled_from(FAMILIES))
    caching = draw(st.booleans())
    return family, requests, SchedulerConfig(max_batch=max_batch, max_step_tokens=max_step,
                                             block_size=block_size, num_blocks=num_blocks,
                                             prefix_caching=caching)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads())
def test_property_each_request_gets_its_alone_tokens(workload):
    """Random arrival steps, prompt and output lengths (with shared prefixes), block sizes,
    pool sizes down to one request's worth, batch limits and token budgets."""
    family, requests, cfg = workload
    model = model64(family)
    engine = BatchEngine(model, TOK, cfg, snapshots=False)
    arrivals: dict[int, list] = {}
    for at, prompt, gcfg in requests:
        arrivals.setdefault(at, []).append((prompt, gcfg))
    order = [(p, c) for at in sorted(arrivals) for p, c in arrivals[at]]
    events = drive(engine, arrivals)
    assert len(finished(events)) == len(requests)
    assert_as_alone(model, events, order)
    assert engine.blocks.num_used == 0 and not engine.blocks.tables


# --------------------------------------------------------------------------- float32, tolerance
def test_float32_logits_within_tolerance_of_alone():
    """float32: each step's logits within 1e-4 of the lone run's while the tokens agree; a
    token may only differ where the lone run's top two logits were within that tolerance."""
    model = tiny_model("qwen2", dtype=torch.float32)
    requests = [(SYSTEM + list(s), GenerationConfig(max_new_tokens=16, attention_rows=False,
                                                    keep_logits=True, stop_at_eos=False))
                for s in (b"one", b"two two", b"three three three", b"four")]
    engine = BatchEngine(model, TOK, SchedulerConfig(max_batch=4, max_step_tokens=40,
                                                     block_size=4, num_blocks=80))
    events = drive(engine, {0: requests[:2], 3: requests[2:]})
    logits = {}
    for e in events:
        if isinstance(e, be.RequestToken):
            logits.setdefault(e.request, []).append(e.logits)
    for rid, (prompt, cfg) in enumerate(requests):
        ref_events, ref = run_to_end(model, TOK, prompt, cfg)
        ref_logits = [e.logits for e in ref_events if type(e).__name__ == "Token"]
        mine = finished(events)[rid].tokens
        for i, (a, b) in enumerate(zip(logits[rid], ref_logits)):
            assert (a - b).abs().max() < 1e-4, (rid, i)
            if mine[i] != ref.tokens[i]:
                top2 = b.topk(2).values
                assert top2[0] - top2[1] < 2e-4, "a token differs without a near-tie"
                break


_MODELS32: dict = {}


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads())
def test_property_float32_logits_within_tolerance(workload):
    """The same random workloads in float32: every step's logits within 1e-4 of the lone
    run's until the first token that differs, and a token may differ only at a near-tie."""
    family, requests, cfg = workload
    if family not in _MODELS32:
        _MODELS32[family] = tiny_model(family, dtype=torch.float32)
    model = _MODELS32[family]
    engine = BatchEngine(model, TOK, cfg, snapshots=False)
    arrivals: dict[int, list] = {}
    for at, prompt, gcfg in requests:
        arrivals.setdefault(at, []).append((prompt, gcfg))
    order = [(p, c) for at in sorted(arrivals) for p, c in arrivals[at]]
    events = drive(engine, arrivals)
    mine: dict[int, list] = {}
    for e in events:
        if isinstance(e, be.RequestToken):
            mine.setdefault(e.request, []).append((e.id, e.logits))
    for rid, (prompt, gcfg) in enumerate(order):
        ref_tokens, _, ref_logits = alone(model, prompt, gcfg)
        for (token, logits), ref_token, ref in zip(mine.get(rid, []), ref_tokens, ref_logits):
            assert (logits - ref).abs().max() < 1e-4, rid
            if token != ref_token:
                top2 = ref.topk(2).values
                assert top2[0] - top2[1] < 2e-4 or not gcfg.sampling.greedy, \
                    "a greedy token differs without a near-tie"
                break


# --------------------------------------------------------------------------- triton, interpreted
def test_triton_batched_kernel_matches_the_pytorch_path():
    """The Triton paged kernel, one launch for every row of a packed batch (decode rows and a
    prompt chunk), against the PyTorch path on the same schedule (interpreted on a CPU)."""
    pytest.importorskip("triton")
    from engine.attention import get_backend
    device = "cuda" if torch.cuda.is_available() else "cpu"     # compiled on a GPU (gpu_check)
    model = tiny_model("llama", dtype=torch.float32).to(device)
    requests = [(list(b"abcdefghij"), gen(3)), (list(b"abcdefgh12"), gen(3)),
                (list(b"zz"), gen(3))]
    runs = {}
    for name in ("sdpa", "triton"):
        backend = get_backend(name, device, tile=32, split_blocks=1)
        engine = BatchEngine(model, TOK, SchedulerConfig(max_batch=3, max_step_tokens=12,
                                                         block_size=4, num_blocks=16),
                             backend=backend)
        cfgs = [(p, GenerationConfig(max_new_tokens=3, attention_rows=False, keep_logits=True))
                for p, _ in requests]
        runs[name] = [e for e in drive(engine, {0: cfgs[:2], 1: cfgs[2:]})
                      if isinstance(e, be.RequestToken)]
    assert [e.id for e in runs["sdpa"]] == [e.id for e in runs["triton"]]
    for a, b in zip(runs["sdpa"], runs["triton"]):
        assert (a.logits - b.logits).abs().max() < 1e-4


# --------------------------------------------------------------------------- events, pool views
def test_events_tell_the_story_and_round_trip_through_json():
    model = model64()
    requests = [(SYSTEM + list(b"a"), gen(6)), (SYSTEM + list(b"b"), gen(6)),
                (list(range(40, 70)), gen(8))]
    engine = BatchEngine(model, TOK, SchedulerConfig(max_batch=3, max_step_tokens=20,
                                                     block_size=4, num_blocks=26))
    events = list(serve(engine, [(0.0, p, c) for p, c in requests]))
    kinds = {type(e).__name__ for e in events}
    assert {"RequestArrived", "RequestAdmitted", "PrefillChunk", "RequestToken",
            "RequestFinished", "StepDone", "PoolSnapshot", "BatchSummary"} <= kinds
    for e in events:                                # the engine's one JSON form
        assert be.from_json(json.loads(json.dumps(be.to_json(e), allow_nan=False))) == e
    # Per request: arrived, admitted, its prompt in chunks, then tokens, then finished.
    for rid in range(3):
        mine = [e for e in events if getattr(e, "request", None) == rid]
        assert isinstance(mine[0], be.RequestArrived) and isinstance(mine[-1], be.RequestFinished)
        chunks = [e for e in mine if isinstance(e, be.PrefillChunk)]
        covered = chunks[0].start + sum(c.tokens for c in chunks)
        assert covered == mine[0].prompt_tokens and chunks[-1].last
    snaps = [e for e in events if isinstance(e, be.PoolSnapshot)]
    shared = [s for s in snaps if any(r > 1 for r in s.ref_counts)]
    assert shared, "the two requests with the system prompt share blocks"
    for s in snaps:
        assert s.blocks_used == sum(1 for r in s.ref_counts if r)
        assert all((o == -1) == (r == 0) for o, r in zip(s.owners, s.ref_counts))
        for view in s.sequences:
            assert 0 <= view.waste < s.block_size
            assert view.shared == sum(1 for b in view.blocks if s.ref_counts[b] > 1)
    summary = events[-1]
    assert isinstance(summary, be.BatchSummary) and summary.finished == 3
    assert summary.peak_blocks_used < summary.peak_contiguous_blocks
    assert 0 < summary.prefix_hit_rate < 1


def test_each_token_carries_the_tpot_so_far():
    """A live view shows a running request's TPOT: every RequestToken carries it, by
    engine/metrics.py's definition over the latencies so far (None at the first token), and
    the last one is what RequestFinished says — preempted and resumed requests too."""
    from engine.metrics import tpot_s
    model = model64()
    requests = [(list(range(40, 52)), gen(7)), (list(range(60, 75)), gen(9)),
                (list(b"abc"), gen(5))]
    engine = BatchEngine(model, TOK, SchedulerConfig(max_batch=3, max_step_tokens=16,
                                                     block_size=4, num_blocks=9))
    events = drive(engine, {0: requests[:2], 2: requests[2:]})
    assert engine.scheduler.preemptions > 0                 # the pool is too small for all
    for rid, fin in finished(events).items():
        tokens = [e for e in events if isinstance(e, be.RequestToken) and e.request == rid]
        latencies = [e.latency_s for e in tokens]
        assert tokens[0].tpot_s is None and len(tokens) == len(fin.tokens) > 2
        for i, e in enumerate(tokens[1:], start=2):
            assert e.tpot_s == tpot_s(latencies[:i]) > 0
        assert tokens[-1].tpot_s == fin.tpot_s


def test_rope_tables_grow_for_a_packed_batch(monkeypatch):
    """The RoPE tables are built lazily up to the positions runs reach; a packed batch brings
    its positions as a tensor, so the runner grows them first."""
    from engine.model import Transformer
    monkeypatch.setattr(Transformer, "ROPE_START", 8)
    model = tiny_model("llama", dtype=torch.float64)
    assert model.rope_cos.shape[0] == 8
    requests = [(list(range(30, 50)), gen(6)), (list(b"abc"), gen(4))]
    engine = BatchEngine(model, TOK, SchedulerConfig(max_batch=2, max_step_tokens=32,
                                                     block_size=4, num_blocks=16))
    assert_as_alone(model, drive(engine, {0: requests}), requests)


def test_a_request_that_cannot_fit_fails_alone():
    model = model64()
    engine = BatchEngine(model, TOK, SchedulerConfig(max_batch=2, max_step_tokens=16,
                                                     block_size=4, num_blocks=4))
    ok, too_big = engine.add(list(b"hi"), gen(3)), engine.add(list(range(40)), gen(3))
    empty = engine.add([], gen(3))
    done = finished(drive(engine, {}))
    assert done[ok].reason == "length"
    assert done[too_big].reason == "error" and "raise --num-blocks" in done[too_big].error
    assert done[empty].reason == "error" and "empty" in done[empty].error


def test_cancel_frees_blocks_and_keeps_what_was_generated():
    model = model64()
    engine = BatchEngine(model, TOK, SchedulerConfig(max_batch=2, max_step_tokens=16,
                                                     block_size=4, num_blocks=16))
    rid = engine.add(list(b"hello"), gen(50))
    events = engine.step() + engine.step()
    engine.cancel_all()
    events += engine.drain()
    fin = finished(events)[rid]
    assert fin.reason == "cancelled" and len(fin.tokens) == 2
    assert engine.blocks.num_used == 0 and not engine.has_work()


def test_an_interrupted_step_is_recomputed(monkeypatch):
    """A step whose forward fails (Ctrl+C) leaves nothing half-trusted: the next steps redo it
    and the tokens are still the lone run's."""
    model = model64()
    engine = BatchEngine(model, TOK, SchedulerConfig(max_batch=2, max_step_tokens=8,
                                                     block_size=2, num_blocks=40))
    requests = [(SYSTEM[:20], gen(5)), (SYSTEM[:20] + [1], gen(5))]
    for p, c in requests:
        engine.add(p, c)
    events = engine.step()
    real_run, calls = engine.runner.run, [0]

    def flaky(*args):
        calls[0] += 1
        if calls[0] == 2:
            raise KeyboardInterrupt
        return real_run(*args)
    monkeypatch.setattr(engine.runner, "run", flaky)
    events += engine.step()
    with pytest.raises(KeyboardInterrupt):
        engine.step()
    engine.blocks.check()
    events += drive(engine, {})
    assert_as_alone(model, events, requests)


# --------------------------------------------------------------------------- the embedded model
@pytest.mark.slow
def test_embedded_model_eight_requests_batched_equal_alone(embedded):
    """float32, the real model: 8 requests in one batch give exactly the tokens each gives
    alone (greedy, 24 tokens)."""
    prompts = ["Deep learning is", "The capital of France is", "Once upon a time",
               "def fibonacci(n):", "The three primary colours are", "Water boils at",
               "My favourite book is", "In 1969, the first"]
    cfg = GenerationConfig(max_new_tokens=24, attention_rows=False, stop_at_eos=False)
    engine = BatchEngine(embedded.model, embedded.tokenizer,
                         SchedulerConfig(max_batch=8, max_step_tokens=256, num_blocks=64))
    done = finished(list(serve(engine, [(0.0, p, cfg) for p in prompts])))
    for rid, prompt in enumerate(prompts):
        _, ref = run_to_end(embedded.model, embedded.tokenizer, prompt, cfg)
        assert done[rid].tokens == ref.tokens, prompt


# --------------------------------------------------------------------------- the figures
def test_batch_metrics_definitions():
    """One request: the batch's decode tokens/s is 1 / TPOT, as for a single run. Several: all
    tokens after each request's first, over the span from the first first token to the last
    token; TTFT counts from arrival."""
    from engine.metrics import compute_batch_metrics, compute_metrics
    cpu = torch.device("cpu")
    one = compute_metrics(3, 0.5, [0.5, 0.1, 0.1, 0.1], cpu, 0)     # arrival 0, tokens at .5 … .8
    m = compute_batch_metrics([one], [(0.5, 0.8)], wall_s=0.8)
    assert m.decode_tokens_per_s == pytest.approx(1 / one.tpot_s) == pytest.approx(10.0)
    assert m.tokens_per_s == pytest.approx(4 / 0.8) and m.ttft_p50_s == pytest.approx(0.5)
    two = compute_metrics(3, 1.0, [1.0, 0.2, 0.2], cpu, 0)           # arrival .2, tokens 1.2 … 1.6
    m = compute_batch_metrics([one, two], [(0.5, 0.8), (1.2, 1.6)], wall_s=1.6, hit_tokens=3,
                              lookup_tokens=6)
    assert m.decode_tokens_per_s == pytest.approx((3 + 2) / (1.6 - 0.5))
    assert m.ttft_p50_s == pytest.approx(0.75) and m.prefix_hit_rate == 0.5
    assert m.tpot_p99_s == pytest.approx(0.1 + 0.99 * 0.1)
