"""Decoding strategies as a ladder of small functions, and generation as a stream of events.

    naive   every step runs the whole sequence (prompt + generated so far) through the model and
            keeps the last position's logits. Step t costs a forward over t positions: O(T²)
            work for T tokens, almost all of it recomputing keys and values already computed.
    kv      run the prompt once (prefill), keeping every layer's K and V in a preallocated cache;
            each later step pushes one new position through the model and attends to the cache.
    paged   the same, with K/V in fixed-size blocks taken from a shared pool on demand.

The rungs, each a function you can find by name:

    make_cache      the KV cache a strategy needs (none, one buffer, blocks from a pool)
    CachedAttention the `attend(layer, q, k, v)` door the model calls: write K/V, read, attend
    forward_step    one model call over some positions
    start_run       check the request, build the cache, pick the step (a `Run` holds it all)
    prefill         the prompt through the model once
    decode_one      one more token through the model (naive: the whole sequence again)
    next_token      logits → the chosen token
    step_events     what one step emits: Token, CacheSnapshot, AttentionRow, FlashTiles
    generate        the loop over those rungs, yielding `engine.events`

Step mode and forced tokens (engine/stepping.py) hand `generate` a `pause`: called between
choosing a token and taking it, it may show events, wait, and take another token instead.

Fast-path options (engine/fast/) change the model and the decode step. This module never
imports them: the caller passes a `StepBuilder` (engine.fast.STEPS; engine/session.py does).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Generator, Iterator, Protocol

import numpy as np
import torch

from .attention import AttentionBackend, get_backend
from .cache import BlockPool, CacheFullError, ContiguousKVCache, PagedKVCache, no_cache_stats
from .config import ConfigError, FastPathConfig, GenerationConfig
from .events import (AttentionRow, CacheSnapshot, Event, Finished, FlashTiles, Prefill, Started,
                     Token)
from .metrics import compute_metrics
from .model import Transformer
from .sampling import make_generator, sample, token_logprobs
from .timing import sync
from .tokenizer import StreamDecoder, Tokenizer


class CancelToken(Protocol):
    def is_set(self) -> bool: ...


class Pause(Protocol):
    """Between choosing a token and taking it (engine/stepping.py): yields the events to show,
    returns the token to take — `token` itself, another one (a fork), or None to stop the run
    (cancelled while paused).

    A pause whose `residuals` attribute is True finds, in `run.residuals`, each layer's residual
    stream from the forward that made the logits (empty when a fast path's own decode step made
    them: it has no Python residuals)."""

    def __call__(self, run: "Run", logits: torch.Tensor,
                 token: int) -> Generator[Event, None, int | None]: ...


class StepBuilder(Protocol):
    """What the fast path (engine/fast/) gives the loop, so that decoding need not import it."""

    def prepare(self, model: Transformer, fast: FastPathConfig) -> Transformer:
        """The model to decode with (a transformed copy for weight options)."""

    def check(self, model: Transformer, strategy: str, fast: FastPathConfig) -> None:
        """Raise a ConfigError if `fast` cannot run here — before anything is allocated."""

    def decoder(self, model: Transformer, cache, fast: FastPathConfig, next_pos: int,
                record_rows: bool):
        """An object with `step(token, pos) -> logits` (and `.rows` if it records attention
        rows) that replaces forward_step for decode steps; None to keep forward_step."""


class PlainSteps:
    """The plain PyTorch model and forward_step: no fast-path options."""

    def prepare(self, model: Transformer, fast: FastPathConfig) -> Transformer:
        if fast != FastPathConfig():
            raise ConfigError(f"fast-path options {fast.spec() or fast!r} need the fast path's "
                              f"step builder: pass steps=engine.fast.STEPS (a Session does)")
        return model

    def check(self, model: Transformer, strategy: str, fast: FastPathConfig) -> None:
        pass

    def decoder(self, model, cache, fast, next_pos, record_rows):
        return None


PLAIN = PlainSteps()


# --------------------------------------------------------------------------- rung 1: the cache
def make_cache(strategy: str, model: Transformer, capacity: int, block_size: int = 16,
               num_blocks: int | None = None, pool: BlockPool | None = None):
    """None for `naive`; a contiguous buffer for `kv`; a sequence in a block pool for `paged`."""
    cfg = model.cfg
    if strategy == "naive":
        return None
    if strategy == "kv":
        return ContiguousKVCache(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, capacity,
                                 model.dtype, model.device, n_heads=cfg.n_heads)
    if pool is None:
        blocks = num_blocks or -(-capacity // block_size)
        pool = BlockPool(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, blocks, block_size,
                         model.dtype, model.device, n_heads=cfg.n_heads)
    needed = pool.blocks_needed(capacity)
    if needed > len(pool.free_list):
        raise CacheFullError(
            f"paged KV pool too small: {capacity} tokens need {needed} blocks of "
            f"{pool.block_size}, the pool has {len(pool.free_list)} free of {pool.num_blocks}")
    return PagedKVCache(pool)


# --------------------------------------------------------------------------- rung 2: attend
class CachedAttention:
    """The `attend(layer, q, k, v)` the model calls in each layer, for one forward step.

    It writes the step's new K/V into the cache (if any), reads back everything so far, runs the
    backend, and — when asked — keeps the newest position's attention row for the heatmap. That
    row is recomputed here from the last query and the keys (a (H × T) softmax, cheap), so it is
    the same whichever backend did the real work.
    """

    def __init__(self, backend: AttentionBackend, cache=None, record_rows: bool = False):
        self.backend, self.cache, self.record_rows = backend, cache, record_rows
        self.start = 0
        self.rows: list[torch.Tensor] = []

    def begin(self, start: int, n_new: int) -> None:
        self.start, self.rows = start, []
        if self.cache is not None:
            self.cache.reserve(start + n_new)     # fails *before* anything is written

    def end(self, new_length: int) -> None:
        if self.cache is not None:
            self.cache.commit(new_length)

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        start = self.start
        self.backend.current_layer = layer        # only used to label traces (flash tiles)
        if self.cache is None:
            keys, values = k, v                                   # (B, n_kv, T, hd), all fresh
            out = self.backend.attend(q, keys, values, q_offset=0)
        elif isinstance(self.cache, PagedKVCache) and self.backend.caps.paged_native:
            self.cache.write(layer, k, v)
            pool = self.cache.pool
            out = self.backend.attend_paged(q, pool.k[layer], pool.v[layer],
                                            self.cache.block_table, start + k.shape[2], start)
            keys = None
        else:
            keys, values = self.cache.update(layer, start, k, v)  # (B, n_kv, start+T, hd)
            out = self.backend.attend(q, keys, values, q_offset=start)
        if self.record_rows:
            if keys is None:                                      # paged-native: gather for the row
                keys, _ = self.cache.gather(layer, start + k.shape[2])
            self.rows.append(attention_row(q[0, :, -1], keys[0]))
        return out

    def row_matrix(self) -> np.ndarray:
        """(n_layers, n_heads, T) float16 for the newest position."""
        return torch.stack(self.rows).to(torch.float16).cpu().numpy()


def attention_row(q_last: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """softmax(q·Kᵀ/√d) for one query per head. q_last: (H, hd); keys: (n_kv, T, hd) → (H, T)."""
    H, hd = q_last.shape
    n_kv, T = keys.shape[0], keys.shape[1]
    # Group the query heads by the K/V head they share instead of copying each K/V head
    # H / n_kv times (repeat_interleave): same products, no (H, T, hd) copy of the keys.
    q = q_last.float().view(n_kv, H // n_kv, hd)                      # (n_kv, group, hd)
    scores = (q @ keys.float().transpose(1, 2)) / math.sqrt(hd)        # (n_kv, group, T)
    return torch.softmax(scores.reshape(H, T), dim=-1)


# --------------------------------------------------------------------------- rung 3: one step
@torch.inference_mode()
def forward_step(model: Transformer, tokens: torch.Tensor, start: int,
                 attn: CachedAttention, residuals: list | None = None) -> torch.Tensor:
    """Push `tokens` (1, T) at positions start… through the model; logits of the last position.
    `residuals`: a list to collect each layer's residual stream in (step mode)."""
    attn.begin(start, tokens.shape[1])
    logits = model(tokens, start, attn, last_only=True, residuals=residuals)   # (1, 1, vocab)
    attn.end(start + tokens.shape[1])
    return logits[0, -1]                                           # (vocab,)


def check_lengths(model: Transformer, n_prompt: int, max_new: int) -> None:
    """A prompt that is empty or does not fit the model's context is a user error, said plainly."""
    limit = model.cfg.max_seq_len
    if n_prompt == 0:
        raise ConfigError("the prompt is empty: type some text to continue")
    if n_prompt + max_new > limit:
        raise ConfigError(
            f"prompt of {n_prompt} tokens + {max_new} new tokens exceeds the model's context "
            f"of {limit} tokens; shorten the prompt or lower --max-new-tokens")


# --------------------------------------------------------------------------- rung 4: one run
@dataclass(eq=False)
class Run:
    """Everything one request's rungs share while it is generated."""
    model: Transformer
    tokenizer: Tokenizer
    cfg: GenerationConfig
    ids: list[int]                    # the prompt's tokens
    prompt: str                       # … and its text
    cache: Any                        # None for naive
    attn: CachedAttention
    steps: StepBuilder
    sampler: torch.Generator | None
    stream: StreamDecoder
    decoder: Any = None               # the fast path's own decode step, built after prefill
    generated: list[int] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    prefill_s: float = 0.0
    residuals: list | None = None     # step mode's logit lens: the last forward's, per layer

    @property
    def seq(self) -> list[int]:
        return self.ids + self.generated

    def collect(self) -> list | None:
        """A fresh list for the next forward's residuals when they are read, else None."""
        if self.residuals is not None:
            self.residuals = []
        return self.residuals

    def free(self) -> None:
        if self.cache is not None:
            self.cache.free()


def start_run(model: Transformer, tokenizer: Tokenizer, prompt: str | list[int],
              cfg: GenerationConfig, pool: BlockPool | None = None,
              backend: AttentionBackend | None = None, steps: StepBuilder = PLAIN) -> Run:
    """Check the request and set up its cache; a user's mistake is a ConfigError, said plainly."""
    model = steps.prepare(model, cfg.fast)   # the plain model unless fast-path options change it
    if isinstance(prompt, str) and prompt and not prompt.strip():
        raise ConfigError("the prompt is only whitespace: type some text to continue")
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    text = prompt if isinstance(prompt, str) else tokenizer.decode(ids)
    check_lengths(model, len(ids), cfg.max_new_tokens)
    if backend is None:
        backend = get_backend(cfg.backend, model.device, tile=cfg.flash_tile)
    capacity = cfg.capacity or (len(ids) + cfg.max_new_tokens)
    if cfg.strategy == "kv" and capacity < len(ids) + cfg.max_new_tokens:
        raise ConfigError(f"KV cache capacity {capacity} is smaller than the prompt + new "
                          f"tokens ({len(ids) + cfg.max_new_tokens})")
    steps.check(model, cfg.strategy, cfg.fast)      # refuse before anything is allocated
    cache = make_cache(cfg.strategy, model, capacity, cfg.block_size, cfg.num_blocks, pool)
    return Run(model=model, tokenizer=tokenizer, cfg=cfg, ids=ids, prompt=text, cache=cache,
               attn=CachedAttention(backend, cache, record_rows=cfg.attention_rows),
               steps=steps, sampler=make_generator(cfg.sampling.seed),
               stream=StreamDecoder(tokenizer))


def started_event(run: Run) -> Started:
    model, cfg = run.model, run.cfg
    return Started(strategy=cfg.strategy, backend=run.attn.backend.name, device=str(model.device),
                   dtype=str(model.dtype).removeprefix("torch."), prompt=run.prompt,
                   max_new_tokens=cfg.max_new_tokens, fast=cfg.fast.spec(),
                   sampling=cfg.sampling)


# --------------------------------------------------------------------------- rung 5: the steps
def prefill(run: Run) -> torch.Tensor:
    """The whole prompt through the model once; the logits for the first new token."""
    x = torch.tensor([run.ids], dtype=torch.long, device=run.model.device)     # (1, T)
    logits = forward_step(run.model, x, 0, run.attn, run.collect())
    sync(run.model.device)                       # the prefill's time includes its kernels
    return logits


def build_decoder(run: Run) -> bool:
    """After prefill, the fast path may bring its own decode step (the C step, a compiled or
    captured one). True if it did: building it can take a while, and is no step's time."""
    if run.cache is None or not run.cfg.fast.own_step:
        return False
    run.decoder = run.steps.decoder(run.model, run.cache, run.cfg.fast, len(run.seq) - 1,
                                    run.cfg.attention_rows)
    return run.decoder is not None


def decode_one(run: Run) -> torch.Tensor:
    """The newest token through the model — or, for naive, the whole sequence again."""
    seq, residuals = run.seq, run.collect()
    if run.cache is None:                                    # naive: recompute everything
        x = torch.tensor([seq], dtype=torch.long, device=run.model.device)
        return forward_step(run.model, x, 0, run.attn, residuals)
    if run.decoder is not None:
        return run.decoder.step(seq[-1], len(seq) - 1)
    x = torch.tensor([seq[-1:]], dtype=torch.long, device=run.model.device)   # (1, 1)
    return forward_step(run.model, x, len(seq) - 1, run.attn, residuals)


def seen_tokens(run: Run) -> torch.Tensor:
    """What the repetition penalty looks at: the whole sequence (nothing when it is off)."""
    return (torch.tensor(run.seq) if run.cfg.sampling.repetition_penalty != 1.0
            else torch.empty(0)).long()


def next_token(run: Run, logits: torch.Tensor) -> int:
    """Sample (or take the argmax of) the logits; the repetition penalty sees the sequence."""
    return sample(logits, run.cfg.sampling, seen_tokens(run), run.sampler)   # .cpu() syncs


def step_events(run: Run, token: int, logits: torch.Tensor) -> list[Event]:
    """Take `token` into the run; what this step emits, in order."""
    run.generated.append(token)
    cfg, position = run.cfg, len(run.seq) - 1
    logprob, top = (token_logprobs(logits, token, cfg.logprobs) if cfg.logprobs is not None
                    else (None, ()))
    events: list[Event] = [Token(
        id=token, text=run.stream.push(token), position=position, index=len(run.generated) - 1,
        latency_s=run.latencies[-1],
        logits=logits.detach().float().cpu() if cfg.keep_logits else None,
        logprob=logprob, top_logprobs=top)]
    per_token = run.model.cfg.kv_bytes_per_token(torch.finfo(run.model.dtype).bits // 8)
    events.append(CacheSnapshot(stats=run.cache.stats() if run.cache is not None else
                                no_cache_stats(run.model.cfg.n_layers, per_token, position)))
    if cfg.attention_rows:
        rows = (getattr(run.decoder, "rows", None) if run.decoder is not None
                else run.attn.row_matrix() if run.attn.rows else None)
        if rows is not None:
            events.append(AttentionRow.of(position - 1, rows))
    tiles = getattr(run.attn.backend, "tile_trace", None)
    if tiles:
        events.append(FlashTiles(**tiles))
    return events


def stop_reason(run: Run, token: int) -> str | None:
    """"eos" or "stop" if this token ends the run, else None."""
    if run.cfg.stop_at_eos and token in run.tokenizer.eos_token_ids:
        return "eos"
    if run.cfg.stop and any(s in run.tokenizer.decode(run.generated) for s in run.cfg.stop):
        return "stop"
    return None


def finished_event(run: Run, reason: str) -> Finished:
    tail = run.stream.flush()    # non-empty only if the text ends in an invalid byte sequence
    kv_bytes = run.cache.stats().bytes_reserved if run.cache is not None else 0
    metrics = compute_metrics(len(run.ids), run.prefill_s, run.latencies, run.model.device,
                              kv_bytes)
    return Finished(reason=reason, tokens=tuple(run.generated),
                    text=run.tokenizer.decode(run.generated), metrics=metrics, tail=tail)


# --------------------------------------------------------------------------- rung 6: the loop
def generate(model: Transformer, tokenizer: Tokenizer, prompt: str | list[int],
             cfg: GenerationConfig, cancel: CancelToken | None = None,
             pool: BlockPool | None = None, backend: AttentionBackend | None = None,
             steps: StepBuilder = PLAIN, pause: Pause | None = None) -> Iterator[Event]:
    """Generate up to cfg.max_new_tokens tokens, yielding events as they happen.

    Each token's latency runs from the end of the previous step's events to its sampling, so
    the time a consumer spends on events is not the engine's (nor the time a `pause` waits).
    The cache is freed when the loop ends for any reason — finished, cancelled, an error, or
    the consumer stopping iteration.
    """
    run = start_run(model, tokenizer, prompt, cfg, pool, backend, steps)
    if getattr(pause, "residuals", False):
        run.residuals = []                 # each forward hands the pause its layers' residuals
    reason = "length"
    try:
        yield started_event(run)
        t_prev = time.perf_counter()
        for index in range(cfg.max_new_tokens):
            if cancel is not None and cancel.is_set():
                reason = "cancelled"
                break
            if index == 0:
                logits = prefill(run)
                run.prefill_s = time.perf_counter() - t_prev
                yield Prefill(prompt_tokens=tuple(run.ids), seconds=run.prefill_s,
                              prompt_pieces=tuple(tokenizer.pieces(run.ids)))
            else:
                if index == 1 and build_decoder(run):
                    t_prev = time.perf_counter()
                logits = decode_one(run)
            token = next_token(run, logits)
            run.latencies.append(time.perf_counter() - t_prev)
            if pause is not None:
                token = yield from pause(run, logits, token)
                if token is None:
                    run.latencies.pop()            # a token never taken has no latency
                    reason = "cancelled"
                    break
            yield from step_events(run, token, logits)
            t_prev = time.perf_counter()   # time spent by the consumer is not the engine's
            reason = stop_reason(run, token) or reason
            if reason != "length":
                break
        yield finished_event(run, reason)
    finally:
        run.free()


def run_to_end(model, tokenizer, prompt, cfg: GenerationConfig, **kw) -> tuple[list, Finished]:
    """Drain `generate`; return (all events, the Finished event). Handy for tests and the bench."""
    events = list(generate(model, tokenizer, prompt, cfg, **kw))
    return events, events[-1]
