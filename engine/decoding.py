"""Decoding strategies as a ladder of small functions, and generation as a stream of events.

    naive   every step runs the whole sequence (prompt + generated so far) through the model and
            keeps the last position's logits. Step t costs a forward over t positions: O(T²)
            work for T tokens, almost all of it recomputing keys and values already computed.
    kv      run the prompt once (prefill), keeping every layer's K and V in a preallocated cache;
            each later step pushes one new position through the model and attends to the cache.
    paged   the same, with K/V in fixed-size blocks taken from a shared pool on demand.

The rungs: `make_cache` → `CachedAttention` (the `attend` door of the model) → `forward_step`
(one model call) → `generate` (the loop, yielding `engine.events`).
"""

from __future__ import annotations

import math
import time
from typing import Iterator, Protocol

import numpy as np
import torch

from .attention import AttentionBackend, get_backend
from .cache import BlockPool, CacheFullError, ContiguousKVCache, PagedKVCache, no_cache_stats
from .config import ConfigError, GenerationConfig
from .events import AttentionRow, CacheSnapshot, Finished, FlashTiles, Prefill, Started, Token
from .metrics import compute_metrics
from .model import Transformer
from .sampling import make_generator, sample
from .tokenizer import StreamDecoder, Tokenizer


class CancelToken(Protocol):
    def is_set(self) -> bool: ...


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
                 attn: CachedAttention) -> torch.Tensor:
    """Push `tokens` (1, T) at positions start… through the model; logits of the last position."""
    attn.begin(start, tokens.shape[1])
    logits = model(tokens, start, attn, last_only=True)            # (1, 1, vocab)
    attn.end(start + tokens.shape[1])
    return logits[0, -1]                                           # (vocab,)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_lengths(model: Transformer, n_prompt: int, max_new: int) -> None:
    """A prompt that is empty or does not fit the model's context is a user error, said plainly."""
    limit = model.cfg.max_seq_len
    if n_prompt == 0:
        raise ConfigError("the prompt is empty: type some text to continue")
    if n_prompt + max_new > limit:
        raise ConfigError(
            f"prompt of {n_prompt} tokens + {max_new} new tokens exceeds the model's context "
            f"of {limit} tokens; shorten the prompt or lower --max-new-tokens")


# --------------------------------------------------------------------------- rung 4: the loop
def generate(model: Transformer, tokenizer: Tokenizer, prompt: str | list[int],
             cfg: GenerationConfig, cancel: CancelToken | None = None,
             pool: BlockPool | None = None, backend: AttentionBackend | None = None
             ) -> Iterator:
    """Generate up to cfg.max_new_tokens tokens, yielding events as they happen.

    The cache is freed when the loop ends for any reason — finished, cancelled, an error, or the
    consumer simply stopping iteration.
    """
    from . import fast
    model = fast.prepare(model, cfg.fast)   # the plain model unless fast-path options say otherwise
    device = model.device
    if isinstance(prompt, str) and prompt and not prompt.strip():
        raise ConfigError("the prompt is only whitespace: type some text to continue")
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    prompt_text = prompt if isinstance(prompt, str) else tokenizer.decode(ids)
    check_lengths(model, len(ids), cfg.max_new_tokens)
    if backend is None:
        backend = get_backend(cfg.backend, device, tile=cfg.flash_tile)
    capacity = cfg.capacity or (len(ids) + cfg.max_new_tokens)
    if cfg.strategy == "kv" and capacity < len(ids) + cfg.max_new_tokens:
        raise ConfigError(f"KV cache capacity {capacity} is smaller than the prompt + new "
                          f"tokens ({len(ids) + cfg.max_new_tokens})")
    if cfg.fast.kernel == "c":            # refuse before anything is allocated, not mid-run
        fast.check_c_step(model, cfg.strategy)
    cache = make_cache(cfg.strategy, model, capacity, cfg.block_size, cfg.num_blocks, pool)
    attn = CachedAttention(backend, cache, record_rows=cfg.attention_rows)
    gen = make_generator(cfg.sampling.seed)
    per_token = model.cfg.kv_bytes_per_token(torch.finfo(model.dtype).bits // 8)

    yield Started(strategy=cfg.strategy, backend=backend.name, device=str(device),
                  dtype=str(model.dtype).removeprefix("torch."), prompt=prompt_text,
                  max_new_tokens=cfg.max_new_tokens, fast=cfg.fast.spec())
    stream = StreamDecoder(tokenizer)
    decoder = None          # the fixed-shape step (compile / CUDA graphs), built after prefill
    generated: list[int] = []
    latencies: list[float] = []
    prefill_s = 0.0
    reason = "length"
    try:
        t_prev = time.perf_counter()
        for index in range(cfg.max_new_tokens):
            if cancel is not None and cancel.is_set():
                reason = "cancelled"
                break
            seq = ids + generated
            if cache is None:                  # naive: the whole sequence, every step
                step_tokens, start = seq, 0
            elif index == 0:                   # prefill: the prompt, once
                step_tokens, start = ids, 0
            else:                              # decode: just the newest token
                step_tokens, start = seq[-1:], len(seq) - 1
            if index == 1 and cfg.fast.own_step and cache is not None:
                # Compiling or capturing takes a while once; it is not a decode step's time.
                decoder = fast.make_decoder(model, cache, cfg.fast, start, cfg.attention_rows)
                t_prev = time.perf_counter()
            if decoder is not None:
                logits = decoder.step(step_tokens[0], start)
            else:
                x = torch.tensor([step_tokens], dtype=torch.long, device=device)
                logits = forward_step(model, x, start, attn)
            if index == 0:
                _sync(device)
                prefill_s = time.perf_counter() - t_prev
                yield Prefill(prompt_tokens=tuple(ids), prompt_pieces=tuple(tokenizer.pieces(ids)),
                              seconds=prefill_s)
            seen = torch.tensor(seq) if cfg.sampling.repetition_penalty != 1.0 else torch.empty(0)
            token = sample(logits, cfg.sampling, seen.long(), gen)   # .cpu() syncs the device
            now = time.perf_counter()
            latencies.append(now - t_prev)
            t_prev = now
            generated.append(token)
            piece = stream.push(token)
            yield Token(id=token, text=piece, position=len(seq), index=index,
                        latency_s=latencies[-1],
                        logits=logits.detach().float().cpu() if cfg.keep_logits else None)
            yield CacheSnapshot(stats=cache.stats() if cache is not None
                                else no_cache_stats(model.cfg.n_layers, per_token, len(seq)))
            if cfg.attention_rows:
                rows = getattr(decoder, "rows", None) if decoder is not None else (
                    attn.row_matrix() if attn.rows else None)
                if rows is not None:
                    yield AttentionRow(position=len(seq) - 1, probs=rows)
            tiles = getattr(backend, "tile_trace", None)
            if tiles:
                yield FlashTiles(**tiles)
            t_prev = time.perf_counter()   # time spent by the consumer is not the engine's
            if cfg.stop_at_eos and token in tokenizer.eos_token_ids:
                reason = "eos"
                break
            if cfg.stop and any(s in stream.tok.decode(generated) for s in cfg.stop):
                reason = "stop"
                break
        tail = stream.flush()    # non-empty only if the text ends in an invalid byte sequence
        kv_bytes = cache.stats().bytes_reserved if cache is not None else 0
        metrics = compute_metrics(len(ids), prefill_s, latencies, device, kv_bytes)
        yield Finished(reason=reason, tokens=tuple(generated), text=tokenizer.decode(generated),
                       metrics=metrics, tail=tail)
    finally:
        if cache is not None:
            cache.free()


def run_to_end(model, tokenizer, prompt, cfg: GenerationConfig, **kw) -> tuple[list, Finished]:
    """Drain `generate`; return (all events, the Finished event). Handy for tests and the bench."""
    events = list(generate(model, tokenizer, prompt, cfg, **kw))
    return events, events[-1]
