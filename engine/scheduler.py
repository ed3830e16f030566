"""The scheduler: which sequences go into the next forward pass, and how many tokens each.

A step has a token budget (`max_step_tokens`) and a batch limit (`max_batch` sequences running
at once). `schedule()` fills them in this order (vLLM's scheduler does the same):

  1. Running sequences, oldest first. One that is decoding needs 1 token; one still inside its
     prompt gets the next chunk, as much of it as the budget leaves. A long prompt is spread over
     several steps ("chunked prefill") while everyone else's decoding goes on in the same steps.
     When the pool has no free block for a sequence, the *newest* running sequence is preempted:
     its blocks go back to the pool and it returns to the front of the waiting queue, to be
     recomputed later from its tokens — prompt plus everything it had generated ("preemption by
     recompute"). The newest pays because it has the least work to redo.
  2. Waiting sequences, first come first served, while budget, batch and pool allow (none in a
     step that had to preempt: the pool is short). Admission looks the tokens up in the prefix
     cache, then allocates blocks for all of them at once: a request is admitted only when its
     blocks fit.

          waiting ─▶ [ r7 r6 r5 ]          running ─▶ [ r1 r2 r3 r4 ]
                         admit ▲                           │ preempt the newest (r4)
                               └───────────────────────────┘

The plan goes to the model runner (engine/runner.py). After the forward, `commit()` marks the
tokens computed; the engine samples, and `finish()` releases a finished sequence's blocks.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .cache.block_manager import BlockManager
from .config import ConfigError
from .sequence import Sequence, Status


@dataclass(slots=True)
class SchedulerConfig:
    """Limits of the batching engine (nano-vllm's config.py; the CLI flags map onto these)."""
    max_batch: int = 8              # sequences running at once
    max_step_tokens: int = 512      # tokens one forward may take: decode rows + prefill chunks
    block_size: int = 16            # token slots per KV block
    num_blocks: int = 256           # blocks in the pool
    prefix_caching: bool = True     # share full blocks of identical prefixes

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_step_tokens", "block_size", "num_blocks"):
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"{name.replace('_', ' ')} must be a positive integer, got "
                                  f"{getattr(self, name)}")
        if self.max_step_tokens < self.max_batch:
            raise ConfigError(f"the step token budget ({self.max_step_tokens}) must be at least "
                              f"the batch size ({self.max_batch}): every running sequence "
                              f"needs one token per decode step")


@dataclass(frozen=True, slots=True)
class Chunk:
    """Positions [start, start + length) of one sequence, computed in this step."""
    seq: Sequence
    start: int
    length: int

    @property
    def end(self) -> int:
        return self.start + self.length

    @property
    def samples(self) -> bool:
        """Does this chunk reach the sequence's last token, so its logits pick the next one?"""
        return self.end == len(self.seq.tokens)


@dataclass(slots=True)
class StepPlan:
    chunks: list[Chunk] = field(default_factory=list)          # in runner order
    copies: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write (src, dst)
    admitted: list[Sequence] = field(default_factory=list)     # new or resumed this step
    preempted: list[Sequence] = field(default_factory=list)
    freed: dict[int, int] = field(default_factory=dict)        # preempted seq id → blocks freed

    @property
    def tokens(self) -> int:
        return sum(c.length for c in self.chunks)


class Scheduler:
    def __init__(self, cfg: SchedulerConfig, blocks: BlockManager):
        self.cfg, self.blocks = cfg, blocks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []          # admission order: oldest first
        self.preemptions = 0
        self.prefix_lookup_tokens = 0               # tokens looked up in the prefix cache
        self.prefix_hit_tokens = 0                  # … and found there

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ------------------------------------------------------------------ one step
    def schedule(self) -> StepPlan:
        plan = StepPlan()
        budget = self.cfg.max_step_tokens
        self.blocks.begin_step()
        # 1. Running sequences, oldest first.
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.uncomputed, budget)
            start = seq.num_computed
            while self.blocks.write_cost(seq.id, start, start + n) > self.blocks.num_free:
                victim = self.running[-1]              # the newest
                plan.freed[victim.id] = self._preempt(victim)
                plan.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is not Status.RUNNING:       # it was the newest itself
                break
            plan.copies += self.blocks.prepare_write(seq.id, seq.tokens, start, start + n)
            plan.chunks.append(Chunk(seq, start, n))
            budget -= n
            i += 1
        # 2. Waiting sequences, in arrival order (a preempted one is at the front).
        while (self.waiting and budget > 0 and len(self.running) < self.cfg.max_batch
               and not plan.preempted):
            seq = self.waiting[0]
            match = self.blocks.match(seq.tokens)
            if self.blocks.admit_cost(seq.tokens, match) > self.blocks.num_free:
                break                                  # first come, first served: no skipping
            self.waiting.popleft()
            self.blocks.allocate(seq.id, seq.tokens, match)
            self.prefix_lookup_tokens += len(seq.tokens)
            self.prefix_hit_tokens += match.tokens
            seq.num_computed, seq.prefill_end = match.tokens, len(seq.tokens)
            seq.status = Status.RUNNING
            self.running.append(seq)
            n = min(seq.uncomputed, budget)
            plan.copies += self.blocks.prepare_write(seq.id, seq.tokens, seq.num_computed,
                                                     seq.num_computed + n)
            plan.chunks.append(Chunk(seq, seq.num_computed, n))
            plan.admitted.append(seq)
            budget -= n
        return plan

    def commit(self, plan: StepPlan) -> None:
        """The forward ran: every chunk's K/V is in the pool."""
        for c in plan.chunks:
            c.seq.num_computed = c.end
            self.blocks.commit(c.seq.id, c.seq.tokens, c.start, c.end)

    def abort(self, plan: StepPlan) -> None:
        """The forward did not complete (an error or Ctrl+C): trust none of it. Every sequence
        of the step goes back to waiting with nothing computed, as if preempted."""
        self.blocks.abort_step()
        for c in reversed(plan.chunks):
            if c.seq.status is Status.RUNNING:
                self._preempt(c.seq, count=False)

    # ------------------------------------------------------------------ leaving
    def finish(self, seq: Sequence, reason: str) -> None:
        """A sequence is done (or cancelled): free its blocks."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
            self.blocks.release(seq.id)
        elif seq.status is Status.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        seq.status, seq.finish_reason = Status.FINISHED, reason

    def _preempt(self, seq: Sequence, count: bool = True) -> int:
        """Back to waiting, nothing computed; returns how many blocks became free."""
        self.running.remove(seq)
        freed = self.blocks.release(seq.id)
        seq.num_computed = 0
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        if count:
            seq.preemptions += 1
            self.preemptions += 1
        return freed
