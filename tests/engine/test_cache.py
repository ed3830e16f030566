"""Cache bookkeeping is exact and the paged allocator never leaks or corrupts."""

from __future__ import annotations

import random

import pytest
import torch

from engine.cache import BlockPool, CacheFullError, ContiguousKVCache, PagedKVCache
from engine.config import ConfigError, GenerationConfig
from engine.decoding import run_to_end
from tests.conftest import tiny_model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_contiguous_stats_match_real_tensor_bytes(dtype):
    c = ContiguousKVCache(n_layers=3, n_kv_heads=2, head_dim=8, capacity=10, dtype=dtype,
                          device="cpu", n_heads=6)
    c.commit(4)
    s = c.stats()
    elem = torch.tensor([], dtype=dtype).element_size()
    assert s.bytes_per_token == 2 * 3 * 2 * 8 * elem
    assert s.bytes_reserved == c.k.nbytes + c.v.nbytes == s.bytes_per_token * 10
    assert s.bytes_used == 4 * s.bytes_per_token
    assert s.bytes_without_gqa == s.bytes_reserved * 3
    assert s.waste_tokens == 6
    assert s.bytes_per_layer_reserved * 3 == s.bytes_reserved


def test_paged_stats_match_real_tensor_bytes():
    pool = BlockPool(n_layers=2, n_kv_heads=1, head_dim=4, num_blocks=8, block_size=4,
                     dtype=torch.float32, device="cpu", n_heads=4)
    seq = PagedKVCache(pool)
    seq.reserve(6)
    seq.commit(6)
    s = seq.stats()
    assert s.bytes_reserved == pool.k.nbytes + pool.v.nbytes == s.bytes_per_token * 32
    assert s.blocks_used == 2 and s.blocks_free == 6
    assert s.sequences[0].waste == 2 and s.waste_tokens == 2
    assert s.bytes_used == 6 * s.bytes_per_token
    assert s.bytes_without_gqa == 4 * s.bytes_reserved


def test_stats_of_a_real_run_use_the_formula(tokenizer):
    model = tiny_model("llama")
    cfg = model.cfg
    for strategy in ("kv", "paged"):
        events, fin = run_to_end(model, tokenizer, [1, 2, 3], GenerationConfig(
            strategy=strategy, max_new_tokens=6, stop_at_eos=False, block_size=4))
        last = [e for e in events if type(e).__name__ == "CacheSnapshot"][-1].stats
        assert last.bytes_per_token == cfg.kv_bytes_per_token(4)
        assert last.tokens == 3 + 6 - 1   # the last sampled token is not yet fed back


def test_paged_allocator_interleaved_sequences_return_every_block():
    rng = random.Random(0)
    pool = BlockPool(n_layers=1, n_kv_heads=1, head_dim=2, num_blocks=50, block_size=3,
                     dtype=torch.float32, device="cpu")
    live: dict[int, int] = {}
    for _ in range(2000):
        op = rng.random()
        if op < 0.3 or not live:
            sid = pool.new_sequence()
            live[sid] = 0
        elif op < 0.8:
            sid = rng.choice(list(live))
            grow = live[sid] + rng.randint(1, 5)
            try:
                pool.grow(sid, grow)
                live[sid] = grow
                pool.lengths[sid] = grow
            except CacheFullError:
                pass
        else:
            sid = rng.choice(list(live))
            pool.release(sid)
            del live[sid]
        owned = [b for t in pool.tables.values() for b in t]
        # no block is owned twice, none is both owned and free
        assert len(owned) == len(set(owned))
        assert not set(owned) & set(pool.free_list)
        assert len(owned) + len(pool.free_list) == pool.num_blocks
    for sid in list(live):
        pool.release(sid)
    assert sorted(pool.free_list) == list(range(50))


def test_request_larger_than_pool_fails_clearly_and_changes_nothing():
    pool = BlockPool(n_layers=1, n_kv_heads=1, head_dim=2, num_blocks=4, block_size=4,
                     dtype=torch.float32, device="cpu")
    a = PagedKVCache(pool)
    a.reserve(8)
    free = list(pool.free_list)
    b = PagedKVCache(pool)
    with pytest.raises(CacheFullError, match="exhausted"):
        b.reserve(9)
    assert pool.free_list == free and pool.tables[b.seq_id] == []


def test_generate_refuses_a_pool_too_small(tokenizer):
    model = tiny_model("llama")
    with pytest.raises(CacheFullError, match="too small"):
        run_to_end(model, tokenizer, [1, 2, 3], GenerationConfig(
            strategy="paged", max_new_tokens=30, block_size=4, num_blocks=2))
    with pytest.raises(ConfigError, match="capacity"):
        run_to_end(model, tokenizer, [1, 2, 3], GenerationConfig(
            strategy="kv", max_new_tokens=30, capacity=10))


def test_contiguous_cache_refuses_overflow():
    c = ContiguousKVCache(1, 1, 2, capacity=4, dtype=torch.float32, device="cpu")
    with pytest.raises(CacheFullError):
        c.reserve(5)
