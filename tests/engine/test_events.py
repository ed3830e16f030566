"""The event schema: every event type survives JSON unchanged, bad input is one clear error, and
reading events needs neither torch nor NumPy."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine import events as E
from engine.config import GenerationConfig, SamplingConfig
from engine.metrics import RunMetrics

ROOT = Path(__file__).resolve().parents[2]

METRICS = RunMetrics(prompt_tokens=4, new_tokens=3, total_s=0.5, ttft_s=0.2, tpot_s=0.15,
                     itl_p50_s=0.15, itl_p99_s=0.16, prefill_s=0.1, prefill_tokens_per_s=40.0,
                     decode_tokens_per_s=6.5, peak_memory_bytes=123456789, kv_bytes=4096)
STATS = E.CacheStats(kind="paged", tokens=7, capacity=16, n_layers=2, bytes_per_token=512,
                     bytes_used=3584, bytes_reserved=8192, bytes_without_gqa=16384,
                     block_size=8, blocks_total=2, blocks_used=1,
                     sequences=(E.SequenceBlocks(0, (1,), 7, 1),))
FORKED = E.Forked(index=2, position=5, token=7, text=" cat", instead=9, instead_text=" dog")
ROW = E.RaceRow(strategy="kv", backend="sdpa", reason="length", tokens=(5, 6, 7), text=" a b",
                ttft_s=0.1, tpot_s=0.02, tokens_per_s=50.0, peak_memory_bytes=10, kv_bytes=20,
                same_tokens=False, max_logit_delta=2.5e-5, fast="c", run=3, first_difference=2,
                forced=FORKED)
LENS = tuple(E.LensLayer(layer=i, ids=(7, 9), texts=(" cat", "<|im_end|>"), probs=(0.5, 0.25))
             for i in range(3))

# One of every event type, with every optional field set to something other than its default.
SAMPLES = [
    E.Loading(text="dequantising", fraction=0.25),
    E.Ready(model="tiny", device="cpu", dtype="float32", n_layers=2, n_heads=4, n_kv_heads=2,
            head_dim=16, max_seq_len=512, backends={"sdpa": None, "triton": "needs CUDA"},
            fast={"": None, "c": "no compiler"}),
    E.Failed(message="the engine process ended", fatal=True),
    E.RaceStarted(prompt="Deep", contestants=(E.Contestant(1, "naive/sdpa"),
                                              E.Contestant(2, "kv/sdpa +c")), max_new_tokens=8),
    E.RaceFinished(prompt="Deep", rows=(ROW,), cancelled=True),
    E.Started(strategy="paged", backend="flash", device="cpu", dtype="float32", prompt="Hé 🙂",
              max_new_tokens=9, fast="c+int8",
              sampling=SamplingConfig(temperature=0.7, top_k=5, top_p=0.9, seed=3), step=True),
    E.Prefill(prompt_tokens=(1, 2, 3), prompt_pieces=("H", "é", " 🙂"), seconds=0.01),
    E.Token(id=42, text=" wor", position=3, index=0, latency_s=0.031),
    E.CacheSnapshot(stats=STATS),
    E.AttentionRow.of(3, np.random.default_rng(0).random((2, 4, 4)).astype(np.float32)),
    E.FlashTiles(layer=1, head=0, tile_size=4, running_max=(0.5, 1.25), running_sum=(1.0, 2.5)),
    E.StepPoint(index=2, position=5, candidates=(
        E.Candidate(id=9, text=" dog", model=0.5, tempered=0.6, final=1.0),
        E.Candidate(id=7, text=" cat", model=0.25, tempered=0.2, final=0.0, cut="top-k")),
        chosen=9, kept=1, vocab=256),
    E.LogitLens(index=2, position=5, layers=LENS, exact=LENS[:2], fast="int8"),
    FORKED,
    E.Finished(reason="error", tokens=(42, 7), text=" world", metrics=METRICS, tail="\ufffd",
               error="boom"),
    # the batching engine's (engine/batch.py)
    E.BatchStarted(model="tiny", device="cpu", dtype="float32", backend="sdpa", max_batch=4,
                   max_step_tokens=64, block_size=4, num_blocks=32, bytes_per_block=2048,
                   prefix_caching=False),
    E.RequestArrived(request=3, prompt_tokens=5, max_new_tokens=9, time_s=0.25, prompt="Hé 🙂"),
    E.RequestAdmitted(request=3, cached_tokens=4, queue_s=0.5, time_s=0.75),
    E.PrefillChunk(request=3, start=4, tokens=1, last=True, step=2),
    E.RequestToken(request=3, id=42, text=" wor", position=5, index=0, latency_s=0.5,
                   time_s=0.75),
    E.RequestToken(request=3, id=43, text="ld", position=6, index=1, latency_s=0.25,
                   time_s=1.0, tpot_s=0.25),
    E.RequestPreempted(request=3, freed_blocks=2, recompute_tokens=6, step=3, time_s=1.0),
    E.RequestResumed(request=3, cached_tokens=4, recompute_tokens=2, time_s=1.5),
    E.RequestFinished(request=3, reason="error", tokens=(42,), text=" wor", prompt_tokens=5,
                      cached_tokens=4, preemptions=1, ttft_s=0.5, tpot_s=None, queue_s=0.5,
                      time_s=2.0, tail="\ufffd", error="boom"),
    E.StepDone(step=3, seconds=0.125, batch=2, decode_tokens=1, prefill_tokens=6, running=2,
               waiting=1, time_s=1.0),
    E.PoolSnapshot(step=3, block_size=4, blocks_total=4, blocks_used=3, ref_counts=(2, 1, 1, 0),
                   owners=(3, 3, 5, -1), cached=(0, 3), waiting=1, running=2, preemptions=1,
                   sequences=(E.SequenceView(request=3, blocks=(0, 1), tokens=6, waste=2,
                                             shared=1),
                              E.SequenceView(request=5, blocks=(0, 2), tokens=5, waste=3,
                                             shared=1)),
                   prefix_hit_tokens=4, prefix_lookup_tokens=11, contiguous_tokens=28,
                   time_s=1.0),
    E.BatchSummary(requests=2, finished=1, cancelled=0, failed=1, new_tokens=3, wall_s=2.0,
                   tokens_per_s=1.5, decode_tokens_per_s=None, ttft_p50_s=0.5, ttft_p99_s=0.5,
                   tpot_p50_s=None, tpot_p99_s=None, steps=4, preemptions=1,
                   prefix_hit_rate=0.25, peak_blocks_used=3, blocks_total=4, block_size=4,
                   peak_contiguous_blocks=7, interrupted=True),
]


def test_samples_cover_every_event_type():
    assert {type(e) for e in SAMPLES} == set(E.TYPES.values())


@pytest.mark.parametrize("event", SAMPLES, ids=lambda e: type(e).__name__)
def test_round_trip_through_json_text(event):
    d = E.to_json(event)
    assert d["type"] == E.TYPE_NAMES[type(event)] and d["v"] == E.SCHEMA_VERSION
    text = json.dumps(d, allow_nan=False)               # strict JSON: no NaN, no bytes
    assert E.from_json(json.loads(text)) == event
    env = E.Envelope(run=7, t=12.5, event=event)
    assert E.Envelope.from_json(json.loads(json.dumps(env.to_json()))) == env


def test_no_event_field_uses_a_reserved_key():
    for cls in E.TYPES.values():
        assert not {f.name for f in dataclasses.fields(cls)} & set(E.RESERVED), cls


def test_nan_travels_as_null_and_comes_back_as_nan():
    m = dataclasses.replace(METRICS, tpot_s=math.nan, decode_tokens_per_s=math.inf)
    d = E.to_json(E.Finished(reason="length", tokens=(1,), text="x", metrics=m))
    assert d["metrics"]["tpot_s"] is None and d["metrics"]["decode_tokens_per_s"] is None
    back = E.from_json(json.loads(json.dumps(d, allow_nan=False)))
    assert math.isnan(back.metrics.tpot_s) and back.metrics.ttft_s == m.ttft_s


def test_logits_never_leave_the_process():
    tok = E.Token(id=1, text="a", position=2, index=0, latency_s=0.1,
                  logits=np.ones(8, dtype=np.float32))
    assert "logits" not in E.to_json(tok)
    assert E.from_json(E.to_json(tok)) == tok           # logits take no part in equality


def test_attention_row_is_compact_and_close():
    """8 bits a probability, relative to its row's peak: within peak/510 of the float32 row, the
    peak itself exact."""
    probs = np.random.default_rng(1).dirichlet(np.ones(54), size=(30, 9)).astype(np.float32)
    row = E.AttentionRow.of(53, probs)
    assert len(row.data) == probs.size and len(row.peaks) == 4 * 30 * 9
    got = row.probs
    assert got.dtype == np.float32 and got.shape == (30, 9, 54)
    assert np.all(np.abs(got - probs) <= probs.max(-1, keepdims=True) / 510 + 1e-7)
    top = probs.argmax(-1)[..., None]                    # the peak itself comes back exact
    np.testing.assert_array_equal(np.take_along_axis(got, top, -1),
                                  np.take_along_axis(probs, top, -1))
    np.testing.assert_allclose(row.head(4, 7), got[4, 7], rtol=1e-6)


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.update(type="warp"), "unknown event type 'warp'"),
    (lambda d: d.update(v=99), "schema version 99"),
    (lambda d: d.pop("id"), "missing field 'id'"),
    (lambda d: d.update(id="7"), "Token.id: expected an integer"),
    (lambda d: d.update(latency_s=True), "Token.latency_s: expected a number"),
])
def test_bad_event_json_is_one_clear_error(mutate, message):
    d = E.to_json(E.Token(id=1, text="a", position=2, index=0, latency_s=0.1))
    mutate(d)
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        E.from_json(d)


def test_a_lying_attention_row_is_refused():
    d = E.to_json(E.AttentionRow.of(3, np.zeros((2, 2, 4), dtype=np.float32)))
    d["shape"] = [2000, 2000, 2000]                      # claims 8 GB, carries 16 bytes
    with pytest.raises(ValueError, match=r"needs 8000000000 \+ 16000000 bytes, got 16 \+ 16"):
        E.from_json(d)
    d["shape"], d["data"] = [2, 2, 4], "not base64!"
    with pytest.raises(ValueError, match="base64"):
        E.from_json(d)


def test_unknown_fields_are_ignored():
    d = {**E.to_json(E.Failed(message="x")), "added_later": 1}
    assert E.from_json(d) == E.Failed(message="x")


def test_generation_config_round_trips_through_json():
    from engine.config import FastPathConfig
    cfg = GenerationConfig(strategy="paged", backend="flash", max_new_tokens=7,
                           sampling=SamplingConfig(temperature=0.5, top_p=0.9, seed=2),
                           stop=("\n\n",), fast=FastPathConfig(kernel="c", weights="int8"),
                           flash_tile=8)
    assert GenerationConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_events_import_without_torch_or_numpy():
    code = ("import sys; sys.modules['torch'] = None; sys.modules['numpy'] = None\n"
            "from engine import events as E\n"
            "row = E.from_json({'type': 'attention', 'v': 1, 'position': 0, 'shape': [1, 1, 2],"
            " 'data': '/4A=', 'peaks': 'AACAPw=='})\n"           # levels 255, 128; peak 1.0
            "print([round(p, 3) for p in row.head(0, 0)])\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[1.0, 0.502]"


def test_the_step_events_say_where_the_answer_forms_and_where_a_fork_differs():
    def layer(i, top):
        return E.LensLayer(layer=i, ids=(top,), texts=(str(top),), probs=(0.5,))
    lens = E.LogitLens(index=0, position=3, layers=tuple(layer(i, t) for i, t in
                                                         enumerate((4, 7, 5, 7, 7))),
                       exact=tuple(layer(i, t) for i, t in enumerate((4, 7, 6, 7, 7))))
    assert lens.settles_at == 3             # 7 from layer 3 on (layer 1's 7 did not last)
    assert lens.parts_at == 2               # the first layer whose top choices differ
    assert dataclasses.replace(lens, exact=lens.layers).parts_at is None
    assert dataclasses.replace(lens, layers=()).settles_at is None
    assert ROW.label == "kv/sdpa +c fork@2"
    assert ROW.difference == "differs from token 2: forced ' cat' instead of ' dog'"
    plain = dataclasses.replace(ROW, forced=None)
    assert plain.difference == "differs from token 2" and plain.label == "kv/sdpa +c"
    assert dataclasses.replace(ROW, first_difference=None).difference == ""
