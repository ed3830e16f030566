"""Decode-step timing of eager, fixed-shape, compiled-free CUDA-graph steps, and transformers,
on one device — the fast-path table that scripts/gpu_check.py prints on a lent GPU.

    from engine.fast.gpu_timing import decode_table
    print(decode_table(model))          # model: a Transformer on the card, bfloat16

On the CPU the CUDA-graph rows are skipped (capture needs CUDA), so the same code is exercised
by the CPU tests on a tiny model.
"""

from __future__ import annotations

import statistics
import time

import torch

from ..attention import get_backend
from ..decoding import CachedAttention, forward_step, make_cache
from .cuda_graph import capture_decoder
from .static_step import StaticDecoder


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_step(step, first_pos: int, steps: int, device) -> float:
    times = []
    for i in range(steps):
        _sync(device)
        t = time.perf_counter()
        step(first_pos + i)
        _sync(device)
        times.append(time.perf_counter() - t)
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
    stamps: list[float] = []

    def clock(input_ids, scores):
        _sync(model.device)
        stamps.append(time.perf_counter())
        return scores

    x = torch.randint(0, model.cfg.vocab_size, (1, length)).to(model.device)
    with torch.inference_mode():
        for _ in range(2):                       # the first run warms up
            stamps.clear()
            hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens,
                        do_sample=False, logits_processor=LogitsProcessorList([clock]))
    del hf
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1)


def decode_table(model, lengths=(128, 1024, 8000), steps: int = 20) -> str:
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
            hf_rate = f"{1 / hf:.1f}" if hf else "—"
            ratio = f"{max(rates) * hf:.2f}×" if hf else "—"
            lines.append(f"| {strategy} | {length} | " + " | ".join(f"{r:.1f}" for r in rates)
                         + f" | {hf_rate} | {ratio} |")
    return "\n".join(lines)
