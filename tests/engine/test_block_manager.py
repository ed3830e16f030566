"""The block manager's bookkeeping (no tensors): reference counts, the free list, the prefix
cache with its chained hashes, copy-on-write, and undoing a step that never ran."""

from __future__ import annotations

import pytest

from engine.cache.block_manager import ROOT, BlockManager, chain_hash
from engine.cache.base import CacheFullError


def run_step(bm: BlockManager, seq_id: int, tokens: list[int], start: int, end: int):
    """What the scheduler and the engine do around one chunk: prepare, (compute), commit."""
    copies = bm.prepare_write(seq_id, tokens, start, end)
    bm.commit(seq_id, tokens, start, end)
    return copies


def admit(bm: BlockManager, seq_id: int, tokens: list[int]) -> int:
    """Admit and compute the whole sequence; returns how many tokens came from the cache."""
    bm.begin_step()
    match = bm.match(tokens)
    bm.allocate(seq_id, tokens, match)
    run_step(bm, seq_id, tokens, match.tokens, len(tokens))
    bm.check()
    return match.tokens


def test_chained_hash_depends_on_everything_before():
    a = chain_hash(ROOT, [1, 2, 3, 4])
    assert chain_hash(a, [5, 6]) != chain_hash(chain_hash(ROOT, [9, 2, 3, 4]), [5, 6])
    assert chain_hash(a, [5, 6]) == chain_hash(chain_hash(ROOT, [1, 2, 3, 4]), [5, 6])


def test_full_blocks_are_shared_and_freed_with_the_last_user():
    bm = BlockManager(num_blocks=12, block_size=4)
    system = list(range(100, 110))                  # 10 tokens: 2 full blocks + 2
    assert admit(bm, 0, system + [1, 2, 3]) == 0
    assert admit(bm, 1, system + [7, 8]) == 10      # 2 full blocks + 2 tokens of the third
    t0, t1 = bm.tables[0], bm.tables[1]
    assert t0[:2] == t1[:2] and bm.ref_counts[t0[0]] == bm.ref_counts[t0[1]] == 2
    assert t0[2] != t1[2]                           # the partly shared block was copied
    assert bm.num_used == 4 + 1                     # A's 4 blocks, 1 of B's own
    bm.release(0)
    assert bm.ref_counts[t1[0]] == 1 and bm.num_used == 3
    bm.release(1)
    assert bm.num_used == 0
    bm.check()


def test_partially_shared_block_is_copied_on_write():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = [1, 2, 3, 4, 5, 6]
    admit(bm, 0, a)
    bm.begin_step()
    match = bm.match([1, 2, 3, 4, 5, 9, 9])          # shares 4 + 1 tokens of A
    assert match.tokens == 5 and match.blocks == tuple(bm.tables[0])
    assert bm.admit_cost([1, 2, 3, 4, 5, 9, 9], match) == 1     # the copy
    bm.allocate(1, [1, 2, 3, 4, 5, 9, 9], match)
    shared = bm.tables[1][1]
    assert bm.ref_counts[shared] == 2                # shared until the first write …
    copies = bm.prepare_write(1, [1, 2, 3, 4, 5, 9, 9], 5, 7)
    assert copies == [(shared, bm.tables[1][1])]     # … which copies it first
    assert bm.ref_counts[shared] == 1 and bm.tables[0][1] == shared
    bm.commit(1, [1, 2, 3, 4, 5, 9, 9], 5, 7)
    bm.check()


def test_identical_prompt_recomputes_only_its_last_token():
    bm = BlockManager(num_blocks=8, block_size=4)
    admit(bm, 0, list(range(8)))
    assert admit(bm, 1, list(range(8))) == 7         # the last token's logits are needed
    assert bm.tables[0][0] == bm.tables[1][0] and bm.tables[0][1] != bm.tables[1][1]


def test_released_blocks_are_revived_until_handed_out():
    bm = BlockManager(num_blocks=4, block_size=2)
    admit(bm, 0, [1, 2, 3, 4, 5])                    # 3 blocks
    bm.release(0)
    assert bm.num_used == 0
    assert admit(bm, 1, [1, 2, 3, 4, 5]) == 4        # two full blocks revived from the free list
    bm.release(1)
    admit(bm, 2, [9, 9, 9, 9, 9, 9, 9, 9])           # needs all 4 blocks: evicts the cache
    bm.release(2)
    assert admit(bm, 3, [1, 2, 3, 4, 5]) == 0


def test_least_recently_released_block_is_reused_first():
    bm = BlockManager(num_blocks=4, block_size=2)
    admit(bm, 0, [1, 2, 3])
    admit(bm, 1, [5, 6, 7])
    bm.release(0)                                    # A's blocks released first …
    bm.release(1)
    admit(bm, 2, [8, 8, 8])                          # … so they are overwritten first
    bm.release(2)
    assert admit(bm, 3, [5, 6, 7]) == 2
    bm.release(3)
    assert admit(bm, 4, [1, 2, 3]) == 0


def test_allocation_is_all_or_nothing():
    bm = BlockManager(num_blocks=3, block_size=2)
    admit(bm, 0, [1, 2, 3])
    with pytest.raises(CacheFullError):
        bm.allocate(1, [4, 5, 6, 7, 8], bm.match([4, 5, 6, 7, 8]))
    assert bm.num_used == 2 and 1 not in bm.tables
    bm.check()


def test_write_cost_counts_growth():
    bm = BlockManager(num_blocks=4, block_size=2)
    admit(bm, 0, [1, 2])
    assert bm.write_cost(0, 2, 3) == 1 and bm.write_cost(0, 2, 5) == 2
    with pytest.raises(CacheFullError):
        bm.prepare_write(0, [1, 2, 3, 4, 5, 6, 7, 8, 9], 2, 9)


def test_blocks_completed_in_a_step_are_shared_within_that_step():
    """Two requests admitted in the same step share the prefix one of them is computing."""
    bm = BlockManager(num_blocks=8, block_size=2)
    bm.begin_step()
    a, b = [1, 2, 3, 4, 5], [1, 2, 3, 4, 6]
    bm.allocate(0, a, bm.match(a))
    bm.prepare_write(0, a, 0, 5)                     # not committed yet: the forward runs later
    match = bm.match(b)
    assert match.tokens == 4 and match.blocks == tuple(bm.tables[0][:2])


def test_abort_forgets_the_steps_cache_entries():
    bm = BlockManager(num_blocks=8, block_size=2)
    bm.begin_step()
    bm.allocate(0, [1, 2, 3, 4, 5], bm.match([1, 2, 3, 4, 5]))
    bm.prepare_write(0, [1, 2, 3, 4, 5], 0, 5)
    bm.abort_step()
    bm.release(0)
    assert bm.match([1, 2, 3, 4, 5]).tokens == 0
    bm.check()


def test_no_prefix_caching_shares_nothing():
    bm = BlockManager(num_blocks=8, block_size=2, prefix_caching=False)
    admit(bm, 0, [1, 2, 3, 4, 5])
    assert admit(bm, 1, [1, 2, 3, 4, 5]) == 0 and bm.num_used == 6
