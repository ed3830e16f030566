"""Latency and throughput, defined once, used by the CLI, the UI and the bench.

    TTFT   time to first token: from the start of the run to the first generated token
           (prefill + the first sampling step)
    TPOT   time per output token after the first: (total − TTFT) / (N − 1)
    ITL    inter-token latencies: the gaps between consecutive tokens (p50, p99)
    prefill tokens/s = prompt tokens / prefill time
    decode tokens/s  = (N − 1) / (total − TTFT) = 1 / TPOT — never N / wall time, which would
           mix the one-off prefill into a per-token speed

Many requests served together (engine/batch.py) — `BatchMetrics`:
    per request     TTFT from the request's *arrival* (queueing counts: the user waits), TPOT
                    as above; reported as p50 / p99 over the requests
    tokens/s        every new token / wall time (first arrival → last token)
    decode tokens/s Σ (N_i − 1) / (last token of any request − first token of any request):
                    the batch's decode throughput; for one request it is 1 / TPOT again
    prefix hit rate prompt tokens found in the prefix cache / prompt tokens looked up
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass

# No torch here: RunMetrics travels inside engine.events, which a replay without torch reads.


@dataclass(frozen=True, slots=True)
class RunMetrics:
    prompt_tokens: int
    new_tokens: int
    total_s: float
    ttft_s: float
    tpot_s: float                     # nan when fewer than 2 tokens
    itl_p50_s: float
    itl_p99_s: float
    prefill_s: float
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    peak_memory_bytes: int
    kv_bytes: int

    def to_dict(self) -> dict:
        return asdict(self)


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]); nan for an empty list."""
    if not values:
        return float("nan")
    s = sorted(values)
    idx = (len(s) - 1) * q / 100.0
    lo = int(idx)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (idx - lo)


def p50_p99(values: list[float]) -> tuple[float, float]:
    """The median and the 99th percentile (nan for an empty list)."""
    return percentile(values, 50), percentile(values, 99)


def peak_memory_bytes(device) -> int:
    """CUDA: max allocated since the last reset. CPU: the process's peak resident set size.
    `device` is a torch.device; only a CUDA one needs torch, and it comes with it loaded.
    None: measured elsewhere (a remote server's memory is not this process's) — 0."""
    if device is None:
        return 0
    if device.type == "cuda":
        import torch
        return int(torch.cuda.max_memory_allocated(device))
    import resource          # POSIX only; imported here so a replay on Windows can read events
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)   # Linux reports KiB


def ttft_s(step_latencies: list[float]) -> float:
    """TTFT: the first token's latency (it carries the prefill); nan before any token."""
    return step_latencies[0] if step_latencies else float("nan")


def tpot_s(step_latencies: list[float]) -> float:
    """TPOT: (total − TTFT) / (N − 1), the mean gap after the first token; nan below two."""
    n = len(step_latencies)
    return (sum(step_latencies) - step_latencies[0]) / (n - 1) if n > 1 else float("nan")


def decode_tokens_per_s(tpot: float) -> float:
    """Decode tokens/s = 1 / TPOT (nan when TPOT is nan or not positive)."""
    return 1.0 / tpot if tpot > 0 else float("nan")        # nan > 0 is False


def run_metrics(prompt_tokens: int, prefill_s: float, step_latencies: list[float],
                peak_memory: int, kv_bytes: int) -> RunMetrics:
    """Every figure of one run from its per-token latencies (step_latencies[0] is the time to
    first token; the rest are the gaps between tokens). No torch: the app's synthetic engine
    (tui/fake_engine.py) uses this too, with a peak it makes up."""
    n = len(step_latencies)
    ttft, tpot = ttft_s(step_latencies), tpot_s(step_latencies)
    gaps = step_latencies[1:]
    return RunMetrics(
        prompt_tokens=prompt_tokens, new_tokens=n, total_s=sum(step_latencies), ttft_s=ttft,
        tpot_s=tpot, itl_p50_s=percentile(gaps, 50), itl_p99_s=percentile(gaps, 99),
        prefill_s=prefill_s,
        prefill_tokens_per_s=prompt_tokens / prefill_s if prefill_s > 0 else float("nan"),
        decode_tokens_per_s=decode_tokens_per_s(tpot), peak_memory_bytes=peak_memory,
        kv_bytes=kv_bytes)


def compute_metrics(prompt_tokens: int, prefill_s: float, step_latencies: list[float],
                    device, kv_bytes: int) -> RunMetrics:
    """run_metrics with the process's (or the CUDA allocator's) peak memory on `device`."""
    return run_metrics(prompt_tokens, prefill_s, step_latencies, peak_memory_bytes(device),
                       kv_bytes)


@dataclass(frozen=True, slots=True)
class BatchMetrics:
    requests: int               # requests with at least one token
    new_tokens: int
    wall_s: float
    tokens_per_s: float
    decode_tokens_per_s: float  # nan when no request has two tokens
    ttft_p50_s: float
    ttft_p99_s: float
    tpot_p50_s: float
    tpot_p99_s: float
    prefix_hit_rate: float      # nan when nothing was looked up

    def to_dict(self) -> dict:
        return asdict(self)


def tokens_per_s(tokens: int, wall_s: float) -> float:
    """A batch's aggregate throughput: every new token / wall time (nan before any time)."""
    return tokens / wall_s if wall_s > 0 else float("nan")


def compute_batch_metrics(runs: list[RunMetrics], spans: list[tuple[float, float]],
                          wall_s: float, hit_tokens: int = 0,
                          lookup_tokens: int = 0) -> BatchMetrics:
    """runs: each request's figures from compute_metrics, its first step latency measured from
    its arrival; spans: each request's (first token, last token) times, on one clock."""
    new = sum(r.new_tokens for r in runs)
    ttft_p50, ttft_p99 = p50_p99([r.ttft_s for r in runs if r.new_tokens])
    tpot_p50, tpot_p99 = p50_p99([r.tpot_s for r in runs if r.new_tokens > 1])
    after_first = sum(max(r.new_tokens - 1, 0) for r in runs)
    span = max((b for _, b in spans), default=0.0) - min((a for a, _ in spans), default=0.0)
    return BatchMetrics(
        requests=sum(1 for r in runs if r.new_tokens), new_tokens=new, wall_s=wall_s,
        tokens_per_s=tokens_per_s(new, wall_s),
        decode_tokens_per_s=after_first / span if after_first and span > 0 else float("nan"),
        ttft_p50_s=ttft_p50, ttft_p99_s=ttft_p99, tpot_p50_s=tpot_p50, tpot_p99_s=tpot_p99,
        prefix_hit_rate=hit_tokens / lookup_tokens if lookup_tokens else float("nan"))
