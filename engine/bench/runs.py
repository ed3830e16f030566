"""The standard experiment: every strategy × backend (and the transformers baseline) on one
prompt, warm-up then timed repetitions, each row checked against the naive reference.

Timing on a shared machine is noisy, so the repetitions are interleaved: pass 1 runs every row
once, pass 2 runs every row again, and so on. A burst of load from another process then slows
all rows a little instead of one row a lot, and the *ratios* between rows — the point of the
table — stay meaningful even when the absolute numbers drift.

The first pass keeps every step's logits; its tokens and logits are what the "identical" and
"max |Δ logits|" columns compare. It is normally an untimed warm-up; the timed passes then run
without logits, so copying them off the device is not part of any timing, and each timed run's
tokens are checked again (greedy decoding must give the same tokens every time). With
--warmup 0 (as in --quick) the first pass is also timed, logits copies and first-call costs
included.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..attention import available_backends, get_backend
from ..compare import compare as compare_runs
from ..config import ConfigError, FastPathConfig, GenerationConfig
from ..decoding import generate
from ..events import Finished, Token, run_label
from ..fast import STEPS
from ..metrics import RunMetrics
from .memory import PeakMemory
from .settings import BenchSettings

REFERENCE = ("naive", "naive")          # strategy, backend: the path everything is compared to
BASELINE = "transformers (cache)"       # the row every "× HF" ratio divides by
FIGURES = ("total_s", "ttft_s", "tpot_s", "prefill_s", "decode_tokens_per_s",
           "prefill_tokens_per_s", "peak_memory_bytes", "peak_added_bytes", "kv_bytes")


@dataclass(frozen=True, slots=True)
class Sample:
    """One timed run's figures (definitions in engine.metrics)."""
    total_s: float
    ttft_s: float
    tpot_s: float
    prefill_s: float
    decode_tokens_per_s: float
    prefill_tokens_per_s: float
    peak_memory_bytes: int            # high-water mark during this run (see bench.memory)
    peak_added_bytes: int             # … above what was in use when it started
    kv_bytes: int

    @classmethod
    def of(cls, m: RunMetrics, pm: PeakMemory) -> "Sample":
        return cls(total_s=m.total_s, ttft_s=m.ttft_s, tpot_s=m.tpot_s, prefill_s=m.prefill_s,
                   decode_tokens_per_s=m.decode_tokens_per_s,
                   prefill_tokens_per_s=m.prefill_tokens_per_s,
                   peak_memory_bytes=pm.absolute_bytes, peak_added_bytes=pm.peak_bytes,
                   kv_bytes=m.kv_bytes)


@dataclass(slots=True)
class Outcome:
    """What one run produced: its tokens, (optionally) every step's logits, its figures."""
    tokens: tuple[int, ...]
    logits: list[torch.Tensor] | None
    sample: Sample


Runner = Callable[[bool], Outcome]      # runner(keep_logits) → Outcome


@dataclass(slots=True)
class Row:
    label: str                          # "kv/sdpa", "kv/sdpa +fuse+cols", "transformers (cache)"
    kind: str                           # "engine" | "hf"
    strategy: str | None
    backend: str | None
    fast: str | None = None             # the fast-path variant ("fuse+cols"), if any
    runner: Runner | None = field(default=None, repr=False)
    samples: list[Sample] = field(default_factory=list)
    tokens: tuple[int, ...] = ()
    identical: bool | None = None       # same tokens as the naive reference
    first_difference: int | None = None
    max_abs_logit_diff: float | None = None
    unstable: bool = False              # a timed run gave other tokens than the warm-up run
    error: str | None = None
    setup_s: float | None = None        # the first pass's wall time: first-call costs included

    def stat(self, figure: str) -> dict:
        return summarise([getattr(s, figure) for s in self.samples])

    def median(self, figure: str) -> float:
        return self.stat(figure)["median"]

    def to_dict(self) -> dict:
        return {"label": self.label, "kind": self.kind, "strategy": self.strategy,
                "backend": self.backend, "fast": self.fast, "tokens": list(self.tokens),
                "identical": self.identical, "first_difference": self.first_difference,
                "max_abs_logit_diff": self.max_abs_logit_diff, "unstable": self.unstable,
                "error": self.error, "setup_s": self.setup_s, "repetitions": len(self.samples),
                "figures": {f: self.stat(f) for f in FIGURES},
                "samples": [{f: getattr(s, f) for f in FIGURES} for s in self.samples]}


def summarise(values: list[float]) -> dict:
    """Median and spread. spread_pct = half the range, as a percentage of the median."""
    vals = [v for v in values if v is not None and v == v]          # drop nan
    if not vals:
        return {"median": None, "min": None, "max": None, "spread_pct": None, "n": 0}
    med = statistics.median(vals)
    lo, hi = min(vals), max(vals)
    spread = 50.0 * (hi - lo) / med if med else 0.0
    return {"median": med, "min": lo, "max": hi, "spread_pct": spread, "n": len(vals)}


# ----------------------------------------------------------------------------- which rows
def pick_backends(settings: BenchSettings, device: torch.device) -> list[str]:
    """The backends asked for, or every one that runs natively here.

    A backend that needs CUDA but is "available" on a CPU only through an interpreter (Triton's
    TRITON_INTERPRET=1) is left out unless named: timing an interpreter says nothing useful.
    """
    if settings.backends is not None:
        for name in settings.backends:
            get_backend(name, device)          # a ConfigError says why it cannot run here
        return list(settings.backends)
    names = []
    for name in available_backends(device):
        if get_backend(name).caps.needs_cuda and device.type != "cuda":
            continue
        names.append(name)
    return names


def engine_runner(lm, ids: list[int], settings: BenchSettings, strategy: str,
                  backend: str, fast: str | None = None) -> Runner:
    device = lm.model.device
    extra = {"fast": FastPathConfig.from_spec(fast)} if fast else {}

    def run(keep_logits: bool) -> Outcome:
        cfg = GenerationConfig(strategy=strategy, backend=backend,
                               max_new_tokens=settings.max_new_tokens,
                               block_size=settings.block_size, attention_rows=False,
                               keep_logits=keep_logits, stop_at_eos=False, **extra)
        logits: list[torch.Tensor] = []
        finished = None
        with PeakMemory(device) as pm:
            for ev in generate(lm.model, lm.tokenizer, ids, cfg, steps=STEPS):
                if isinstance(ev, Token) and keep_logits:
                    logits.append(ev.logits)
                elif isinstance(ev, Finished):
                    finished = ev
        if finished is None or finished.metrics is None:
            raise RuntimeError(f"{strategy}/{backend} ended without a result")
        return Outcome(tokens=tuple(finished.tokens), logits=logits if keep_logits else None,
                       sample=Sample.of(finished.metrics, pm))
    return run


def compare(ref: Outcome, out: Outcome) -> tuple[bool, int | None, float | None]:
    """(identical tokens?, first differing step, max |Δ logits|), as engine/compare.py defines
    them (the logits over the steps where both runs had seen the same tokens)."""
    c = compare_runs(out.tokens, ref.tokens, out.logits, ref.logits)
    return c.identical, c.first_difference, c.max_logit_delta


# ----------------------------------------------------------------------------- the experiment
@dataclass(slots=True)
class StandardResult:
    prompt_ids: list[int]
    rows: list[Row] = field(default_factory=list)
    reference: Outcome | None = None
    passes_done: int = 0
    baseline_error: str | None = None

    def row(self, label: str) -> Row | None:
        return next((r for r in self.rows if r.label == label), None)


def build_rows(lm, settings: BenchSettings, ids: list[int], hf=None) -> list[Row]:
    device = lm.model.device
    backends = pick_backends(settings, device)
    rows = [Row(label=run_label(s, b), kind="engine", strategy=s, backend=b,
                runner=engine_runner(lm, ids, settings, s, b))
            for s in settings.strategies for b in backends]
    # Fast-path variants: on the kv cache with the first efficient backend (sdpa if present).
    fb = "sdpa" if "sdpa" in backends else next((b for b in backends if b != "naive"), "naive")
    rows += [Row(label=run_label("kv", fb, spec), kind="engine", strategy="kv", backend=fb,
                 fast=spec, runner=engine_runner(lm, ids, settings, "kv", fb, spec))
             for spec in settings.fast]
    if hf is not None:
        # generate() without its cache is the counterpart of the naive strategy: timed only
        # beside it (on a long prompt it recomputes hundreds of tokens per step).
        for use_cache in (True, False) if "naive" in settings.strategies else (True,):
            label = BASELINE if use_cache else "transformers (no cache)"
            rows.append(Row(label=label, kind="hf", strategy=None, backend=None,
                            runner=hf.runner(ids, settings.max_new_tokens, use_cache)))
    return rows


def standard_experiment(lm, settings: BenchSettings, result: StandardResult, hf=None,
                        tick: Callable[[str], None] = lambda _: None) -> StandardResult:
    """Fill `result` in place (so a Ctrl+C leaves everything measured so far in it)."""
    ids = result.prompt_ids
    if not result.rows:
        result.rows = build_rows(lm, settings, ids, hf)
    if not result.rows:
        raise ConfigError("nothing to measure: no strategy × backend can run here")
    ref_row = next((r for r in result.rows if (r.strategy, r.backend) == REFERENCE), None)
    if ref_row is None:                  # the reference runs anyway, untimed
        tick("naive/naive reference")
        result.reference = engine_runner(lm, ids, settings, *REFERENCE)(True)
    for p in range(settings.warmup + settings.repeat):
        warm = p < settings.warmup
        # The reference goes first in the correctness pass so every later row can be compared.
        order = sorted(result.rows, key=lambda r: r is not ref_row) if p == 0 else result.rows
        for row in order:
            tick(f"{'warm-up' if warm else f'pass {p - settings.warmup + 1}'}: {row.label}")
            if row.error:
                continue
            try:
                t0 = time.perf_counter()
                out = row.runner(p == 0)
                if p == 0:                      # preparing weights, building a C step, compiling
                    row.setup_s = time.perf_counter() - t0
            except (RuntimeError, ValueError) as exc:     # one broken backend, not the bench
                row.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}"
                continue
            if p == 0:
                row.tokens = out.tokens
                if row is ref_row:
                    result.reference = out
                row.identical, row.first_difference, row.max_abs_logit_diff = \
                    compare(result.reference, out)
            elif out.tokens != row.tokens:
                row.unstable = True
            if not warm:
                row.samples.append(out.sample)
        result.passes_done = p + 1
    # The logits are not needed any more, and 50 × vocab floats per row add up.
    if result.reference is not None:
        result.reference.logits = None
    return result
