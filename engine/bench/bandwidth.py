"""How close to the memory-bandwidth limit is decoding?

One decode step at batch 1 multiplies a single vector by every weight matrix: each weight is
read once and used for one multiply-add, so the step is limited by how fast memory delivers
bytes, not by arithmetic. The ceiling is therefore

    tokens/s ≤ memory bandwidth ÷ bytes read per step,
    bytes per step = weight bytes + KV-cache bytes read by attention (grows with position).

This file measures the machine's own bandwidth (a large copy, and a read-only sum), works out
the bytes per step, and splits a real decode step into where its time goes:

    matmuls alone   the same matrix–vector products, back to back, with nothing else
                    (their GB/s against the copy bandwidth is the GEMV efficiency)
    profile         torch.profiler over real decode steps: time inside matmul ops, attention,
                    other tensor ops, and the rest — Python and framework dispatch between ops
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import FastPathConfig
from ..decoding import CachedAttention, forward_step, make_cache
from ..attention import get_backend
from ..timing import best_of, clock


def copy_bandwidth(device: torch.device, nbytes: int = 256 << 20, reps: int = 5) -> dict:
    """Best of `reps`: a copy (counts bytes read + written, the STREAM convention) and a sum
    (bytes read). The buffer is far larger than any CPU cache, so this is main memory.
    The figures are in GB/s (10^9 bytes a second); the tables write them in GiB/s."""
    n = nbytes // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)                                 # first touch: the pages are mapped here
    copy_s = best_of(lambda: dst.copy_(src), reps, device)
    read_s = best_of(lambda: float(src.sum()), reps, device)
    return {"buffer_bytes": n * 4, "copy_gb_s": 2 * n * 4 / copy_s / 1e9,
            "read_gb_s": n * 4 / read_s / 1e9, "threads": torch.get_num_threads()}


def _linears(model) -> list[torch.Tensor]:
    """Every distinct weight matrix a decode step multiplies by (the tied LM head once)."""
    seen, out = set(), []
    for mod in model.modules():
        if isinstance(mod, torch.nn.Linear) and mod.weight.data_ptr() not in seen:
            seen.add(mod.weight.data_ptr())
            out.append(mod.weight)
    return out


@torch.inference_mode()
def matmul_floor(model, reps: int = 5) -> dict:
    """Time the step's matrix–vector products alone, in model order, best of `reps`."""
    weights = _linears(model)
    device = model.device
    xs = {w.shape[1]: torch.randn(1, 1, w.shape[1], dtype=w.dtype, device=device)
          for w in weights}

    def all_matmuls() -> None:
        for w in weights:
            F.linear(xs[w.shape[1]], w)
    all_matmuls()                                  # the first pass warms the caches and kernels
    best = best_of(all_matmuls, reps, device)
    nbytes = sum(w.numel() * w.element_size() for w in weights)
    return {"seconds": best, "bytes": nbytes, "gb_s": nbytes / best / 1e9,
            "matrices": len(weights)}


@torch.inference_mode()
def profile_decode(lm, backend: str, position: int = 64, steps: int = 8) -> dict:
    """Split real `kv` decode steps into matmul / attention / other ops / the rest.

    The profiler adds a little time to every op it records, so "Python & dispatch" is an upper
    bound; the matmul-only timing above is the uninstrumented check.
    """
    from torch.profiler import ProfilerActivity, profile
    model, device = lm.model, lm.model.device
    cache = make_cache("kv", model, position + steps + 1)
    attn = CachedAttention(get_backend(backend, device), cache)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.cfg.vocab_size, (1, position), generator=gen).to(device)
    try:
        logits = forward_step(model, ids, 0, attn)                      # prefill, not profiled
        tok = torch.tensor([[int(logits.argmax())]], device=device)
        forward_step(model, tok, position, attn)                        # one untimed step
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA]
                                               if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            t0 = clock(device)
            for i in range(steps):
                logits = forward_step(model, tok, position + 1 + i, attn)
                tok = torch.tensor([[int(logits.argmax())]], device=device)
            wall = clock(device) - t0
    finally:
        cache.free()
    buckets = {"matmul": 0.0, "attention": 0.0, "other ops": 0.0}
    top: dict[str, float] = {}
    for ev in prof.key_averages():
        self_s = ev.self_cpu_time_total / 1e6
        name = ev.key
        if name in ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear",
                    "aten::mv", "aten::addmv"):
            buckets["matmul"] += self_s
        elif "attention" in name or "softmax" in name:
            buckets["attention"] += self_s
        else:
            buckets["other ops"] += self_s
        top[name] = top.get(name, 0.0) + self_s
    buckets = {k: v / steps for k, v in buckets.items()}
    per_step = wall / steps
    buckets["Python & dispatch"] = max(per_step - sum(buckets.values()), 0.0)
    top_ops = sorted(top.items(), key=lambda kv: -kv[1])[:8]
    return {"position": position, "steps": steps, "backend": backend,
            "step_s_profiled": per_step, "breakdown_s": buckets,
            "top_ops_s": {k: v / steps for k, v in top_ops}}


def bytes_per_step(lm, prompt_tokens: int, new_tokens: int, cached: bool,
                   fast: str | None = None) -> dict:
    """Bytes one decode step reads, averaged over the run's decode steps.

    Weights: every matrix once (embedding lookup reads one row, ignored; a tied LM head counts
    once). KV: at position p attention reads p tokens' K and V in every layer; the decode steps
    sit at positions prompt+1 … prompt+new−1, so the mean is prompt + new/2.
    """
    model = lm.model
    weights = model.weight_bytes()
    if fast:                            # fused, re-laid-out or quantised weights: their own size
        from .. import fast as fastpath
        weights = fastpath.decode_bytes(fastpath.prepare(model, FastPathConfig.from_spec(fast)))
    per_token = model.cfg.kv_bytes_per_token(torch.finfo(model.dtype).bits // 8)
    mean_pos = prompt_tokens + new_tokens / 2
    kv = int(per_token * mean_pos) if cached else 0
    return {"weight_bytes": weights, "kv_bytes": kv, "total_bytes": weights + kv}


def format_ceilings(lm, machine: dict) -> list[dict]:
    """Bytes of weights one decode step reads, and the tokens/s the copy bandwidth allows, for
    the model in float32, in per-channel int8, and in its GGUF file's own blocks (when it was
    loaded from one): fewer bytes per token is the only way past the float32 ceiling."""
    from .. import fast as fastpath
    model = lm.model
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    f32 = fastpath.decode_bytes(model)
    # int8 (quant.Int8Linear): one byte per weight + a float32 scale (and bias) per row.
    int8 = f32 - sum(l.weight.nbytes + (0 if l.bias is None else l.bias.nbytes) for l in linears) \
        + sum(l.weight.numel() + 4 * l.out_features + (0 if l.bias is None else l.bias.nbytes)
              for l in linears)
    out = [{"format": "float32", "weight_bytes": f32}, {"format": "int8", "weight_bytes": int8}]
    try:
        fastpath.check_gguf(model)
        blocks = fastpath.prepare(model, FastPathConfig(weights="gguf"))
        kinds = sorted({m.matrix.type_name for m in blocks.modules() if hasattr(m, "matrix")})
        out.append({"format": f"gguf ({'/'.join(kinds)})",
                    "weight_bytes": fastpath.decode_bytes(blocks)})
    except Exception:                     # noqa: BLE001 — not from a GGUF: no such row
        pass
    for r in out:
        r["ceiling_tokens_per_s"] = machine["copy_gb_s"] * 1e9 / r["weight_bytes"]
        r["read_ceiling_tokens_per_s"] = machine["read_gb_s"] * 1e9 / r["weight_bytes"]
    return out


def bandwidth_view(lm, rows, prompt_tokens: int, new_tokens: int, machine: dict) -> list[dict]:
    """For every row: bytes per decode step, achieved GB/s at its median TPOT, % of the copy
    bandwidth, and the tokens/s the bandwidth would allow."""
    out = []
    for r in rows:
        tpot = r.median("tpot_s") if r.samples else None
        cached = r.kind == "hf" and "no cache" not in r.label or r.strategy in ("kv", "paged")
        b = bytes_per_step(lm, prompt_tokens, new_tokens, cached, getattr(r, "fast", None))
        # A recomputing row reads the weights once per step too, but does T× the arithmetic:
        # GB/s would describe nothing real, so it is left out.
        gbs = b["total_bytes"] / tpot / 1e9 if tpot and cached else None
        out.append({"label": r.label, **b, "tpot_s": tpot, "achieved_gb_s": gbs,
                    "pct_of_copy": 100 * gbs / machine["copy_gb_s"] if gbs else None,
                    "ceiling_tokens_per_s": machine["copy_gb_s"] * 1e9 / b["total_bytes"],
                    "recomputes": not cached})
    return out
