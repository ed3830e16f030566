"""A stand-in engine for tests and demos: synthetic events, no model, the real session and loop.

`FakeSource` runs `EngineLoop` (the same transport as the engine process) in a thread, over a
real `engine.session.Session` (so races are compared by the engine's own code) whose
`generate` is `fake_generate`, which makes believable events: a prompt split into words, tokens
from a fixed text, a cache that fills like `kv`/`paged`/`naive` would, attention rows that look
at the start and the recent past, per-token latencies that grow with position for `naive`, and
for `flash` the online-softmax running max and sum of made-up scores, computed tile by tile as
the real backend does.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from types import SimpleNamespace

import numpy as np

from engine.config import FAST_CHOICES
from engine.session import Session

from .bridge import QueueSource
from .engine_process import EngineLoop

WORDS = (" the model reads the prompt once and then writes one token at a time, keeping keys and"
         " values so that each new step only pays for itself and not for the whole past again."
         ).split(" ")[1:]
N_LAYERS, N_HEADS, N_KV, HEAD_DIM = 4, 6, 2, 16
BACKENDS = {"naive": None, "sdpa": None, "flash": None,
            "triton": "needs a CUDA GPU (or TRITON_INTERPRET=1)"}
# One fast-path choice the fake machine "cannot run", to exercise the refusal.
FAST_UNAVAILABLE = {"fp16": "fbgemm is not available here (fake)"}


def flash_tiles(scores: np.ndarray, tile: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The online softmax over `scores` in tiles: the running max m and running sum ℓ after
    each tile (ℓ rescaled by exp(m_old − m_new) whenever the max grows)."""
    m, l = -math.inf, 0.0
    ms, ls = [], []
    for k0 in range(0, len(scores), tile):
        s = scores[k0:k0 + tile]
        m_new = max(m, float(s.max()))
        l = l * math.exp(m - m_new) + float(np.exp(s - m_new).sum())
        m = m_new
        ms.append(m)
        ls.append(l)
    return tuple(ms), tuple(ls)


def fake_generate(model, tokenizer, prompt, cfg, cancel=None, steps=None, delay: float = 0.0,
                  diverge: dict[str, int] | None = None, flash_tile: int | None = None):
    """diverge: {run label: index}, that contestant's tokens differ from `index` on
    (to show a race that disagrees); flash_tile: a tile size for the flash events other than
    cfg.flash_tile (64 keys make one tile for a short demo)."""
    from engine.config import ConfigError
    from engine.events import (AttentionRow, CacheSnapshot, CacheStats, Finished, FlashTiles,
                               Prefill, SequenceBlocks, Started, Token, run_label)
    from engine.metrics import RunMetrics

    if cfg.backend not in BACKENDS:
        raise ConfigError(f"unknown attention backend {cfg.backend!r}")
    if BACKENDS[cfg.backend]:
        raise ConfigError(f"backend {cfg.backend!r} cannot run here: {BACKENDS[cfg.backend]}")
    pieces = [(" " if i else "") + w for i, w in enumerate(prompt.split())] or [""]
    if not prompt.strip():
        raise ConfigError("the prompt is empty: type some text to continue")
    n_prompt = len(pieces)
    yield Started(strategy=cfg.strategy, backend=cfg.backend, fast=cfg.fast.spec(),
                  device="cpu", dtype="float32", prompt=prompt,
                  max_new_tokens=cfg.max_new_tokens, sampling=cfg.sampling)
    bpt = 2 * N_LAYERS * N_KV * HEAD_DIM * 4
    capacity = n_prompt + cfg.max_new_tokens
    rng = np.random.default_rng(0)
    tokens, latencies = [], []
    reason = "length"
    split = (diverge or {}).get(run_label(cfg.strategy, cfg.backend, cfg.fast.spec()))
    tile = flash_tile or cfg.flash_tile
    # the newest query's scores against every key (its own generator: the attention rows'
    # noise above stays as it was)
    scores = np.random.default_rng(1).normal(0.0, 1.5, n_prompt + cfg.max_new_tokens)
    for index in range(cfg.max_new_tokens):
        if cancel is not None and cancel.is_set():
            reason = "cancelled"
            break
        if delay:
            time.sleep(delay)
        seq = n_prompt + index
        if index == 0:
            yield Prefill(prompt_tokens=tuple(range(n_prompt)), prompt_pieces=tuple(pieces),
                          seconds=0.02)
        lat = 0.02 + (0.0004 * seq if cfg.strategy == "naive" else 0.0) + 0.001 * (index % 3)
        latencies.append(lat)
        tok = index % len(WORDS)
        if split is not None and index >= split:
            tok = (tok + 7) % len(WORDS)
        tokens.append(tok)
        logits = np.zeros(64, dtype=np.float32)
        logits[tok % 64] = 10.0
        if cfg.backend == "naive":
            logits = logits + np.float32(1e-6)      # a rounding-sized difference
        yield Token(id=tok, text=" " + WORDS[tok], position=seq, index=index, latency_s=lat,
                    logits=logits if cfg.keep_logits else None)
        held = seq + 1
        if cfg.strategy == "naive":
            stats = CacheStats(kind="none", tokens=0, capacity=0, n_layers=N_LAYERS,
                               bytes_per_token=bpt, bytes_used=0, bytes_reserved=0,
                               bytes_without_gqa=0, recomputed_tokens=seq)
        elif cfg.strategy == "kv":
            stats = CacheStats(kind="kv", tokens=held, capacity=capacity, n_layers=N_LAYERS,
                               bytes_per_token=bpt, bytes_used=held * bpt,
                               bytes_reserved=capacity * bpt,
                               bytes_without_gqa=capacity * bpt * N_HEADS // N_KV)
        else:
            bs = cfg.block_size
            total = -(-capacity // bs)
            used = -(-held // bs)
            stats = CacheStats(kind="paged", tokens=held, capacity=total * bs, n_layers=N_LAYERS,
                               bytes_per_token=bpt, bytes_used=held * bpt,
                               bytes_reserved=total * bs * bpt,
                               bytes_without_gqa=total * bs * bpt * N_HEADS // N_KV,
                               block_size=bs, blocks_total=total, blocks_used=used,
                               sequences=(SequenceBlocks(0, tuple(range(used)), held,
                                                         used * bs - held),))
        yield CacheSnapshot(stats=stats)
        if cfg.attention_rows:
            t = seq + 1
            j = np.arange(t)
            base = np.exp(-(t - 1 - j) / 3.0) + 0.6 * (j == 0)
            probs = np.stack([np.stack([base ** (1 + 0.3 * h + 0.2 * layer) for h in range(N_HEADS)])
                              for layer in range(N_LAYERS)])
            probs = probs + 0.01 * rng.random(probs.shape)
            probs /= probs.sum(-1, keepdims=True)
            yield AttentionRow.of(seq, probs)
        if cfg.backend == "flash":
            m, l = flash_tiles(scores[:seq + 1], tile)
            yield FlashTiles(layer=0, head=0, tile_size=tile, running_max=m, running_sum=l)
    total = sum(latencies)
    ttft = latencies[0] if latencies else float("nan")
    n = len(latencies)
    tpot = (total - ttft) / (n - 1) if n > 1 else float("nan")
    metrics = RunMetrics(prompt_tokens=n_prompt, new_tokens=n, total_s=total, ttft_s=ttft,
                         tpot_s=tpot, itl_p50_s=tpot, itl_p99_s=tpot, prefill_s=0.02,
                         prefill_tokens_per_s=n_prompt / 0.02,
                         decode_tokens_per_s=1 / tpot if n > 1 else float("nan"),
                         peak_memory_bytes=300 * 2**20, kv_bytes=capacity * bpt)
    yield Finished(reason=reason, tokens=tuple(tokens),
                   text="".join(" " + WORDS[t] for t in tokens), metrics=metrics)


def fake_ready():
    from engine.events import Ready
    return Ready(model="fake-model (synthetic events)", device="cpu", dtype="float32",
                 n_layers=N_LAYERS, n_heads=N_HEADS, n_kv_heads=N_KV, head_dim=HEAD_DIM,
                 max_seq_len=2048, backends=dict(BACKENDS),
                 fast={spec: FAST_UNAVAILABLE.get(spec) for spec in FAST_CHOICES})


class FakeSession(Session):
    """A real session (its race, its comparisons) over fake_generate and a made-up model."""

    def ready(self):
        return fake_ready()

    def _backend_options(self, cfg):
        return {}


class FakeSource(QueueSource):
    """Synthetic events through the real session and transport, in a thread.

    delay: seconds per token (0 = as fast as possible); load_error: make loading fail;
    diverge, flash_tile: see `fake_generate`.
    """

    def __init__(self, delay: float = 0.0, load_error: str | None = None,
                 flush_interval: float = 1 / 12, diverge: dict[str, int] | None = None,
                 flash_tile: int | None = 8):
        super().__init__()
        self.delay, self.load_error = delay, load_error
        self.diverge, self.flash_tile = diverge, flash_tile
        self.commands: queue.Queue = queue.Queue()
        self.results: queue.Queue = queue.Queue()
        self.cancel_event = threading.Event()
        self.requests: list = []          # what the app asked for, for tests to inspect
        self.loop = EngineLoop(self.results.put, flush_interval, freeze_gc=False)
        self._thread = threading.Thread(target=self._serve, name="fake-engine", daemon=True)

    def _generate(self, model, tokenizer, prompt, cfg, cancel=None, steps=None):
        return fake_generate(model, tokenizer, prompt, cfg, cancel, delay=self.delay,
                             diverge=self.diverge, flash_tile=self.flash_tile)

    def _open_session(self, progress):
        progress("loading fake model", 0.5)
        if self.load_error:
            raise FileNotFoundError(self.load_error)
        lm = SimpleNamespace(model=None, tokenizer=None, name="fake")
        return FakeSession(lm, generate=self._generate, cancel=self.cancel_event)

    def _serve(self) -> None:
        self.loop.load(self._open_session)
        self.loop.serve(self.commands.get)

    def _start_worker(self) -> None:
        self._thread.start()

    def submit(self, request) -> None:
        self.requests.append(request)
        super().submit(request)

    def stop(self) -> None:
        self._closed.set()
        self.cancel_event.set()
        self.commands.put(None)
