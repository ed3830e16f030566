"""`bench --batch 1,2,4,8,16`: what continuous batching buys (docs/batching.md).

Decoding one token reads every weight once; at batch 1 that read — not arithmetic — sets the
speed. Serving B requests in one forward reads the weights once for B tokens. Two experiments,
in the same run:

    batch sizes    B requests (different prompts, greedy, the same number of new tokens, all
                   arriving at once) served together: aggregate decode tokens/s and per-request
                   TPOT against B, and whether every request got exactly the tokens it gets
                   alone (engine.decoding.generate) — the "identical" column. One request
                   through generate() itself is timed in every pass too ("× alone")
    shared prefix  8 requests sharing a 200-token system prompt, with and without prefix
                   caching: peak KV blocks in use, the hit rate, identical tokens; and what a
                   contiguous cache per request would have reserved

The batch sizes run in lockstep (one engine each, taking turns one step at a time, each timed
on its own clock: OwnClock) so that load from elsewhere on a shared machine falls on every row
alike, step by step; `--no-lockstep` runs one size after another, pass after pass. Either way
the ratios between rows are the result: "× batch 1" is the median of each pass's own ratio,
with the lowest and highest. The batch engine multiplies by its packed projections
(engine/packed_linear.py) at every batch size alike, or by the model's own with
`--plain-weights`; "× alone" compares with generate() on the model's own weights.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .. import events as be
from ..batch import BatchEngine, serve
from ..config import ConfigError, FastPathConfig, GenerationConfig
from ..decoding import run_to_end
from ..fast import STEPS
from ..packed_linear import can_pack
from ..scheduler import SchedulerConfig
from ..units import format_ms, format_number
from .runs import summarise

PROMPTS = ("Deep learning is", "The capital of France is", "Once upon a time",
           "def fibonacci(n):", "The three primary colours are", "Water boils at",
           "My favourite book is", "In 1969, the first", "A good recipe for bread",
           "The stock market today", "Photosynthesis is the process", "The best way to learn",
           "Quantum computers can", "In the beginning there was", "The weather in London",
           "Music is")
SYSTEM_TOKENS = 200
SYSTEM = ("You are a careful, friendly assistant for a small engineering team. Answer in plain "
          "English, in at most three sentences, and say so when you are not sure. Prefer "
          "concrete examples to general advice. When a question is about code, name the "
          "function or file you mean, and never invent an API that you have not seen. When a "
          "question is about numbers, show the arithmetic. Keep units consistent, and round "
          "to two significant figures unless asked otherwise. If the question is ambiguous, "
          "answer the most likely reading first and then mention the other one briefly. Do "
          "not repeat the question back. Do not apologise. Be direct, be kind, be brief, and "
          "stop when the answer is complete. ")
QUESTIONS = ("What is a KV cache?", "Why is decoding memory-bound?", "What does RoPE rotate?",
             "What is a block table?", "Why share prefix blocks?", "What is preemption?",
             "What is chunked prefill?", "What limits the batch size?")


@dataclass(slots=True)
class BatchBenchSettings:
    sizes: tuple[int, ...] = (1, 2, 4, 8, 16)
    max_new_tokens: int = 50
    repeat: int = 3
    warmup: int = 1
    block_size: int = 16
    backend: str = "sdpa"
    prefix: bool = True                 # the shared-prefix experiment too
    fast: tuple[str, ...] = ()          # also time one request alone with these fast paths
    packed: bool = True                 # the batch engine's packed projections (every row)
    lockstep: bool = True               # the batch sizes take turns, one step each

    def __post_init__(self) -> None:
        self.sizes = tuple(self.sizes)
        if not self.sizes or any(b < 1 for b in self.sizes):
            raise ConfigError(f"--batch wants batch sizes ≥ 1, like 1,2,4,8, got "
                              f"{','.join(map(str, self.sizes)) or 'nothing'}")
        if self.max_new_tokens < 2:
            raise ConfigError("the batch bench needs --max-new-tokens ≥ 2 (TPOT needs two)")
        if self.repeat < 1 or self.warmup < 0:
            raise ConfigError("--repeat must be ≥ 1 and --warmup ≥ 0")
        self.fast = tuple(self.fast)
        for spec in self.fast:
            FastPathConfig.from_spec(spec)          # a bad name fails before anything loads


@dataclass(slots=True)
class BatchRow:
    batch: int
    decode_tokens_per_s: list[float] = field(default_factory=list)   # one per timed pass
    tpot_p50_s: list[float] = field(default_factory=list)
    ttft_p50_s: list[float] = field(default_factory=list)
    identical: int = 0                  # requests whose tokens equal their lone run
    steps: int = 0

    def to_dict(self) -> dict:
        decode = summarise(self.decode_tokens_per_s)          # the standard experiment's stats
        return {"batch": self.batch, "decode_tokens_per_s": decode["median"],
                "decode_spread_pct": decode["spread_pct"] if decode["n"] > 1 else None,
                "tpot_p50_s": summarise(self.tpot_p50_s)["median"],
                "ttft_p50_s": summarise(self.ttft_p50_s)["median"],
                "identical": self.identical, "requests": self.batch, "steps": self.steps,
                "samples": list(self.decode_tokens_per_s)}


def batch_prompts(tokenizer, n: int) -> list[list[int]]:
    """n different prompts as token ids (the built-in ones, numbered past the 16th)."""
    out = []
    for i in range(n):
        text = PROMPTS[i % len(PROMPTS)] + (f" ({i // len(PROMPTS)})" if i >= len(PROMPTS) else "")
        out.append(tokenizer.encode(text))
    return out


def shared_prefix_prompts(tokenizer, n: int = 8, system_tokens: int = SYSTEM_TOKENS
                          ) -> list[list[int]]:
    """n requests: the same `system_tokens`-token system prompt, then a different question."""
    system = tokenizer.encode(SYSTEM)
    while len(system) < system_tokens:
        system += tokenizer.encode(SYSTEM)
    system = system[:system_tokens]
    return [system + tokenizer.encode(" " + QUESTIONS[i % len(QUESTIONS)]) for i in range(n)]


def make_engine(lm, prompts: list[list[int]], cfg: GenerationConfig, block_size: int,
                backend: str, prefix_caching: bool = True, packed: bool = True,
                clock: Callable[[], float] = time.perf_counter) -> BatchEngine:
    """An engine with room for all of `prompts` at once (no preemption)."""
    longest = max(len(p) for p in prompts) + cfg.max_new_tokens
    blocks = len(prompts) * -(-longest // block_size)
    sched = SchedulerConfig(max_batch=len(prompts), block_size=block_size, num_blocks=blocks,
                            max_step_tokens=max(512, sum(len(p) for p in prompts)),
                            prefix_caching=prefix_caching)
    return BatchEngine(lm.model, lm.tokenizer, sched, backend=backend, snapshots=False,
                       packed=packed, clock=clock)


def run_batch(lm, prompts: list[list[int]], cfg: GenerationConfig, block_size: int,
              backend: str, prefix_caching: bool = True, packed: bool = True
              ) -> tuple[BatchEngine, list]:
    """Serve `prompts` together (all arriving at once) and return the engine and its events."""
    engine = make_engine(lm, prompts, cfg, block_size, backend, prefix_caching, packed)
    events = list(serve(engine, [(0.0, p, cfg) for p in prompts]))
    return engine, events


class OwnClock:
    """A clock that runs only while its own engine steps. In lockstep the batch sizes take
    turns, one step each, so load that comes and goes on a shared machine falls on every batch
    size alike, step by step; the time an engine waits for the others' steps is not its own,
    so its figures (TTFT, TPOT, tok/s: engine/metrics.py) are those of its own steps."""

    def __init__(self) -> None:
        self.spent, self.since = 0.0, None

    def __call__(self) -> float:
        running = time.perf_counter() - self.since if self.since is not None else 0.0
        return self.spent + running

    def step(self, engine: BatchEngine) -> list:
        self.since = time.perf_counter()
        try:
            return engine.step()
        finally:
            self.spent += time.perf_counter() - self.since
            self.since = None


def lockstep_batches(lm, groups: dict[int, list[list[int]]], cfg: GenerationConfig,
                     s: "BatchBenchSettings") -> dict[int, list]:
    """Each group of prompts served by its own engine (all arriving at once), the engines
    stepping in turn; every group's events, its BatchSummary last."""
    clocks = {b: OwnClock() for b in groups}
    engines = {b: make_engine(lm, prompts, cfg, s.block_size, s.backend, packed=s.packed,
                              clock=clocks[b]) for b, prompts in groups.items()}
    for b, engine in engines.items():
        for p in groups[b]:
            engine.add(p, cfg, arrival_s=0.0)
    events: dict[int, list] = {b: [] for b in groups}
    while any(engine.has_work() for engine in engines.values()):
        for b, engine in engines.items():
            if engine.has_work():
                events[b] += clocks[b].step(engine)
    for b, engine in engines.items():
        events[b].append(engine.summary())
    return events


def tokens_by_request(events) -> dict[int, tuple[int, ...]]:
    return {e.request: e.tokens for e in events if isinstance(e, be.RequestFinished)}


def alone_tokens(lm, prompts: list[list[int]], cfg: GenerationConfig,
                 tick: Callable[[str], None] = lambda _: None) -> list[tuple[int, ...]]:
    """Each prompt through engine.decoding.generate, on its own: the reference."""
    out = []
    for i, p in enumerate(prompts):
        tick(f"batch: request {i + 1}/{len(prompts)} alone (the reference)")
        out.append(run_to_end(lm.model, lm.tokenizer, p, cfg)[1].tokens)
    return out


def batch_sizes(lm, s: BatchBenchSettings, result: dict,
                tick: Callable[[str], None] = lambda _: None) -> dict:
    """Fill result["rows"] in place (Ctrl+C keeps what was measured)."""
    cfg = GenerationConfig(max_new_tokens=s.max_new_tokens, attention_rows=False,
                           stop_at_eos=False)
    prompts = batch_prompts(lm.tokenizer, max(s.sizes))
    reference = alone_tokens(lm, prompts, cfg, tick)
    rows = {b: BatchRow(batch=b) for b in s.sizes}
    result["rows"] = rows
    # generate() on the first prompt, once per timed pass: plain, then each fast path asked for
    alone = result["alone"] = {spec: [] for spec in ("", *s.fast)}
    for p in range(s.warmup + s.repeat):
        for spec in alone if p >= s.warmup else ():
            label = "generate" + (f" +{spec}" if spec else "")
            tick(f"batch: pass {p - s.warmup + 1}, one request alone ({label})")
            c = dataclasses.replace(cfg, fast=FastPathConfig.from_spec(spec))
            alone[spec].append(run_to_end(lm.model, lm.tokenizer, prompts[0], c, steps=STEPS)[1]
                               .metrics.decode_tokens_per_s)
        name = 'warm-up' if p < s.warmup else f'pass {p - s.warmup + 1}'
        if s.lockstep:
            tick(f"batch: {name}, batch sizes {','.join(map(str, s.sizes))} in lockstep")
            runs = lockstep_batches(lm, {b: prompts[:b] for b in s.sizes}, cfg, s)
        for b in s.sizes:
            if s.lockstep:
                events = runs[b]
            else:
                tick(f"batch: {name}, batch {b}")
                events = run_batch(lm, prompts[:b], cfg, s.block_size, s.backend,
                                   packed=s.packed)[1]
            summary = events[-1]
            row = rows[b]
            if p == 0:
                got = tokens_by_request(events)
                row.identical = sum(got[i] == reference[i] for i in range(b))
                row.steps = summary.steps
            if p >= s.warmup:
                row.decode_tokens_per_s.append(summary.decode_tokens_per_s)
                row.tpot_p50_s.append(summary.tpot_p50_s)
                row.ttft_p50_s.append(summary.ttft_p50_s)
    return result


def shared_prefix(lm, s: BatchBenchSettings, result: dict,
                  tick: Callable[[str], None] = lambda _: None) -> dict:
    """8 requests with one 200-token system prompt, prefix caching on and off."""
    cfg = GenerationConfig(max_new_tokens=s.max_new_tokens, attention_rows=False,
                           stop_at_eos=False)
    prompts = shared_prefix_prompts(lm.tokenizer)
    reference = alone_tokens(lm, prompts, cfg, tick)
    result.update(requests=len(prompts), system_tokens=SYSTEM_TOKENS,
                  prompt_tokens=[len(p) for p in prompts], block_size=s.block_size)
    for caching in (True, False):
        tick(f"batch: shared prefix, prefix caching {'on' if caching else 'off'}")
        engine, events = run_batch(lm, prompts, cfg, s.block_size, s.backend, caching,
                                   s.packed)
        summary = events[-1]
        got = tokens_by_request(events)
        result["on" if caching else "off"] = {
            "peak_blocks_used": summary.peak_blocks_used,
            "peak_contiguous_blocks": summary.peak_contiguous_blocks,
            "prefix_hit_rate": summary.prefix_hit_rate,
            "decode_tokens_per_s": summary.decode_tokens_per_s,
            "ttft_p50_s": summary.ttft_p50_s,
            "identical": sum(got[i] == reference[i] for i in range(len(prompts)))}
    on, off = result["on"], result["off"]
    result["blocks_ratio"] = on["peak_blocks_used"] / off["peak_blocks_used"]
    return result


def run_batch_bench(lm, s: BatchBenchSettings, doc: dict,
                    tick: Callable[[str], None] = lambda _: None) -> dict:
    """Both experiments into doc["batch"]; the headline ratios the targets speak of."""
    out = doc.setdefault("batch", {"settings": {
        "sizes": list(s.sizes), "max_new_tokens": s.max_new_tokens, "repeat": s.repeat,
        "warmup": s.warmup, "block_size": s.block_size, "backend": s.backend,
        "fast": list(s.fast), "threads": torch.get_num_threads(),
        "projections": projections(lm.model, s.packed), "lockstep": s.lockstep}})
    sizes: dict = {}
    out["_sizes"] = sizes
    batch_sizes(lm, s, sizes, tick)
    if s.prefix:
        out["prefix"] = {}
        shared_prefix(lm, s, out["prefix"], tick)
    return doc


def finish(doc: dict) -> None:
    """Live rows → plain data, with each row's speed-up over batch 1."""
    out = doc.get("batch")
    if not out:
        return
    sizes = out.pop("_sizes", {})
    rows = [r.to_dict() for r in (sizes.get("rows") or {}).values()]
    base = next((r for r in rows if r["batch"] == 1 and r["decode_tokens_per_s"]), None)
    runs = sizes.get("alone") or {}
    alone = runs.get("") or []
    out["alone_decode_tokens_per_s"] = statistics.median(alone) if alone else None
    out["alone_fast_decode_tokens_per_s"] = {spec: statistics.median(v) if v else None
                                             for spec, v in runs.items() if spec}
    for r in rows:
        # Each pass ran every batch size back to back, so a pass's own ratio compares rows
        # measured under the same load: the median of those is the figure, with its range.
        per_pass = ([b / a for a, b in zip(base["samples"], r["samples"]) if a and b]
                    if base else [])
        ratio = summarise(per_pass)
        r["over_batch_1"] = ratio["median"]
        r["over_batch_1_min"], r["over_batch_1_max"] = ratio["min"], ratio["max"]
        r["over_batch_1_per_pass"] = per_pass
        r["over_alone"] = (r["decode_tokens_per_s"] / out["alone_decode_tokens_per_s"]
                           if alone and r["decode_tokens_per_s"] else None)
    out["rows"] = rows


def projections(model, packed: bool) -> str:
    """How the batch engine multiplies by the weights (the same for every batch size)."""
    return ("fused, packed for oneDNN (engine/packed_linear.py)"
            if packed and can_pack(model) else "the model's own nn.Linear (F.linear)")


# ----------------------------------------------------------------------------- one document
def parse_sizes(text: str) -> tuple[int, ...]:
    """"1,2,4,8" → (1, 2, 4, 8); a ConfigError (one line) for anything else."""
    try:
        sizes = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"--batch wants batch sizes like 1,2,4,8, got {text!r}") from None
    BatchBenchSettings(sizes=sizes)                 # validates
    return sizes


def bench_document(s: BatchBenchSettings, model: str | None, device: str, dtype: str,
                   threads: int | None, tick: Callable[[str], None] = lambda _: None,
                   set_total: Callable[[int], None] = lambda _: None, loaded=None) -> dict:
    """Load, run both experiments, and return one JSON-ready dictionary (Ctrl+C: what was
    measured so far, marked interrupted)."""
    import datetime as _dt
    from ..loader import load_model
    from .experiment import _plain, environment
    doc: dict = {"schema": "minillm-bench-batch/1", "complete": False, "interrupted": False,
                 "started_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    n_prompts = max(s.sizes) + (8 if s.prefix else 0)
    set_total(1 + n_prompts + (s.warmup + s.repeat) * (1 if s.lockstep else len(s.sizes))
              + s.repeat * (1 + len(s.fast)) + (2 if s.prefix else 0))
    try:
        tick("loading the model")
        lm = loaded or load_model(model, device, dtype)
        doc["environment"] = environment(lm.model.device, lm.model.dtype)
        doc["model"] = {"name": lm.name, "parameters": lm.model.num_parameters(),
                        "weight_bytes": lm.model.weight_bytes()}
        run_batch_bench(lm, s, doc, tick)
        doc["complete"] = True
    except KeyboardInterrupt:
        doc["interrupted"] = True
    finally:
        torch.set_num_threads(before)
    doc["duration_s"] = time.perf_counter() - t0
    finish(doc)
    clean = _plain(doc)
    doc.clear()
    doc.update(clean)
    return doc


# ----------------------------------------------------------------------------- GPU rows
def numbered_tokenizer(vocab_size: int):
    """A tokenizer for random weights, whose tokens mean nothing: id i is the word <i>."""
    from tokenizers import Tokenizer as HFTokenizer, models
    from ..tokenizer import Tokenizer
    vocab = {f"<{i}>": i for i in range(vocab_size)}
    return Tokenizer(HFTokenizer(models.WordLevel(vocab=vocab, unk_token="<0>")))


def throughput_table(model, sizes=(1, 2, 4, 8, 16, 32, 64), backends=("sdpa",),
                     new_tokens: int = 32, prompt_tokens: int = 128, block_size: int = 16,
                     seed: int = 0) -> str:
    """A Markdown table for scripts/gpu_check.py: aggregate decode tok/s and per-request TPOT
    for each batch size and attention backend, on random prompts (random weights: the speed is
    what counts; in bfloat16 a batch may round differently from a lone run, so tokens are not
    compared here — the tests compare them in float32/float64)."""
    from types import SimpleNamespace
    lm = SimpleNamespace(model=model, tokenizer=numbered_tokenizer(model.cfg.vocab_size))
    cfg = GenerationConfig(max_new_tokens=new_tokens, attention_rows=False, stop_at_eos=False)
    gen = torch.Generator().manual_seed(seed)
    lines = ["| backend | " + " | ".join(f"B={b}" for b in sizes) + " |",
             "|---|" + "---:|" * len(sizes)]
    for name in backends:
        run_batch(lm, [[1] * 8], GenerationConfig(max_new_tokens=2, attention_rows=False,
                                                  stop_at_eos=False), block_size, name)  # warm-up
        cells = []
        for b in sizes:
            prompts = torch.randint(0, model.cfg.vocab_size, (b, prompt_tokens),
                                    generator=gen).tolist()
            try:
                _, events = run_batch(lm, prompts, cfg, block_size, name)
                s = events[-1]
                cells.append(f"{format_number(s.decode_tokens_per_s, '{:.0f}')} tok/s · "
                             f"{format_ms(s.tpot_p50_s, '{:.3g}')} ms")
            except torch.OutOfMemoryError:
                torch.cuda.empty_cache()
                cells.append("OOM")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
