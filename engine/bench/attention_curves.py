"""The attention curves stage: how much memory and time one attention call costs, per backend
and sequence length (`bench --sweep` draws them; scripts/gpu_check.py tables them).

This is the experiment behind the O(T²)-versus-O(T) story: `naive` materialises a (Tq × Tk)
score matrix per head, so a prefill of T tokens needs memory growing as T²; `sdpa`, `flash` and
`triton` keep one tile of scores at a time, so theirs grows as T (the output and the inputs).

What is measured, for one call `backend.attend(q, k, v, q_offset)` on random inputs:

    seconds      the median of `repeat` calls after one warm-up call. On CUDA, timed with CUDA
                 events around the call (the GPU's own clock: kernel launches are asynchronous);
                 on the CPU with engine/timing.py's median_of.
    peak_bytes   the peak of memory allocated *during* the call above what was allocated before
                 it (the inputs are not counted; the output is). On CUDA: torch.cuda
                 max_memory_allocated after reset_peak_memory_stats, minus memory_allocated
                 before. On the CPU, where PyTorch keeps no such counter, by accounting: a
                 TorchDispatchMode sees every tensor each PyTorch operation creates, adds the
                 size of each new storage and subtracts it when the storage is freed, and keeps
                 the peak. Scratch memory *inside* one fused operation (SDPA's per-thread tiles,
                 a Triton kernel's registers) is invisible to it — small, and constant in T.

Decode is measured as one new query against a cache of `length` keys; prefill as `length`
queries against `length` keys. The shape defaults are SmolLM2-135M's (9 heads, 3 K/V heads,
head dim 64).
"""

from __future__ import annotations

import statistics
import weakref
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ..attention import available_backends, get_backend
from ..timing import median_of, sync
from ..units import format_bytes, format_seconds

LENGTHS = (128, 256, 512, 1024, 2048, 4096, 8192)
CPU_MAX_LENGTH = 2048          # naive prefill at 2048 already holds ~0.5 GB of scores
INTERPRETED_MAX_LENGTH = 256   # Triton's interpreter runs kernels in NumPy: very slow


@dataclass(frozen=True, slots=True)
class AttentionCost:
    backend: str
    phase: str                 # "prefill" | "decode"
    length: int                # keys attended to (= queries, for prefill)
    seconds: float             # median time of one call
    peak_bytes: int            # peak extra memory during one call (output included)
    method: str                # "cuda" (events + allocator) | "cpu" (timer + tensor accounting)


class _TensorAccounting(TorchDispatchMode):
    """Adds up the storages PyTorch operations create while active, and keeps the peak."""

    def __init__(self):
        super().__init__()
        self.live, self.peak = 0, 0
        self._seen: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                self._track(t.untyped_storage())
        return out

    def _track(self, storage) -> None:
        key = storage.data_ptr()
        if key in self._seen or storage.nbytes() == 0:   # a view, or an in-place result
            return
        self._seen.add(key)
        self.live += storage.nbytes()
        self.peak = max(self.peak, self.live)
        # PyTorch keeps one Python object per live storage, so this fires when the memory goes.
        weakref.finalize(storage, self._free, key, storage.nbytes())

    def _free(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.live -= nbytes


def _inputs(phase: str, length: int, n_heads: int, n_kv: int, head_dim: int, dtype, device):
    g = torch.Generator().manual_seed(length)
    tq = length if phase == "prefill" else 1
    q = torch.randn(1, n_heads, tq, head_dim, generator=g)        # (1, H, Tq, hd)
    k = torch.randn(1, n_kv, length, head_dim, generator=g)       # (1, n_kv, T, hd)
    v = torch.randn(1, n_kv, length, head_dim, generator=g)
    return (*(t.to(device, dtype) for t in (q, k, v)), length - tq)


@torch.inference_mode()
def measure_call(backend, phase: str, length: int, n_heads: int = 9, n_kv: int = 3,
                 head_dim: int = 64, dtype=torch.float32, device="cpu",
                 repeat: int = 3) -> AttentionCost:
    """Time and peak extra memory of one `backend.attend` call (see the module docstring)."""
    device = torch.device(device)
    q, k, v, q_offset = _inputs(phase, length, n_heads, n_kv, head_dim, dtype, device)
    backend.attend(q, k, v, q_offset)                 # warm-up: compilation, caches, autotune
    if device.type == "cuda":
        times = []
        sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        for _ in range(repeat):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            backend.attend(q, k, v, q_offset)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        peak = torch.cuda.max_memory_allocated(device) - before
        seconds, method = statistics.median(times), "cuda"
    else:
        with _TensorAccounting() as acct:
            out = backend.attend(q, k, v, q_offset)
            del out
        peak = acct.peak
        seconds, method = median_of(lambda: backend.attend(q, k, v, q_offset), repeat), "cpu"
    return AttentionCost(backend.name, phase, length, seconds, int(peak), method)


def measure_backends(backends: list[str] | None = None, lengths=LENGTHS,
                     phases=("prefill", "decode"), device="cpu", dtype=torch.float32,
                     tile: int = 64, **shape) -> list[AttentionCost]:
    """Every (backend, phase, length) that fits: lengths above CPU_MAX_LENGTH are dropped on
    the CPU, and the Triton interpreter stops at INTERPRETED_MAX_LENGTH."""
    device = torch.device(device)
    names = backends or available_backends(device)
    out = []
    for name in names:
        backend = get_backend(name, device, tile=tile)
        limit = {"cuda": max(lengths)}.get(device.type, CPU_MAX_LENGTH)
        if name == "triton" and device.type != "cuda":
            limit = INTERPRETED_MAX_LENGTH
        for phase in phases:
            for length in (n for n in lengths if n <= limit):
                out.append(measure_call(backend, phase, length, device=device, dtype=dtype,
                                        **shape))
    return out


def format_table(costs: list[AttentionCost]) -> str:
    """A Markdown table: one row per backend and phase, time and memory per length."""
    lengths = sorted({c.length for c in costs})
    head = "| backend | phase | " + " | ".join(f"T={n}" for n in lengths) + " |"
    rule = "|---|---|" + "---|" * len(lengths)
    rows = [head, rule]
    for name in dict.fromkeys(c.backend for c in costs):
        for phase in dict.fromkeys(c.phase for c in costs):
            cells = {c.length: c for c in costs if c.backend == name and c.phase == phase}
            if not cells:
                continue
            rows.append(f"| {name} | {phase} | " + " | ".join(
                f"{format_seconds(cells[n].seconds)} · {format_bytes(cells[n].peak_bytes)}"
                if n in cells else "—"
                for n in lengths) + " |")
    return "\n".join(rows)



def attention_curves(device, lm, backends: list[str], quick: bool,
                     tick=lambda _: None) -> list[dict]:
    """The bench's stage: these curves at the loaded model's head layout, for the backends of
    this run, as JSON-ready dictionaries."""
    tick("attention memory/time curves")
    if device.type == "cuda":
        lengths = (512, 1024, 2048, 4096, 8192)
    else:
        lengths = (64, 128, 256) if quick else (128, 256, 512, 1024)
    cfg = lm.config
    costs = measure_backends(backends, lengths=lengths, device=device, dtype=lm.model.dtype,
                             n_heads=cfg.n_heads, n_kv=cfg.n_kv_heads, head_dim=cfg.head_dim)
    return [{"backend": c.backend, "phase": c.phase, "length": c.length,
             "seconds": c.seconds, "peak_bytes": c.peak_bytes, "method": c.method}
            for c in costs]
