"""CPU threads: how many cores PyTorch's kernels use.

A decode step is ~200 matrix–vector products of a few hundred microseconds each, plus ~600 tiny
element-wise ops. Splitting a tiny op across threads costs a fork/join (an OpenMP barrier) that
can exceed the op itself, and the big GEMVs are limited by memory bandwidth, which one core on a
small VM may already nearly saturate. Worse, when other processes share the cores, an OpenMP
barrier waits for a thread that is not scheduled: we measured a 40-key decode attention take
~30 µs with one thread and ~1.3 ms with two while the machine was loaded.

So: on a dedicated machine, one thread per *physical* core (PyTorch's default) is right; on a
shared or oversubscribed one, fewer threads than cores is faster and far more predictable. The
option sets it for the whole process (PyTorch has no per-call setting); None leaves it alone.
"""

from __future__ import annotations

import os

import torch


def threads_beside(reserved_cores: int = 1) -> int:
    """Threads for an engine that shares the machine with another busy process (the app).

    PyTorch takes every core by default. With the app drawing on one of them, each OpenMP
    region of a decode step waits at its barrier for the thread the app's repaint displaced:
    on the 2-core machine the engine's decode rate fell by ~45 % with the app attached (7–8.5
    → 4.3 tok/s, docs/ui.md). Leaving `reserved_cores` to the other process removes that.
    """
    if os.environ.get("MINILLM_ENGINE_THREADS", "").isdigit():       # the user knows best
        return max(1, int(os.environ["MINILLM_ENGINE_THREADS"]))
    cores = os.cpu_count() or 1
    return max(1, min(torch.get_num_threads(), cores - reserved_cores))


def apply_threads(threads: int | None) -> None:
    if threads is not None and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
