"""Latency and throughput, defined once, used by the CLI, the UI and the bench.

    TTFT   time to first token: from the start of the run to the first generated token
           (prefill + the first sampling step)
    TPOT   time per output token after the first: (total − TTFT) / (N − 1)
    ITL    inter-token latencies: the gaps between consecutive tokens (p50, p99)
    prefill tokens/s = prompt tokens / prefill time
    decode tokens/s  = (N − 1) / (total − TTFT) = 1 / TPOT — never N / wall time, which would
           mix the one-off prefill into a per-token speed
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


def peak_memory_bytes(device) -> int:
    """CUDA: max allocated since the last reset. CPU: the process's peak resident set size.
    `device` is a torch.device; only a CUDA one needs torch, and it comes with it loaded."""
    if device.type == "cuda":
        import torch
        return int(torch.cuda.max_memory_allocated(device))
    import resource          # POSIX only; imported here so a replay on Windows can read events
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)   # Linux reports KiB


def compute_metrics(prompt_tokens: int, prefill_s: float, step_latencies: list[float],
                    device, kv_bytes: int) -> RunMetrics:
    """step_latencies[0] is the time to first token; the rest are the gaps between tokens."""
    n = len(step_latencies)
    total = sum(step_latencies)
    ttft = step_latencies[0] if n else float("nan")
    gaps = step_latencies[1:]
    tpot = (total - ttft) / (n - 1) if n > 1 else float("nan")
    return RunMetrics(
        prompt_tokens=prompt_tokens, new_tokens=n, total_s=total, ttft_s=ttft, tpot_s=tpot,
        itl_p50_s=percentile(gaps, 50), itl_p99_s=percentile(gaps, 99), prefill_s=prefill_s,
        prefill_tokens_per_s=prompt_tokens / prefill_s if prefill_s > 0 else float("nan"),
        decode_tokens_per_s=1.0 / tpot if n > 1 and tpot > 0 else float("nan"),
        peak_memory_bytes=peak_memory_bytes(device), kv_bytes=kv_bytes)

