"""Backends inside generation: same greedy tokens for every backend × strategy, the heatmap row
equals the naive softmax row, and the flash backend's tile trace arrives as FlashTiles events."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"     # before the first Triton kernel is wrapped

import importlib.util  # noqa: E402

import pytest  # noqa: E402

from engine.attention import get_backend  # noqa: E402
from engine.attention.naive import NaiveAttention  # noqa: E402
from engine.config import GenerationConfig  # noqa: E402
from engine.decoding import CachedAttention, run_to_end  # noqa: E402
from engine.events import AttentionRow, FlashTiles, Token  # noqa: E402
from tests.conftest import tiny_model  # noqa: E402
from tests.engine.test_attention import DEVICE, make_cache, random_step  # noqa: E402

BACKENDS = ["sdpa", "flash"] + (["triton"] if importlib.util.find_spec("triton") else [])
STRATEGIES = ("naive", "kv", "paged")


def greedy(model, tokenizer, prompt, backend: str, strategy: str, n: int, **kw):
    cfg = GenerationConfig(strategy=strategy, backend=backend, max_new_tokens=n,
                           stop_at_eos=False, keep_logits=True, block_size=8, flash_tile=8, **kw)
    events, fin = run_to_end(model, tokenizer, prompt, cfg)
    return fin.tokens, [e.logits for e in events if isinstance(e, Token)], events


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_greedy_tokens_every_backend_and_strategy(family, tokenizer, backend):
    """Against naive attention with the kv cache; logits agree to 1e-4 at every step. The
    prompt and new tokens cross the flash tile (8), the paged block (8) and triton's query tile
    (16) — triton with fewer tokens, as the interpreter runs every kernel call in NumPy."""
    model = tiny_model(family, seed=2).to(DEVICE)
    n_prompt, n_new = (13, 5) if backend == "triton" and DEVICE.type == "cpu" else (21, 10)
    prompt = torch.randint(0, 256, (n_prompt,), generator=torch.Generator().manual_seed(7))
    ref, ref_logits, _ = greedy(model, tokenizer, prompt.tolist(), "naive", "kv", n_new)
    for strategy in STRATEGIES:
        tokens, logits, _ = greedy(model, tokenizer, prompt.tolist(), backend, strategy, n_new)
        assert tokens == ref, (backend, strategy)
        worst = max((a - b).abs().max().item() for a, b in zip(logits, ref_logits))
        assert worst <= 1e-4, (backend, strategy, worst)


@pytest.mark.parametrize("kind", ["kv", "paged"])
@pytest.mark.parametrize("backend", ["naive"] + BACKENDS)
def test_attention_row_is_the_naive_softmax_row(backend, kind):
    """The heatmap row CachedAttention records equals row Tq-1 of naive's probability matrix,
    whichever backend did the work (a paged-native backend has its keys gathered for it)."""
    q, k, v, q_offset = random_step("decode", 6, 2, 64, 37, torch.float32)
    cache = make_cache(kind, 6, 2, 64, 37, torch.float32)
    history = CachedAttention(NaiveAttention(), cache)
    history.begin(0, q_offset)
    history(0, torch.zeros(1, 6, q_offset, 64, device=DEVICE), k[:, :, :-1], v[:, :, :-1])
    history.end(q_offset)
    step = CachedAttention(get_backend(backend, DEVICE, tile=16), cache, record_rows=True)
    step.begin(q_offset, 1)
    step(0, q, k[:, :, -1:], v[:, :, -1:])
    expected = NaiveAttention().probs(q, k, v, q_offset)[0, :, -1]          # (H, T)
    assert torch.allclose(step.rows[0], expected, atol=1e-6)


def test_attention_row_events_equal_across_backends(tokenizer):
    model = tiny_model("llama", seed=4).to(DEVICE)
    rows = {}
    for backend in ["naive"] + BACKENDS:
        _, _, events = greedy(model, tokenizer, list(range(30, 50)), backend, "paged", 4)
        rows[backend] = [e.probs for e in events if isinstance(e, AttentionRow)]
    for backend in BACKENDS:
        for a, b in zip(rows[backend], rows["naive"]):
            assert a.shape == b.shape
            # events carry 8-bit rows: one level is 1/255 of the row's peak (≤ 1)
            assert abs(a - b).max() <= 1 / 255 + 1e-3


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_flash_tiles_events_follow_generation(tokenizer, strategy):
    """With trace on, each step yields one FlashTiles for the last layer, head 0, the newest
    position: one entry per tile of the positions it attends to."""
    model = tiny_model("llama", seed=3).to(DEVICE)
    prompt = list(range(60, 79))                                     # 19 tokens
    backend = get_backend("flash", DEVICE, tile=4, trace=True)
    cfg = GenerationConfig(strategy=strategy, max_new_tokens=5, stop_at_eos=False, flash_tile=4)
    events, _ = run_to_end(model, tokenizer, prompt, cfg, backend=backend)
    tiles = [e for e in events if isinstance(e, FlashTiles)]
    tokens = [e for e in events if isinstance(e, Token)]
    assert len(tiles) == len(tokens) == 5
    for tok, t in zip(tokens, tiles):
        assert (t.layer, t.head, t.tile_size) == (model.cfg.n_layers - 1, 0, 4)
        assert len(t.running_max) == -(-tok.position // 4)          # positions 0 … position-1
        assert list(t.running_max) == sorted(t.running_max)


@pytest.mark.slow
def test_embedded_model_same_tokens_every_backend_and_strategy(embedded):
    """The real model (SmolLM2-135M: 9 query heads over 3 K/V heads, head dim 64, 30 layers).

    On a CPU every run is two tokens — one prefill, one decode step — and triton, in the
    interpreter (~0.5 s per kernel call, 30 layers), runs the paged strategy only: both its
    paged kernels on real weights. Its naive and kv strategies use the same two kernels on a
    contiguous layout, checked on the tiny models above. On a GPU: 8 tokens, every combination.
    """
    if DEVICE.type == "cuda":   # the shared fixture lives on the CPU; triton needs the GPU
        from engine.loader import load_model
        embedded = load_model(None, device="cuda", dtype="float32")
    model, tok = embedded.model, embedded.tokenizer
    prompt = "The capital of France is"
    n = 2 if DEVICE.type == "cpu" else 8      # one prefill and one decode step, on a CPU
    ref, _, _ = greedy(model, tok, prompt, "naive", "kv", n, attention_rows=False)
    for backend in BACKENDS:
        interpreted = backend == "triton" and DEVICE.type == "cpu"
        for strategy in ("paged",) if interpreted else STRATEGIES:
            tokens, _, _ = greedy(model, tok, prompt, backend, strategy, n, attention_rows=False)
            assert tokens == ref, (backend, strategy)
