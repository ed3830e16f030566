"""The block manager: which physical block holds which tokens, and who is using it.

Many requests share one paged pool (engine/cache/paged.py shows the storage and the block table).
Someone has to decide which block a new token goes to, when a block can be handed out again, and
when two requests may read the *same* block. That bookkeeping is this file; it never touches a
tensor — the model runner (engine/runner.py) moves the data.

    free list      blocks nobody holds, least recently released first
    ref_counts     how many sequences hold each block in their block table
    tables         seq id → block table: logical block i of the sequence is tables[seq][i]
    prefix cache   hash of a full block's content → the block that holds it

Prefix caching. Requests often start alike (a system prompt, a few-shot preamble). The keys and
values of a full block depend only on its tokens and on every token before them, so the chained
hash

    h_i = H(h_{i-1}, tokens of block i),    h_{-1} = ROOT

names its content exactly. A new request walks its prompt block by block; while h_i is in the
cache it takes that block (ref count + 1) instead of computing it again:

    request A   [sys0][sys1][sys2][A's question ...]
    request B   [sys0][sys1][sys2][B's question ...]     B's table points at A's first 3 blocks
                 ref 2 ref 2 ref 2

Partial blocks and copy-on-write. The block after the last full hit may still begin with the
request's next k < block_size tokens (identical prompts; questions that start alike). The request
takes it too — but its next token goes into slot k of that block, where the other holder keeps
its own token. The rule: *a block held by more than one sequence is read-only*. Whoever writes
into a shared block first copies it (the runner copies the K/V) and writes into the copy.

A block whose last holder leaves goes back on the free list but keeps its content and hash: until
it is handed out again, a request with the same prefix can still revive it (a preempted request
usually finds its own blocks this way when it resumes). Handing it out evicts it from the cache.

Within one step, a block that *will* be full once the step's tokens are written is in the cache
already, so two requests admitted together with the same system prompt share it: the runner
writes every layer's new K/V before any attention reads them. Partial matches only use tokens
written in earlier steps (`contents`), because copy-on-write copies before the step runs.
`abort_step` undoes a step's cache entries if its forward never ran.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

from .base import CacheFullError

ROOT = b"root"        # the hash of the empty prefix


def chain_hash(parent: bytes, tokens: Sequence[int]) -> bytes:
    """h_i = H(h_{i-1}, tokens). A 128-bit BLAKE2 digest: two different prefixes sharing one is
    not a risk worth a check (nor can a prompt be crafted to collide with another's)."""
    return hashlib.blake2b(parent + array("q", tokens).tobytes(), digest_size=16).digest()


@dataclass(frozen=True, slots=True)
class PrefixMatch:
    """What the cache already holds of a token sequence."""
    blocks: tuple[int, ...]     # blocks to share, in logical order (the last one may be partial)
    tokens: int                 # how many leading tokens their K/V cover


class BlockManager:
    """Free list, reference counts, block tables and the prefix cache of one paged pool."""

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("a block pool needs a positive number of blocks and block size")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.prefix_caching = prefix_caching
        self.ref_counts = [0] * num_blocks
        # An ordered set: a released block goes to the end, a block is handed out from the front,
        # so cached content that was released long ago is overwritten first.
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.tables: dict[int, list[int]] = {}
        # Prefix caching only (all stay empty without it):
        self.block_hash: list[bytes | None] = [None] * num_blocks   # h_i of a full block
        self.parent: list[bytes | None] = [None] * num_blocks       # h_{i-1}: what precedes it
        self.contents: list[list[int]] = [[] for _ in range(num_blocks)]   # tokens written
        self.cached: dict[bytes, int] = {}                # h_i → the block holding it
        self.followers: dict[bytes, set[int]] = {}        # h_{i-1} → blocks written after it
        self._step_hashes: list[bytes] = []               # cache entries made this step

    # ------------------------------------------------------------------ counting
    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)       # ceil division

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free)

    # ------------------------------------------------------------------ prefix matching
    def match(self, tokens: Sequence[int]) -> PrefixMatch:
        """The longest cached prefix of `tokens`, leaving at least the last token to compute
        (its logits are what the request needs next). Read-only."""
        if not self.prefix_caching:
            return PrefixMatch((), 0)
        bs, limit = self.block_size, len(tokens) - 1
        blocks: list[int] = []
        h, i = ROOT, 0
        while i + bs <= limit:                                  # whole blocks, by hash
            nxt = chain_hash(h, tokens[i:i + bs])
            if nxt not in self.cached:
                break
            blocks.append(self.cached[nxt])
            h, i = nxt, i + bs
        want = list(tokens[i:min(i + bs, limit)])              # then part of one more block
        best, best_k = None, 0
        for b in self.followers.get(h, ()):
            k = common_prefix(self.contents[b], want)
            if k > best_k:
                best, best_k = b, k
        if best is not None:
            blocks.append(best)
        return PrefixMatch(tuple(blocks), i + best_k)

    # ------------------------------------------------------------------ admission
    def admit_cost(self, tokens: Sequence[int], match: PrefixMatch) -> int:
        """Free blocks `allocate(…, match)` and the first write after it will take."""
        revived = sum(1 for b in match.blocks if self.ref_counts[b] == 0)
        fresh = self.blocks_for(len(tokens)) - len(match.blocks)
        partial = match.tokens % self.block_size != 0
        copy = 1 if partial and self.ref_counts[match.blocks[-1]] > 0 else 0
        return revived + fresh + copy

    def allocate(self, seq_id: int, tokens: Sequence[int], match: PrefixMatch) -> None:
        """Give a new (or resumed) sequence a table for all its tokens: the matched blocks,
        shared, then fresh ones. All or nothing."""
        if seq_id in self.tables:
            raise ValueError(f"sequence {seq_id} already holds blocks")
        if self.admit_cost(tokens, match) > len(self.free):
            raise CacheFullError(f"{len(tokens)} tokens do not fit the {len(self.free)} free "
                                 f"blocks of {self.block_size}")
        table = []
        for b in match.blocks:
            self._hold(b)
            table.append(b)
        while len(table) < self.blocks_for(len(tokens)):
            table.append(self._take_free())
        self.tables[seq_id] = table

    # ------------------------------------------------------------------ one step's writes
    def write_cost(self, seq_id: int, start: int, end: int) -> int:
        """Free blocks needed to write positions [start, end): new blocks + copies."""
        table = self.tables[seq_id]
        grow = max(0, self.blocks_for(end) - len(table))
        first, last = start // self.block_size, min(self.blocks_for(end), len(table))
        shared = sum(1 for i in range(first, last) if self.ref_counts[table[i]] > 1)
        return grow + shared

    def prepare_write(self, seq_id: int, tokens: Sequence[int], start: int,
                      end: int) -> list[tuple[int, int]]:
        """Make positions [start, end) of `seq_id` writable; return the (source, destination)
        block copies the runner must do before the step. `tokens` is the whole sequence; full
        blocks this step completes go into the prefix cache now (see the module docstring)."""
        if self.write_cost(seq_id, start, end) > len(self.free):
            raise CacheFullError("no free block for this step (the scheduler should preempt)")
        table, bs = self.tables[seq_id], self.block_size
        copies = []
        for i in range(start // bs, min(len(table), self.blocks_for(end))):
            b, keep = table[i], max(0, start - i * bs)    # keep: slots before `start` in block i
            if self.ref_counts[b] > 1:                      # shared: copy on write
                new = self._take_free()
                self.ref_counts[b] -= 1
                table[i] = new
                copies.append((b, new))                     # (its contents are set by commit)
            elif self.block_hash[b] is not None or len(self.contents[b]) > keep:
                self._forget(b, keep_prefix=keep)           # a revived block, overwritten in place
        while len(table) < self.blocks_for(end):
            table.append(self._take_free())
        if self.prefix_caching:
            self._register_full_blocks(table, tokens, start, end)
        return copies

    def commit(self, seq_id: int, tokens: Sequence[int], start: int, end: int) -> None:
        """The step ran: positions [start, end) now hold K/V. Record what each block contains,
        so a later request can match part of it."""
        if not self.prefix_caching:
            return
        table, bs = self.tables[seq_id], self.block_size
        for i in range(start // bs, self.blocks_for(end)):
            b = table[i]
            parent = ROOT if i == 0 else self.block_hash[table[i - 1]]
            if parent is None:          # an unhashed predecessor: nothing can match after it
                continue
            if self.parent[b] != parent:
                self._unfollow(b)
                self.parent[b] = parent
                self.followers.setdefault(parent, set()).add(b)
            self.contents[b] = list(tokens[i * bs:min(end, (i + 1) * bs)])

    def begin_step(self) -> None:
        """A new step is being scheduled: remember the cache entries it makes (see abort_step)."""
        self._step_hashes = []

    def abort_step(self) -> None:
        """The step's forward did not run (an error, Ctrl+C): drop the cache entries it made for
        blocks it never wrote. The scheduler then preempts the step's sequences, so nothing
        that was counted as computed this step is trusted."""
        for h in self._step_hashes:
            b = self.cached.pop(h, None)
            if b is not None and self.block_hash[b] == h:
                self.block_hash[b] = None
        self._step_hashes = []

    # ------------------------------------------------------------------ release
    def release(self, seq_id: int) -> int:
        """A sequence finished, was cancelled or preempted: drop its hold on every block.
        Returns how many blocks became free."""
        freed = 0
        for b in reversed(self.tables.pop(seq_id, [])):
            self.ref_counts[b] -= 1
            if self.ref_counts[b] == 0:
                self.free[b] = None          # at the end: its cached content lives longest
                freed += 1
        return freed

    # ------------------------------------------------------------------ internals
    def _hold(self, b: int) -> None:
        if self.ref_counts[b] == 0:
            del self.free[b]                 # revived from the free list, content intact
        self.ref_counts[b] += 1

    def _take_free(self) -> int:
        """Hand out the least recently released block, evicting whatever it cached."""
        b, _ = self.free.popitem(last=False)
        self._forget(b)
        self.ref_counts[b] = 1
        return b

    def _forget(self, b: int, keep_prefix: int = 0) -> None:
        """Block b's content beyond `keep_prefix` tokens is about to be overwritten."""
        h = self.block_hash[b]
        if h is not None:
            if self.cached.get(h) == b:
                del self.cached[h]
            self.block_hash[b] = None
        self.contents[b] = self.contents[b][:keep_prefix]
        if keep_prefix == 0:
            self._unfollow(b)
            self.parent[b] = None

    def _unfollow(self, b: int) -> None:
        p = self.parent[b]
        if p is not None and p in self.followers:
            self.followers[p].discard(b)
            if not self.followers[p]:
                del self.followers[p]

    def _register_full_blocks(self, table: list[int], tokens: Sequence[int], start: int,
                              end: int) -> None:
        bs = self.block_size
        for i in range(start // bs, end // bs):          # blocks full once [start, end) is in
            parent = ROOT if i == 0 else self.block_hash[table[i - 1]]
            if parent is None:
                return
            h = chain_hash(parent, tokens[i * bs:(i + 1) * bs])
            b = table[i]
            self.block_hash[b] = h
            if h not in self.cached:                # an equal block elsewhere keeps the entry
                self.cached[h] = b
                self._step_hashes.append(h)

    # ------------------------------------------------------------------ views
    def owners(self) -> list[list[int]]:
        """For each block, the ids of the sequences holding it (in admission order)."""
        out: list[list[int]] = [[] for _ in range(self.num_blocks)]
        for seq_id, table in self.tables.items():
            for b in table:
                out[b].append(seq_id)
        return out

    def check(self) -> None:
        """Assert the invariants (tests call this after every step)."""
        owners = self.owners()
        for b in range(self.num_blocks):
            assert self.ref_counts[b] == len(owners[b]), f"block {b}: ref count vs tables"
            assert (self.ref_counts[b] == 0) == (b in self.free), f"block {b}: free list"
        for table in self.tables.values():
            assert len(set(table)) == len(table), "a table holds a block twice"
        for h, b in self.cached.items():
            assert self.block_hash[b] == h, f"cache entry of block {b} is stale"
        for p, blocks in self.followers.items():
            for b in blocks:
                assert self.parent[b] == p and self.contents[b], f"follower {b} is stale"


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading items a and b share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
