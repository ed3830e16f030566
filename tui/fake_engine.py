"""A stand-in engine for tests and demos: synthetic events, no model, the real session and loop.

`FakeSource` runs `EngineLoop` (the same transport as the engine process) in a thread, over a
real `engine.session.Session` (so races are compared by the engine's own code) whose
`generate` is `fake_generate`, which makes believable events: a prompt split into words, tokens
from a fixed text, a cache that fills like `kv`/`paged`/`naive` would, attention rows that look
at the start and the recent past, per-token latencies that grow with position for `naive`, and
for `flash` the online-softmax running max and sum of made-up scores, computed tile by tile as
the real backend does. A batch (the server view) is the real batching engine (engine/batch.py)
on a tiny random model with a byte-level tokenizer — a step takes a millisecond or two, so its
scheduler, pool, prefix cache and preemptions are the real ones, and its text is noise. In step mode (and for forced tokens) it pauses through the engine's own
`Stepper` (engine/stepping.py), with a made-up distribution and logit lens: the transport, the
waiting and the forking are the real ones.
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


class FakeRun:
    """What a pause (engine/stepping.py) reads of a run: the tokens so far and how to spell one."""

    def __init__(self, n_prompt: int):
        self.n_prompt = n_prompt
        self.generated: list[int] = []
        self.tokenizer = SimpleNamespace(token_text=lambda i: " " + WORDS[i % len(WORDS)])

    @property
    def seq(self) -> list[int]:
        return list(range(self.n_prompt)) + self.generated


def fake_step_events(run: FakeRun, token: int, cfg):
    """A believable StepPoint and LogitLens for the pause before `token`: the chosen word most
    likely, its neighbours in WORDS less and less so; temperature, top-k and greedy shape and cut
    them as the real sampler would; the lens finds the word at layer 2 of 4 (for a lossy fast
    path the exact model's lens agrees until layer 3)."""
    from engine.events import Candidate, LensLayer, LogitLens, StepPoint
    vocab = len(WORDS)
    logits = -0.8 * ((np.arange(vocab) - token) % vocab).astype(np.float64)
    model = np.exp(logits - logits.max())
    model /= model.sum()
    s = cfg.sampling
    t = s.temperature or 1.0
    tempered = np.exp((logits - logits.max()) / t)
    tempered /= tempered.sum()
    order = [int(i) for i in np.argsort(-tempered, kind="stable")]
    cut = {}
    for rank, i in enumerate(order):
        if s.temperature == 0 and rank > 0:
            cut[i] = "greedy"
        elif s.top_k is not None and rank >= s.top_k:
            cut[i] = "top-k"
    final = np.where([i not in cut for i in range(vocab)], tempered, 0.0)
    final /= final.sum()
    text = run.tokenizer.token_text
    candidates = tuple(Candidate(id=i, text=text(i), model=float(model[i]),
                                 tempered=float(tempered[i]), final=float(final[i]),
                                 cut=cut.get(i, "")) for i in order[:10])
    index, position = len(run.generated), len(run.seq)
    point = StepPoint(index=index, position=position, candidates=candidates, chosen=token,
                      kept=vocab - len(cut), vocab=vocab)

    def layers(found_at: int, seen: int):
        out = []
        for layer in range(N_LAYERS):
            top = token if layer >= found_at else (seen + 3 * layer) % vocab
            ids = (top, (top + 1) % vocab, (top + 2) % vocab)
            p = 0.3 + 0.15 * layer
            out.append(LensLayer(layer=layer, ids=ids, texts=tuple(text(i) for i in ids),
                                 probs=(p, (1 - p) / 2, (1 - p) / 4)))
        return tuple(out)
    lossy = cfg.fast.weights != "same"
    lens = LogitLens(index=index, position=position, layers=layers(2, 5),
                     exact=layers(3, 5) if lossy else (), fast=cfg.fast.spec() if lossy else "")
    return point, lens


def fake_generate(model, tokenizer, prompt, cfg, cancel=None, steps=None, delay: float = 0.0,
                  diverge: dict[str, int] | None = None, flash_tile: int | None = None,
                  pause=None):
    """diverge: {run label: index}, that contestant's tokens differ from `index` on
    (to show a race that disagrees); flash_tile: a tile size for the flash events other than
    cfg.flash_tile (64 keys make one tile for a short demo); pause: what engine/decoding.py's
    `generate` takes (step mode, forced tokens) — after a forced token the text goes on from the
    forced word."""
    from engine.config import ConfigError
    from engine.events import (AttentionRow, CacheSnapshot, CacheStats, Finished, FlashTiles,
                               Prefill, SequenceBlocks, Started, Token, run_label)
    from engine.metrics import run_metrics
    from engine.units import MiB

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
    run = FakeRun(n_prompt)
    tokens, latencies = run.generated, []
    shift = 0                       # a fork moves the rest of the text along WORDS
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
        tok = (index + shift) % len(WORDS)
        if split is not None and index >= split:
            tok = (tok + 7) % len(WORDS)
        logits = np.zeros(64, dtype=np.float32)
        logits[tok % 64] = 10.0
        if cfg.backend == "naive":
            logits = logits + np.float32(1e-6)      # a rounding-sized difference
        if pause is not None:
            chosen = tok
            tok = yield from pause(run, logits, tok)
            if tok is None:
                latencies.pop()
                reason = "cancelled"
                break
            shift += tok - chosen
        tokens.append(tok)
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
    # The figures as engine/metrics.py defines them, from the made-up latencies (the prefill
    # share of the first token and the process peak are made up too).
    metrics = run_metrics(n_prompt, 0.02, latencies, peak_memory=300 * MiB,
                          kv_bytes=capacity * bpt)
    yield Finished(reason=reason, tokens=tuple(tokens),
                   text="".join(" " + WORDS[t] for t in tokens), metrics=metrics)


def fake_ready():
    from engine.events import Ready
    return Ready(model="fake-model (synthetic events)", device="cpu", dtype="float32",
                 n_layers=N_LAYERS, n_heads=N_HEADS, n_kv_heads=N_KV, head_dim=HEAD_DIM,
                 max_seq_len=2048, backends=dict(BACKENDS),
                 fast={spec: FAST_UNAVAILABLE.get(spec) for spec in FAST_CHOICES})


def tiny_batch_model():
    """A tiny random Llama (2 layers, 64 wide) and a byte-level tokenizer (one token per UTF-8
    byte, so every id decodes): what the fake session's batches run on."""
    import torch
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

    from engine.config import ModelConfig
    from engine.model import Transformer
    from engine.tokenizer import Tokenizer
    cfg = ModelConfig.from_name("tiny-llama")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = Transformer(cfg)
        torch.nn.init.normal_(model.tok_emb.weight, std=0.2)    # varied outputs, not one spike
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = HFTokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    return SimpleNamespace(model=model.eval(), tokenizer=Tokenizer(backend, None, ()),
                           name="tiny-random (fake)", config=cfg)


class FakeSession(Session):
    """A real session (its race, its comparisons, its stepping) over fake_generate and a
    made-up model; its batches on the real batching engine with a tiny random model.
    step_delay: seconds slept after each batch step (a believable pace for the UI)."""

    step_delay = 0.0
    _batch_lm = None

    def _batch_engine(self, request):
        if FakeSession._batch_lm is None:
            FakeSession._batch_lm = tiny_batch_model()
        lm, self.lm = self.lm, FakeSession._batch_lm
        try:
            return super()._batch_engine(request)
        finally:
            self.lm = lm

    def batch(self, request):
        """One thread: a tiny model gains nothing from more, and the app's own thread (the
        UI, in this process) would wait for OpenMP's spinning workers."""
        import torch

        from engine.events import StepDone
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for env in super().batch(request):
                yield env
                if self.step_delay and isinstance(env.event, StepDone):
                    time.sleep(self.step_delay)
        finally:
            torch.set_num_threads(threads)

    def ready(self):
        return fake_ready()

    def _backend_options(self, cfg):
        return {}

    def _pause(self, request):
        if not request.step:
            return super()._pause(request)         # forced tokens: the engine's own pause
        from engine.stepping import Stepper
        stepper = Stepper(request.run_id, self.inbox, self.flag)

        def pause(run, logits, token):
            return (yield from stepper.pause(
                len(run.generated), len(run.seq), token,
                lambda: fake_step_events(run, token, request.config),
                run.tokenizer.token_text, len(WORDS)))
        return pause


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

    def _generate(self, model, tokenizer, prompt, cfg, cancel=None, steps=None, pause=None):
        return fake_generate(model, tokenizer, prompt, cfg, cancel, delay=self.delay,
                             diverge=self.diverge, flash_tile=self.flash_tile, pause=pause)

    def _open_session(self, progress):
        progress("loading fake model", 0.5)
        if self.load_error:
            raise FileNotFoundError(self.load_error)
        lm = SimpleNamespace(model=None, tokenizer=None, name="fake")
        session = FakeSession(lm, generate=self._generate, cancel=self.cancel_event)
        session.step_delay = self.delay
        return session

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
