"""How the cost of one decode step grows with position, for naive vs kv vs paged.

At position p, `naive` pushes all p tokens through the model again (the step costs about a
prefill of p tokens, so the run is O(T²)); `kv` and `paged` push one token and read p cached
K/V rows (O(T) per step, and at small p dominated by the weights, so nearly flat).

Each point runs the real `generate()` loop on a random prompt of p tokens and takes the median
of a few decode steps (index ≥ 1: the first token's time includes the prefill). The
strategies are interleaved at each point, as in the standard experiment, so a burst of load
from elsewhere does not fall on one curve only.
"""

from __future__ import annotations

import statistics
from typing import Callable

import torch

from ..config import GenerationConfig
from ..decoding import generate
from ..events import Token

SWEEP_STRATEGIES = ("naive", "kv", "paged")


def sweep_positions(device: torch.device, max_seq_len: int, sweep_max: int | None,
                    quick: bool) -> list[int]:
    """Positions to measure: a few hundred on a CPU, thousands on CUDA, within the context."""
    top = sweep_max or (4096 if device.type == "cuda" else 384)
    top = min(top, max_seq_len - 8)
    if quick:
        points = [16, 64, top]
    elif device.type == "cuda":
        points = [64, 256, 512, 1024, 2048, 3072, 4096, 6144, 8192]
    else:
        points = [16, 32, 64, 128, 192, 256, 320, 384, 512, 768, 1024]
    return sorted({p for p in points if p <= top} | {top})


def step_latency(lm, strategy: str, backend: str, position: int, steps: int,
                 block_size: int, seed: int) -> float:
    """Median decode-step latency (seconds) at `position`, through the real generation loop."""
    gen = torch.Generator().manual_seed(seed + position)
    ids = torch.randint(0, lm.config.vocab_size, (position,), generator=gen).tolist()
    cfg = GenerationConfig(strategy=strategy, backend=backend, max_new_tokens=steps + 1,
                           block_size=block_size, attention_rows=False, stop_at_eos=False)
    lat = [ev.latency_s for ev in generate(lm.model, lm.tokenizer, ids, cfg)
           if isinstance(ev, Token) and ev.index >= 1]
    return statistics.median(lat)


def length_sweep(lm, backend: str, positions: list[int], result: dict, block_size: int = 16,
                 seed: int = 0, quick: bool = False,
                 tick: Callable[[str], None] = lambda _: None) -> dict:
    """Fill result = {"backend", "positions", "step_s": {strategy: [...]}} in place."""
    result.update(backend=backend, positions=[], step_s={s: [] for s in SWEEP_STRATEGIES})
    for p in positions:
        point = {}
        for s in SWEEP_STRATEGIES:
            tick(f"sweep: {s} at position {p}")
            # naive re-runs the whole sequence each step: two steps are plenty (and costly).
            point[s] = step_latency(lm, s, backend, p, 2 if s == "naive" or quick else 4,
                                    block_size, seed)
        result["positions"].append(p)              # only whole points, so the curves align
        for s in SWEEP_STRATEGIES:
            result["step_s"][s].append(point[s])
    return result


def cumulative_s(positions: list[int], step_s: list[float], start: int, end: int) -> float:
    """Estimated time to decode every position from `start` to `end`: the area under the
    measured per-step curve (linear between points, flat beyond the ends)."""
    def at(p: float) -> float:
        if p <= positions[0]:
            return step_s[0]
        for (p0, s0), (p1, s1) in zip(zip(positions, step_s), zip(positions[1:], step_s[1:])):
            if p <= p1:
                return s0 + (s1 - s0) * (p - p0) / (p1 - p0)
        return step_s[-1]
    return sum(at(p) for p in range(start, end))


def summary(sweep: dict, prompt_tokens: int) -> dict:
    """The kv-cache speedup at the longest swept position, per step and over a whole run."""
    pos, st = sweep.get("positions") or [], sweep.get("step_s") or {}
    if not pos:
        return {}
    last = pos[-1]
    out = {"longest_position": last}
    for s in ("kv", "paged"):
        out[f"naive_over_{s}_step"] = st["naive"][-1] / st[s][-1]
        out[f"naive_over_{s}_cumulative"] = (cumulative_s(pos, st["naive"], prompt_tokens, last)
                                             / cumulative_s(pos, st[s], prompt_tokens, last))
    return out
