"""Wall-clock timing that is right on a GPU: the one helper every measurement uses.

A CUDA kernel launch returns before the kernel has run, so `time.perf_counter()` around a call
measures the launch, not the work. Every timing here first waits for the device to finish
(`sync`) and then reads the clock, so on CUDA the interval covers the work; on the CPU `sync` does
nothing and the clock is read at once.

    sync(device)            wait for the device's queued work (CUDA), or nothing (CPU)
    clock(device)           sync, then time.perf_counter()
    timed(fn, device)       seconds of one call of fn, synced on both sides
    best_of / median_of     the best / the median of several timed calls
    StepClock(device)       a transformers logits processor that notes when each step's logits
                            arrive (generate() calls it once per new token): per-token latencies
                            of transformers, on the same clock as the engine's
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def sync(device) -> None:
    """Wait until the device has finished its queued work (CUDA only; None or CPU: nothing)."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def clock(device=None) -> float:
    """The time, once everything queued on `device` has run."""
    sync(device)
    return time.perf_counter()


def timed(fn: Callable[[], object], device=None) -> float:
    """Seconds one call of `fn` takes, the device's work included."""
    t0 = clock(device)
    fn()
    return clock(device) - t0


def best_of(fn: Callable[[], object], repeat: int, device=None) -> float:
    """The fastest of `repeat` calls: the machine's capability, with interference removed
    (bandwidth: what memory *can* deliver)."""
    return min(timed(fn, device) for _ in range(repeat))


def median_of(fn: Callable[[], object], repeat: int, device=None, warmup: int = 0) -> float:
    """The median of `repeat` calls after `warmup` untimed ones: a typical call, robust to a
    burst of load from elsewhere."""
    for _ in range(warmup):
        fn()
        sync(device)
    return statistics.median(timed(fn, device) for _ in range(repeat))


class StepClock:
    """A logits processor that changes nothing and notes when each step's logits arrive.

    transformers' generate() calls its logits processors once per new token, right after the
    forward pass, so with the time `start` was called, the gaps between the notes are the same
    per-token latencies the engine reports (engine/metrics.py turns either into TTFT/TPOT).
    """

    def __init__(self, device=None):
        self.device = device
        self.times: list[float] = []

    def start(self) -> float:
        """Note the start of a run (its first latency counts from here) and return it."""
        self.times.clear()
        self.t0 = clock(self.device)
        return self.t0

    def __call__(self, input_ids, scores):
        self.times.append(clock(self.device))
        return scores

    def latencies(self) -> list[float]:
        """Per-token latencies: [start → first token, then the gaps between tokens]."""
        stamps = [self.t0, *self.times]
        return [b - a for a, b in zip(stamps, stamps[1:])]
