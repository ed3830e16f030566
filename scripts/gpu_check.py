"""Time every attention backend inside the real model shape, at prefill and decode.

    python scripts/gpu_check.py                      # CUDA: bfloat16, lengths 128 … 8000
    python scripts/gpu_check.py --quick              # CPU check of this script: 2 layers, tiny

The model is SmolLM2-135M's shape (ModelConfig.from_name("smollm2-135m")) with random weights —
timing does not depend on what the weights say. For each backend and cache (contiguous `kv`,
`paged`) and each length T it times:

    prefill   one forward of T prompt tokens (what the time to first token costs)
    decode    one forward of one new token with T tokens already cached (median of a few steps)

then measures one bare attention call per backend (engine.attention.measure: time and peak extra
memory, the O(T²) against O(T) curve), and continuous batching (engine/batch.py): aggregate
decode tokens/s and per-request TPOT for 1 … 64 requests at once, with the PyTorch path (sdpa)
and the batched Triton paged kernel. Prints the tables and writes them, with the card's name
and the date, to --out.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.attention import available_backends, get_backend  # noqa: E402
from engine.attention.measure import format_table, measure_backends  # noqa: E402
from engine.config import ModelConfig  # noqa: E402
from engine.decoding import CachedAttention, forward_step, make_cache  # noqa: E402
from engine.model import Transformer  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_model(model: Transformer, backend, strategy: str, length: int, decode_steps: int,
               block_size: int = 16) -> tuple[float, float]:
    """(prefill seconds for `length` tokens, median decode-step seconds at `length`)."""
    device = model.device
    cache = make_cache(strategy, model, length + decode_steps + 1, block_size)
    attn = CachedAttention(backend, cache)
    tokens = torch.randint(0, model.cfg.vocab_size, (1, length + decode_steps + 1),
                           generator=torch.Generator().manual_seed(length)).to(device)
    try:
        sync(device)
        t0 = time.perf_counter()
        forward_step(model, tokens[:, :length], 0, attn)
        sync(device)
        prefill = time.perf_counter() - t0
        steps = []
        for i in range(decode_steps + 1):        # the first step is a warm-up (new shapes)
            pos = length + i
            t0 = time.perf_counter()
            forward_step(model, tokens[:, pos:pos + 1], pos, attn)
            sync(device)
            steps.append(time.perf_counter() - t0)
        return prefill, statistics.median(steps[1:])
    finally:
        cache.free()


def model_table(model, names, lengths, decode_steps, tile) -> tuple[str, list[str]]:
    """A Markdown table: a row per backend × cache, 'prefill ms / decode ms' per length."""
    device = model.device
    rows = ["| backend | cache | " + " | ".join(f"T={n}" for n in lengths) + " |",
            "|---|---|" + "---|" * len(lengths)]
    notes = []
    print("\n".join(rows), flush=True)
    for name in names:
        backend = get_backend(name, device, tile=tile)
        # Warm-up at the smallest length: Triton compiles, cuBLAS picks algorithms.
        time_model(model, backend, "kv", lengths[0], 1)
        for strategy in ("kv", "paged"):
            cells = []
            for n in lengths:
                try:
                    prefill, decode = time_model(model, backend, strategy, n, decode_steps)
                    cells.append(f"{prefill * 1e3:.3g} / {decode * 1e3:.3g}")
                except torch.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    cells.append("OOM")
            rows.append(f"| {name} | {strategy} | " + " | ".join(cells) + " |")
            print(rows[-1], flush=True)
        info = backend.last_info()
        if info:
            notes.append(f"- `{name}` last call: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    return "\n".join(rows), notes


def sdpa_kernels(device, dtype) -> str:
    """Which kernel SDPA picks for a prefill and for a decode step at this shape."""
    cfg = ModelConfig.from_name("smollm2-135m")
    backend = get_backend("sdpa", device)
    picks = []
    for phase, tq in (("prefill", 256), ("decode", 1)):
        q = torch.randn(1, cfg.n_heads, tq, cfg.head_dim, device=device, dtype=dtype)
        k = torch.randn(1, cfg.n_kv_heads, 256, cfg.head_dim, device=device, dtype=dtype)
        backend.attend(q, k, k, 256 - tq)
        picks.append(f"{phase}={backend.last_info()['kernel']}")
    return ", ".join(picks)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="a small CPU run that checks this script (2 layers, short lengths)")
    ap.add_argument("--lengths", type=int, nargs="+")
    ap.add_argument("--dtype", choices=("bfloat16", "float32", "float16"))
    ap.add_argument("--tile", type=int, default=64, help="flash tile / triton block")
    ap.add_argument("--out", default="docs/gpu_results.md")
    ap.add_argument("--no-fast-path", action="store_true",
                    help="skip the fast-path decode table (engine.fast.gpu_timing, CUDA only)")
    ap.add_argument("--batch-sizes", type=int, nargs="+",
                    help="continuous batching: requests at once (default 1 2 4 8 16 32 64; "
                         "--quick: 1 2)")
    ap.add_argument("--no-batch", action="store_true", help="skip the batching table")
    args = ap.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = ModelConfig.from_name("smollm2-135m")
    if args.quick or device.type == "cpu":
        cfg.n_layers = 2                  # the shape of every layer is kept; only fewer of them
        lengths = args.lengths or [32, 64]
        attn_lengths = [64, 128]
        dtype = getattr(torch, args.dtype or "float32")
        decode_steps = 2
    else:
        lengths = args.lengths or [128, 512, 2048, 4096, 8000]   # decode at 8000 stays < 8192
        attn_lengths = [128, 256, 512, 1024, 2048, 4096, 8192]
        dtype = getattr(torch, args.dtype or "bfloat16")
        decode_steps = 5
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() \
        or platform.machine()
    names = available_backends(device)
    torch.manual_seed(0)
    model = Transformer(cfg).to(device=device, dtype=dtype).eval()
    model.init_rope()

    header = [f"# Attention backends on {card}", "",
              f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
              f"- device: {device.type}, {card}; torch {torch.__version__}"
              + (f", CUDA {torch.version.cuda}" if device.type == "cuda" else ""),
              f"- model: smollm2-135m shape, random weights, {cfg.n_layers} layers, {dtype}",
              f"- backends: {', '.join(names)}; flash tile / triton block {args.tile}"]
    if device.type == "cuda":
        header.append(f"- sdpa kernel picked: {sdpa_kernels(device, dtype)}")
    print("\n".join(header), flush=True)

    print("\n## Whole model: prefill ms / decode ms per token\n", flush=True)
    table, notes = model_table(model, names, lengths, decode_steps, args.tile)
    print("\n".join(notes), flush=True)

    print("\n## One attention call: time · peak extra memory\n", flush=True)
    costs = measure_backends(names, lengths=attn_lengths, device=device, dtype=dtype,
                             tile=args.tile, n_heads=cfg.n_heads, n_kv=cfg.n_kv_heads,
                             head_dim=cfg.head_dim)
    attn_table = format_table(costs)
    print(attn_table, flush=True)

    text = "\n".join(header + [
        "", "## Whole model: prefill ms / decode ms per token", "",
        "Prefill: one forward of T prompt tokens. Decode: one forward of one token with T "
        "cached (median of a few steps). `paged` with a backend that cannot read the pool "
        "gathers the sequence's K/V first.", "", table, "", *notes, "",
        "## One attention call: time · peak extra memory", "",
        "engine.attention.measure: prefill = T queries × T keys, decode = 1 query × T keys; "
        "memory above what was allocated before the call (output included).", "",
        attn_table, ""])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)       # written now: the optional parts below may fail
    if device.type == "cuda" and not args.no_fast_path:
        fast = fast_path_table(model)
        if fast:
            print("\n## Fast path: decode tokens/s\n\n" + fast, flush=True)
            text += "\n## Fast path: decode tokens/s (engine.fast)\n\n" + fast + "\n"
            Path(args.out).write_text(text)
    if not args.no_batch:
        quick = args.quick or device.type == "cpu"
        sizes = args.batch_sizes or ([1, 2] if quick else [1, 2, 4, 8, 16, 32, 64])
        batch = batching_table(model, sizes, [n for n in ("sdpa", "triton") if n in names],
                               new_tokens=4 if quick else 64, prompt_tokens=16 if quick else 128)
        if batch:
            title = ("## Continuous batching: aggregate decode tok/s · per-request TPOT "
                     "(engine/batch.py)")
            print(f"\n{title}\n\n{batch}", flush=True)
            text += (f"\n{title}\n\nB requests with random {16 if quick else 128}-token "
                     f"prompts arrive together; decode tok/s counts every request's tokens "
                     f"after its first (engine/metrics.py).\n\n{batch}\n")
            Path(args.out).write_text(text)
    print(f"\nwritten to {args.out}")
    return 0


def batching_table(model, sizes, backends, new_tokens: int, prompt_tokens: int) -> str | None:
    """engine.bench.batching's throughput table; None if it fails (reported, not fatal)."""
    try:
        from engine.bench.batching import throughput_table
        return throughput_table(model, sizes, backends, new_tokens=new_tokens,
                                prompt_tokens=prompt_tokens)
    except Exception as exc:      # another part of the project: report, do not lose the rest
        print(f"batching table skipped: {type(exc).__name__}: {exc}", flush=True)
        return None


def fast_path_table(model) -> str | None:
    """The fast-path decode table (eager / fixed-shape / CUDA graphs vs transformers), which
    lives with the fast path in engine/fast; None if it is missing or fails."""
    try:
        from engine.fast.gpu_timing import decode_table
        return decode_table(model)
    except Exception as exc:      # another part of the project: report, do not lose the rest
        print(f"fast-path table skipped: {type(exc).__name__}: {exc}", flush=True)
        return None


if __name__ == "__main__":
    sys.exit(main())
