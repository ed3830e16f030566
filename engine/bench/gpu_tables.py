"""The bench's GPU tables: every attention backend inside the real model shape, at prefill and
decode; the fast path's decode steps; continuous batching. scripts/gpu_check.py runs `main`.

    python scripts/gpu_check.py                      # CUDA: bfloat16, lengths 128 … 8000
    python scripts/gpu_check.py --quick              # CPU check of this script: 2 layers, tiny

The model is SmolLM2-135M's shape (ModelConfig.from_name("smollm2-135m")) with random weights —
timing does not depend on what the weights say. For each backend and cache (contiguous `kv`,
`paged`) and each length T it times:

    prefill   one forward of T prompt tokens (what the time to first token costs)
    decode    one forward of one new token with T tokens already cached (median of a few steps)

then measures one bare attention call per backend (attention_curves.py: time and peak extra
memory, the O(T²) against O(T) curve), the fast path's decode step — eager, fixed-shape and
CUDA-graph steps against transformers (CUDA only; on the CPU the same code runs without the
graph column in the tests) — and continuous batching (engine/batch.py): aggregate
decode tokens/s and per-request TPOT for 1 … 64 requests at once, with the PyTorch path (sdpa)
and the batched Triton paged kernel. Prints the tables and writes them, with the card's name
and the date, to --out.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
from pathlib import Path

import torch

from ..attention import available_backends, get_backend
from ..config import ModelConfig
from ..decoding import CachedAttention, forward_step, make_cache
from ..fast.cuda_graph import capture_decoder
from ..fast.static_step import StaticDecoder
from ..metrics import tpot_s
from ..model import Transformer
from ..timing import StepClock, timed
from ..units import format_ms, format_number
from .attention_curves import format_table, measure_backends
from .batching import throughput_table


def _median_step(step, first_pos: int, steps: int, device) -> float:
    """Median seconds of `step(pos)` over consecutive positions (the first one dropped when
    there are more than two: new shapes)."""
    times = [timed(lambda: step(first_pos + i), device) for i in range(steps)]
    return statistics.median(times[1:] if len(times) > 2 else times)


def time_decode(model, strategy: str, length: int, mode: str, steps: int = 20) -> float:
    """Median seconds of one decode step at `length` cached tokens. mode: eager|static|graph."""
    device = model.device
    cache = make_cache(strategy, model, length + steps + 2, block_size=16)
    attn = CachedAttention(get_backend("sdpa", device), cache)
    prompt = torch.randint(0, model.cfg.vocab_size, (1, length),
                           generator=torch.Generator().manual_seed(length)).to(device)
    try:
        forward_step(model, prompt, 0, attn)
        if mode == "eager":
            token = torch.tensor([[1]], device=device)
            return _median_step(lambda pos: forward_step(model, token, pos, attn), length,
                                steps, device)
        decoder = StaticDecoder(model, cache)
        if mode == "graph":
            capture_decoder(decoder, length)
        return _median_step(lambda pos: decoder.step(1, pos), length, steps, device)
    finally:
        cache.free()


def time_transformers(model, length: int, new_tokens: int = 32) -> float | None:
    """Decode seconds per token of transformers generate() (eager, its default cache), random
    weights of the same shape and dtype on the same device; None without transformers."""
    try:
        from transformers import AutoConfig, AutoModelForCausalLM, LogitsProcessorList
    except ImportError:
        return None
    hf_cfg = model.cfg.to_hf()
    config = AutoConfig.for_model(hf_cfg.pop("model_type"), **hf_cfg)
    hf = AutoModelForCausalLM.from_config(config).to(model.device, model.dtype).eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    clock = StepClock(model.device)
    x = torch.randint(0, model.cfg.vocab_size, (1, length)).to(model.device)
    with torch.inference_mode():
        for _ in range(2):                       # the first run warms up
            clock.start()
            hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens,
                        do_sample=False, logits_processor=LogitsProcessorList([clock]))
    del hf
    return tpot_s(clock.latencies())


def fast_path_table(model, lengths=(128, 1024, 8000), steps: int = 20) -> str:
    """Markdown: decode tokens/s per strategy, length and mode, and the ratio to transformers."""
    modes = ["eager", "static"] + (["graph"] if model.device.type == "cuda" else [])
    lines = ["| strategy | cached tokens | " + " | ".join(f"{m} tok/s" for m in modes)
             + " | transformers tok/s | best ÷ transformers |",
             "|---|---:|" + "---:|" * (len(modes) + 2)]
    for length in lengths:
        if length + steps + 2 > model.cfg.max_seq_len:
            continue
        hf = time_transformers(model, length)
        for strategy in ("kv", "paged"):
            rates = [1 / time_decode(model, strategy, length, m, steps) for m in modes]
            hf_rate = format_number(1 / hf if hf else None)
            ratio = format_number(max(rates) * hf if hf else None, "{:.2f}×")
            lines.append(f"| {strategy} | {length} | "
                         + " | ".join(format_number(r) for r in rates)
                         + f" | {hf_rate} | {ratio} |")
    return "\n".join(lines)


def time_model(model: Transformer, backend, strategy: str, length: int, decode_steps: int,
               block_size: int = 16) -> tuple[float, float]:
    """(prefill seconds for `length` tokens, median decode-step seconds at `length`)."""
    device = model.device
    cache = make_cache(strategy, model, length + decode_steps + 1, block_size)
    attn = CachedAttention(backend, cache)
    tokens = torch.randint(0, model.cfg.vocab_size, (1, length + decode_steps + 1),
                           generator=torch.Generator().manual_seed(length)).to(device)
    try:
        prefill = timed(lambda: forward_step(model, tokens[:, :length], 0, attn), device)
        # the first step is a warm-up (new shapes)
        decode = _median_step(lambda pos: forward_step(model, tokens[:, pos:pos + 1], pos, attn),
                              length, decode_steps + 1, device)
        return prefill, decode
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
                    cells.append(f"{format_ms(prefill, '{:.3g}')} / "
                                 f"{format_ms(decode, '{:.3g}')}")
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
    ap = argparse.ArgumentParser(prog="scripts/gpu_check.py",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="a small CPU run that checks this script (2 layers, short lengths)")
    ap.add_argument("--lengths", type=int, nargs="+")
    ap.add_argument("--dtype", choices=("bfloat16", "float32", "float16"))
    ap.add_argument("--tile", type=int, default=64, help="flash tile / triton block")
    ap.add_argument("--out", default="docs/gpu_results.md")
    ap.add_argument("--no-fast-path", action="store_true",
                    help="skip the fast-path decode table (CUDA only)")
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
        "engine/bench/attention_curves.py: prefill = T queries × T keys, decode = 1 query × T "
        "keys; memory above what was allocated before the call (output included).", "",
        attn_table, ""])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)       # written now: the optional parts below may fail
    if device.type == "cuda" and not args.no_fast_path:
        fast = optional("fast-path table", fast_path_table, model)
        if fast:
            print("\n## Fast path: decode tokens/s\n\n" + fast, flush=True)
            text += "\n## Fast path: decode tokens/s (engine/fast)\n\n" + fast + "\n"
            Path(args.out).write_text(text)
    if not args.no_batch:
        quick = args.quick or device.type == "cpu"
        sizes = args.batch_sizes or ([1, 2] if quick else [1, 2, 4, 8, 16, 32, 64])
        batch = optional("batching table", throughput_table, model, sizes,
                         [n for n in ("sdpa", "triton") if n in names],
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


def optional(what: str, make, *args, **kwargs) -> str | None:
    """A table that may fail on a card this project has not run on yet (an OOM, a kernel that
    does not compile): reported on one line, and the tables already written are kept."""
    try:
        return make(*args, **kwargs)
    except Exception as exc:       # noqa: BLE001 — report, do not lose the rest
        print(f"{what} skipped: {type(exc).__name__}: {exc}", flush=True)
        return None
