"""The batching engine: many requests served at once from one paged KV pool (nano-vllm's
LLMEngine; vLLM's "continuous batching").

    engine.add(prompt, config)   a request joins the waiting queue
    engine.step()                one step: schedule → one forward for the whole batch → sample
                                 one token for every sequence that reached its end → events
    serve(engine, requests)      the loop, feeding requests at their arrival times

"Continuous": the batch is re-formed at every step. A finished request leaves at once and a
waiting one takes its place in the next step — nobody waits for the longest answer in a fixed
batch, and prompt chunks ride along with other requests' decode steps.

The roles, one file each:

    engine/scheduler.py             who runs this step and how many tokens each; preemption
    engine/cache/block_manager.py   blocks, reference counts, the prefix cache, copy-on-write
    engine/runner.py                the packed batch through the model; paged attention
    engine/sequence.py              one request's state
    engine/events.py                what comes out (its batch events)

The promise: every request keeps its own sampling settings and its own random generator, and its
next token is sampled from its own row of logits by the same code as engine.decoding.generate —
so whatever else is in the batch and whatever was preempted, a request gets the tokens it would
have got alone (tests/engine/test_batch.py holds the engine to it).
"""

from __future__ import annotations

import math
import time
from collections import deque
from typing import Callable, Iterable, Iterator

import torch

from .attention import AttentionBackend, get_backend
from .cache.block_manager import BlockManager
from .config import ConfigError, GenerationConfig
from .decoding import check_lengths
from .events import (BatchStarted, BatchSummary, PoolSnapshot, PrefillChunk, RequestAdmitted,
                     RequestArrived, RequestFinished, RequestPreempted, RequestResumed,
                     RequestToken, SequenceView, StepDone)
from .metrics import (BatchMetrics, RunMetrics, compute_batch_metrics, compute_metrics,
                      tokens_per_s, tpot_s)
from .model import Transformer
from .runner import ModelRunner
from .sampling import make_generator, sample, token_logprobs
from .scheduler import Scheduler, SchedulerConfig, StepPlan
from .sequence import Sequence, Status
from .tokenizer import StreamDecoder, Tokenizer


class BatchEngine:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, cfg: SchedulerConfig,
                 backend: str | AttentionBackend = "sdpa",
                 clock: Callable[[], float] = time.perf_counter, snapshots: bool = True,
                 model_name: str = "", packed: bool = True):
        self.model, self.tokenizer, self.cfg = model, tokenizer, cfg
        if isinstance(backend, str):
            backend = get_backend(backend, model.device)
        self.blocks = BlockManager(cfg.num_blocks, cfg.block_size, cfg.prefix_caching)
        self.scheduler = Scheduler(cfg, self.blocks)
        self.runner = ModelRunner(model, backend, cfg.num_blocks, cfg.block_size, packed)
        self.clock, self.t0 = clock, clock()
        self.snapshots = snapshots             # a PoolSnapshot after every step
        self.sequences: dict[int, Sequence] = {}
        self.next_id = 0                       # request ids: never reused, even after forget()
        self.results: dict[int, RunMetrics] = {}   # per finished request (engine.metrics)
        self.steps = 0
        self.peak_blocks = 0
        self.peak_contiguous_tokens = 0
        self.peak_running = 0
        self.new_tokens = 0
        self.reservations: list[int] = []     # prompt + max new of every request that can run
        self._outbox: list = [BatchStarted(
            model=model_name or type(model).__name__, device=str(model.device),
            dtype=str(model.dtype).removeprefix("torch."), backend=backend.name,
            max_batch=cfg.max_batch, max_step_tokens=cfg.max_step_tokens,
            block_size=cfg.block_size, num_blocks=cfg.num_blocks,
            bytes_per_block=self.runner.bytes_per_block, prefix_caching=cfg.prefix_caching)]

    def now(self) -> float:
        """Seconds since the engine started: the time base of every event."""
        return self.clock() - self.t0

    # ------------------------------------------------------------------ requests
    def check_request(self, ids: list[int], config: GenerationConfig) -> None:
        """Raise ConfigError, with a message for the user, if this request can never run."""
        check_lengths(self.model, len(ids), config.max_new_tokens)
        need = self.blocks.blocks_for(len(ids) + config.max_new_tokens)
        if need > self.cfg.num_blocks:
            raise ConfigError(
                f"a prompt of {len(ids)} tokens + {config.max_new_tokens} new tokens needs {need} "
                f"blocks of {self.cfg.block_size}; the pool has {self.cfg.num_blocks}: raise "
                f"--num-blocks or lower --max-new-tokens")

    def add(self, prompt: str | list[int], config: GenerationConfig,
            arrival_s: float | None = None) -> int:
        """Queue a request and return its id. One that can never run (empty, longer than the
        context, larger than the whole pool) finishes at once with reason "error": one bad
        request does not stop the others."""
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        seq = Sequence(id=self.next_id, prompt=ids, config=config,
                       arrival_s=self.now() if arrival_s is None else arrival_s,
                       generator=make_generator(config.sampling.seed),
                       stream=StreamDecoder(self.tokenizer),
                       logits=[] if config.keep_logits else None)
        self.next_id += 1
        self.sequences[seq.id] = seq
        self._outbox.append(RequestArrived(
            request=seq.id, prompt_tokens=len(ids), max_new_tokens=config.max_new_tokens,
            time_s=seq.arrival_s,
            prompt=prompt if isinstance(prompt, str) else self.tokenizer.decode(ids)))
        try:
            if isinstance(prompt, str) and prompt and not prompt.strip():
                raise ConfigError("the prompt is only whitespace")
            self.check_request(ids, config)
        except ConfigError as exc:
            self._finish(seq, "error", self.now(), error=str(exc))
            return seq.id
        self.reservations.append(len(ids) + config.max_new_tokens)
        self.scheduler.add(seq)
        return seq.id

    def cancel(self, request: int) -> None:
        seq = self.sequences[request]
        if seq.status is not Status.FINISHED:
            self._finish(seq, "cancelled", self.now())

    def forget(self, request: int) -> None:
        """Drop a finished request's record (its tokens, times and figures): a server that runs
        for days keeps only what is in flight. The batch figures then leave it out."""
        seq = self.sequences.get(request)
        if seq is not None and seq.status is Status.FINISHED:
            del self.sequences[request]
            self.results.pop(request, None)

    def cancel_all(self) -> None:
        for seq in list(self.sequences.values()):
            self.cancel(seq.id)

    def has_work(self) -> bool:
        return self.scheduler.has_work() or bool(self._outbox)

    def drain(self) -> list:
        """Events produced outside a step (arrivals, errors, cancellations)."""
        out, self._outbox = self._outbox, []
        return out

    # ------------------------------------------------------------------ one step
    def step(self) -> list:
        """Schedule, run the batch, sample; return the step's events (after any queued ones)."""
        events = self.drain()
        plan = self.scheduler.schedule()
        if not plan.chunks and not plan.preempted:
            return events
        self.steps += 1
        step, t_start = self.steps, self.clock()
        self._note_peaks()
        events += self._plan_events(plan, step)
        if not plan.chunks:
            return events
        try:
            logits = self.runner.run(plan.chunks, self.blocks.tables, plan.copies)
            self.scheduler.commit(plan)
        except BaseException:
            self.scheduler.abort(plan)         # nothing of this step is trusted
            raise
        events += [PrefillChunk(request=c.seq.id, start=c.start, tokens=c.length,
                                last=c.samples, step=step)
                   for c in plan.chunks if c.start < c.seq.prefill_end]
        samplers = [c.seq for c in plan.chunks if c.samples]
        picked = [self._sample(seq, row) for seq, row in zip(samplers, logits)]
        now = self.now()
        for seq, (token, row) in zip(samplers, picked):
            events += self._accept(seq, token, row, now)
        decode = sum(1 for c in plan.chunks if c.start >= c.seq.prefill_end)
        events.append(StepDone(step=step, seconds=self.clock() - t_start, batch=len(plan.chunks),
                               decode_tokens=decode, prefill_tokens=plan.tokens - decode,
                               running=len(self.scheduler.running),
                               waiting=len(self.scheduler.waiting), time_s=now))
        events += self.drain()
        if self.snapshots:
            events.append(self.snapshot(step))
        return events

    def _plan_events(self, plan: StepPlan, step: int) -> list:
        now, out = self.now(), []
        for seq in plan.preempted:
            out.append(RequestPreempted(request=seq.id, freed_blocks=plan.freed[seq.id],
                                        recompute_tokens=len(seq.tokens), step=step,
                                        time_s=now))
        for seq in plan.admitted:
            if seq.admitted_s is None:
                seq.admitted_s, seq.cached_tokens = now, seq.num_computed
                out.append(RequestAdmitted(request=seq.id, cached_tokens=seq.num_computed,
                                           queue_s=now - seq.arrival_s, time_s=now))
            else:
                out.append(RequestResumed(request=seq.id, cached_tokens=seq.num_computed,
                                          recompute_tokens=seq.uncomputed, time_s=now))
        return out

    def _sample(self, seq: Sequence, logits: torch.Tensor) -> tuple[int, torch.Tensor]:
        """The next token from this sequence's own row, as engine.decoding.generate picks it."""
        cfg = seq.config.sampling
        seen = torch.tensor(seq.tokens) if cfg.repetition_penalty != 1.0 else torch.empty(0)
        return sample(logits, cfg, seen.long(), seq.generator), logits

    def _accept(self, seq: Sequence, token: int, logits: torch.Tensor, now: float) -> list:
        """Append a sampled token; finish the sequence if a stop rule says so."""
        previous = seq.token_times[-1] if seq.token_times else seq.arrival_s
        seq.tokens.append(token)
        seq.token_times.append(now)
        seq.latencies.append(now - previous)
        self.new_tokens += 1
        kept = None
        if seq.logits is not None:
            kept = logits.detach().float().cpu()
            seq.logits.append(kept)
        logprob, top = (token_logprobs(logits, token, seq.config.logprobs)
                        if seq.config.logprobs is not None else (None, ()))
        out = [RequestToken(request=seq.id, id=token, text=seq.stream.push(token),
                            position=len(seq.tokens) - 1, index=len(seq.generated) - 1,
                            latency_s=now - previous, time_s=now, logits=kept,
                            logprob=logprob, top_logprobs=top,
                            tpot_s=_real(tpot_s(seq.latencies)))]
        cfg, generated = seq.config, seq.generated
        if cfg.stop_at_eos and token in self.tokenizer.eos_token_ids:
            self._finish(seq, "eos", now)
        elif cfg.stop and any(s in self.tokenizer.decode(generated) for s in cfg.stop):
            self._finish(seq, "stop", now)
        elif len(generated) >= cfg.max_new_tokens:
            self._finish(seq, "length", now)
        return out

    def _finish(self, seq: Sequence, reason: str, now: float, error: str | None = None) -> None:
        self.scheduler.finish(seq, reason)
        gaps = seq.latencies
        m = compute_metrics(len(seq.prompt), gaps[0] if gaps else 0.0, gaps,
                            self.model.device, 0)
        if reason not in ("error", "cancelled"):
            self.results[seq.id] = m
        generated = seq.generated
        self._outbox.append(RequestFinished(
            request=seq.id, reason=reason, tokens=tuple(generated),
            text=self.tokenizer.decode(generated), prompt_tokens=len(seq.prompt),
            cached_tokens=seq.cached_tokens, preemptions=seq.preemptions,
            ttft_s=_real(m.ttft_s), tpot_s=_real(m.tpot_s),
            queue_s=None if seq.admitted_s is None else seq.admitted_s - seq.arrival_s,
            time_s=now, tail=seq.stream.flush(), error=error))

    # ------------------------------------------------------------------ views
    def _note_peaks(self) -> None:
        self.peak_blocks = max(self.peak_blocks, self.blocks.num_used)
        self.peak_contiguous_tokens = max(self.peak_contiguous_tokens, self._contiguous_tokens())
        self.peak_running = max(self.peak_running, len(self.scheduler.running))

    def _contiguous_tokens(self) -> int:
        """What the running requests would reserve with one contiguous buffer each."""
        return sum(len(s.prompt) + s.config.max_new_tokens for s in self.scheduler.running)

    def contiguous_fit(self) -> int:
        """How many of the requests so far could each hold a contiguous reservation (prompt +
        max new tokens, the `kv` cache's way) in this pool's memory at the same time — at most:
        the smallest first. Paged blocks hold only what is written, so more run at once."""
        room, fit = self.cfg.num_blocks * self.cfg.block_size, 0
        for tokens in sorted(self.reservations):
            if tokens > room:
                break
            room, fit = room - tokens, fit + 1
        return fit

    def snapshot(self, step: int | None = None) -> PoolSnapshot:
        bm, bs = self.blocks, self.cfg.block_size
        owners = bm.owners()
        now = self.now()
        first = min((s.arrival_s for s in self.sequences.values()), default=None)
        views = []
        for seq in self.scheduler.running:
            table = bm.tables[seq.id]
            views.append(SequenceView(
                request=seq.id, blocks=tuple(table), tokens=seq.num_computed,
                waste=max(0, len(table) * bs - len(seq.tokens)),
                shared=sum(1 for b in table if bm.ref_counts[b] > 1)))
        return PoolSnapshot(
            step=self.steps if step is None else step, block_size=bs,
            blocks_total=bm.num_blocks, blocks_used=bm.num_used,
            ref_counts=tuple(bm.ref_counts), owners=tuple(o[0] if o else -1 for o in owners),
            cached=tuple(sorted(bm.cached.values())), sequences=tuple(views),
            waiting=len(self.scheduler.waiting), running=len(self.scheduler.running),
            preemptions=self.scheduler.preemptions,
            prefix_hit_tokens=self.scheduler.prefix_hit_tokens,
            prefix_lookup_tokens=self.scheduler.prefix_lookup_tokens,
            contiguous_tokens=self._contiguous_tokens(), time_s=now,
            requests=len(self.reservations), contiguous_fit=self.contiguous_fit(),
            peak_running=self.peak_running, new_tokens=self.new_tokens,
            tokens_per_s=_real(tokens_per_s(self.new_tokens, now - first)) if first is not None
            else None)

    def metrics(self) -> BatchMetrics:
        done = [self.sequences[r] for r in self.results]
        spans = [(s.token_times[0], s.token_times[-1]) for s in done if s.token_times]
        arrivals = [s.arrival_s for s in self.sequences.values()]
        ends = [s.token_times[-1] for s in self.sequences.values() if s.token_times]
        wall = (max(ends) - min(arrivals)) if ends else 0.0
        return compute_batch_metrics(list(self.results.values()), spans, wall,
                                     self.scheduler.prefix_hit_tokens,
                                     self.scheduler.prefix_lookup_tokens)

    def summary(self, interrupted: bool = False) -> BatchSummary:
        m = self.metrics()
        reasons = [s.finish_reason for s in self.sequences.values()]
        bs = self.cfg.block_size
        return BatchSummary(
            requests=len(self.sequences),
            finished=sum(r in ("length", "eos", "stop") for r in reasons),
            cancelled=reasons.count("cancelled"), failed=reasons.count("error"),
            new_tokens=sum(len(s.generated) for s in self.sequences.values()),
            wall_s=m.wall_s, tokens_per_s=_real(m.tokens_per_s),
            decode_tokens_per_s=_real(m.decode_tokens_per_s),
            ttft_p50_s=_real(m.ttft_p50_s), ttft_p99_s=_real(m.ttft_p99_s),
            tpot_p50_s=_real(m.tpot_p50_s), tpot_p99_s=_real(m.tpot_p99_s),
            steps=self.steps, preemptions=self.scheduler.preemptions,
            prefix_hit_rate=_real(m.prefix_hit_rate), peak_blocks_used=self.peak_blocks,
            blocks_total=self.cfg.num_blocks, block_size=bs,
            peak_contiguous_blocks=-(-self.peak_contiguous_tokens // bs),
            interrupted=interrupted, contiguous_fit=self.contiguous_fit(),
            peak_running=self.peak_running)


def _real(x: float) -> float | None:
    """A figure for an event: None instead of nan (which JSON cannot carry)."""
    return None if x is None or math.isnan(x) else x


def serve(engine: BatchEngine, requests: Iterable[tuple[float, str | list[int], GenerationConfig]],
          sleep: Callable[[float], None] = time.sleep,
          stop: Callable[[], bool] | None = None) -> Iterator:
    """Feed (arrival offset in seconds, prompt, config) requests to the engine as their times
    come, step until every one is done, and yield every event; BatchSummary last.

    While requests are running, a new one joins at the next step boundary; while none is, the
    loop sleeps until the next arrival (a tenth of a second at a time when it can be stopped).
    `stop()`, asked before each step: when it says yes, every request still running or waiting
    is cancelled and the summary says `interrupted` (the app's `x`)."""
    pending = deque(sorted(requests, key=lambda r: r[0]))
    start = engine.now()
    while pending or engine.has_work():
        if stop is not None and stop():
            engine.cancel_all()
            yield from engine.drain()
            yield engine.summary(interrupted=True)
            return
        while pending and pending[0][0] <= engine.now() - start:
            at, prompt, config = pending.popleft()
            engine.add(prompt, config, arrival_s=start + at)
        if engine.has_work():
            yield from engine.step()
        elif pending:
            wait = max(0.0, pending[0][0] - (engine.now() - start))
            sleep(wait if stop is None else min(wait, 0.1))
    yield engine.summary()
