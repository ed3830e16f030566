"""naive, kv and paged give the same answer: same tokens, logits equal at every step."""

from __future__ import annotations

import threading

import pytest
import torch

from engine.cache import BlockPool
from engine.config import GenerationConfig, SamplingConfig
from engine.decoding import generate, run_to_end
from engine.events import (AttentionRow, CacheSnapshot, Finished, Prefill, Started, Token)
from tests.conftest import tiny_model

STRATEGIES = ("naive", "kv", "paged")


def run(model, tokenizer, prompt_ids, **kw):
    kw.setdefault("stop_at_eos", False)
    kw.setdefault("keep_logits", True)
    events, fin = run_to_end(model, tokenizer, prompt_ids, GenerationConfig(**kw))
    logits = [e.logits for e in events if isinstance(e, Token)]
    return fin, logits, events


@pytest.mark.parametrize("prompt_len", [1, 7, 16, 37])
def test_strategies_agree_greedy(family, tokenizer, prompt_len):
    # Block size 16: prompts of 16 and 37 fill / span several blocks, and 20 new tokens cross
    # block boundaries during decode.
    model = tiny_model(family)
    prompt = torch.randint(0, 256, (prompt_len,), generator=torch.Generator().manual_seed(3)).tolist()
    ref, ref_logits, _ = run(model, tokenizer, prompt, strategy="naive", max_new_tokens=20)
    assert len(ref.tokens) == 20
    for strategy in ("kv", "paged"):
        fin, logits, _ = run(model, tokenizer, prompt, strategy=strategy, max_new_tokens=20,
                             block_size=16)
        assert fin.tokens == ref.tokens, strategy
        step_diff = max((a - b).abs().max().item() for a, b in zip(logits, ref_logits))
        assert step_diff <= 1e-4, (strategy, step_diff)


@pytest.mark.parametrize("block_size", [1, 3, 16])
def test_paged_block_sizes_agree(tokenizer, block_size):
    model = tiny_model("llama", seed=5)
    prompt = list(range(40, 59))
    ref, _, _ = run(model, tokenizer, prompt, strategy="kv", max_new_tokens=12)
    fin, _, _ = run(model, tokenizer, prompt, strategy="paged", block_size=block_size,
                    max_new_tokens=12)
    assert fin.tokens == ref.tokens


def test_seeded_sampling_identical_across_strategies(family, tokenizer):
    model = tiny_model(family, seed=1)
    sampling = SamplingConfig(temperature=0.9, top_k=50, top_p=0.95, min_p=0.01,
                              repetition_penalty=1.1, seed=1234)
    results = {s: run(model, tokenizer, [5, 6, 7], strategy=s, max_new_tokens=15,
                      sampling=sampling)[0].tokens for s in STRATEGIES}
    assert results["naive"] == results["kv"] == results["paged"]
    # and the seed matters: another seed gives another sequence
    other = SamplingConfig(temperature=0.9, top_k=50, top_p=0.95, seed=99)
    assert run(model, tokenizer, [5, 6, 7], strategy="kv", max_new_tokens=15,
               sampling=other)[0].tokens != results["kv"]


def test_event_order_and_metrics(tokenizer):
    model = tiny_model("llama")
    _, _, events = run(model, tokenizer, [1, 2, 3], strategy="kv", max_new_tokens=5,
                       attention_rows=True)
    kinds = [type(e) for e in events]
    assert kinds[0] is Started and kinds[1] is Prefill and kinds[-1] is Finished
    assert kinds.count(Token) == 5 and kinds.count(CacheSnapshot) == 5
    rows = [e for e in events if isinstance(e, AttentionRow)]
    assert len(rows) == 5
    cfg = model.cfg
    for r in rows:   # one row per layer and head over every position so far, summing to 1
        assert r.probs.shape == (cfg.n_layers, cfg.n_heads, r.position + 1)
        assert abs(float(r.probs.astype("float32").sum(-1).mean()) - 1.0) < 1e-2
    fin = events[-1]
    m = fin.metrics
    lat = [e.latency_s for e in events if isinstance(e, Token)]
    assert m.ttft_s == lat[0]
    assert m.tpot_s == pytest.approx((sum(lat) - lat[0]) / 4)
    assert m.decode_tokens_per_s == pytest.approx(1 / m.tpot_s)
    assert m.new_tokens == 5 and m.prompt_tokens == 3


def test_stop_at_eos_and_stop_strings(tokenizer):
    model = tiny_model("llama")
    fin, _, _ = run(model, tokenizer, [1, 2, 3], strategy="kv", max_new_tokens=10)
    first = fin.tokens[0]
    tok = type(tokenizer)(tokenizer.backend, eos_token_ids=(first,))
    events, fin2 = run_to_end(model, tok, [1, 2, 3], GenerationConfig(max_new_tokens=10))
    assert fin2.reason == "eos" and fin2.tokens == (first,)
    # A stop string the run will meet: its first generated character (the byte tokenizer
    # decodes any id, an incomplete UTF-8 sequence as U+FFFD, so there always is one).
    stop = fin.text[:1]
    assert stop
    _, fin3 = run_to_end(model, tokenizer, [1, 2, 3],
                         GenerationConfig(max_new_tokens=10, stop=(stop,), stop_at_eos=False))
    assert fin3.reason == "stop" and len(fin3.tokens) <= 4      # a character is ≤ 4 bytes


class CancelAfter:
    """A cancel token that trips once `n` tokens were seen by the consumer."""

    def __init__(self):
        self.event = threading.Event()

    def is_set(self):
        return self.event.is_set()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_cancel_stops_within_one_step_and_frees_the_pool(tokenizer, strategy):
    model = tiny_model("llama")
    cfg = model.cfg
    pool = BlockPool(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, 64, 4, model.dtype, "cpu")
    free_before = sorted(pool.free_list)
    cancel = CancelAfter()
    seen = 0
    for ev in generate(model, tokenizer, [1, 2, 3, 4, 5], GenerationConfig(
            strategy=strategy, max_new_tokens=40, stop_at_eos=False), cancel=cancel,
            pool=pool if strategy == "paged" else None):
        if isinstance(ev, Token):
            seen += 1
            if seen == 3:
                cancel.event.set()
        if isinstance(ev, Finished):
            fin = ev
    assert fin.reason == "cancelled"
    assert len(fin.tokens) == 3
    assert sorted(pool.free_list) == free_before and not pool.tables


def test_abandoned_generator_frees_its_blocks(tokenizer):
    model = tiny_model("llama")
    cfg = model.cfg
    pool = BlockPool(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, 32, 4, model.dtype, "cpu")
    it = generate(model, tokenizer, [1, 2, 3], GenerationConfig(strategy="paged",
                  max_new_tokens=20, stop_at_eos=False), pool=pool)
    for ev in it:
        if isinstance(ev, Token):
            break
    assert pool.num_blocks - len(pool.free_list) > 0
    it.close()
    assert len(pool.free_list) == pool.num_blocks
