"""`--kernel c` (engine/fast/decode_step.c) against the PyTorch step it replaces.

The C step must be the same computation: at every position its logits equal the PyTorch step's
on the same cache within float32 rounding (1e-4), its greedy tokens are identical, and its
attention rows (the heatmap) equal the ones the engine records — for Llama and Qwen2 (biases),
for the contiguous and the paged cache (block table, blocks crossed), for float32 weights and
for int8 weights (where the reference is the PyTorch int8 model, not float32).
"""

from __future__ import annotations

import pytest
import torch

from engine.attention import get_backend
from engine.config import ConfigError, FastPathConfig, GenerationConfig
from engine.decoding import CachedAttention, forward_step, make_cache, run_to_end
from engine.fast import STEPS, check_c_step, kernels, prepare
from engine.fast.quant import Int8Linear, pack_tiles, unpack_tiles
from tests.conftest import tiny_model

pytestmark = pytest.mark.skipif(not kernels.available(), reason="no C compiler for the kernels")

WEIGHTS = {
    "float32": FastPathConfig(),
    "float32 fused": FastPathConfig(fuse=True),
    "int8 fused": FastPathConfig(fuse=True, weights="int8"),
    "int8, float32 head": FastPathConfig(weights="int8", quantize_head=False),
}


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("strategy", ["kv", "paged"])
@pytest.mark.parametrize("weights", list(WEIGHTS))
def test_c_step_equals_pytorch_step_at_every_position(family, strategy, weights):
    from engine.fast.c_step import CDecoder
    model = prepare(tiny_model(family), WEIGHTS[weights])
    prompt = [5, 17, 99, 3, 250]
    caches = [make_cache(strategy, model, 64, 16, None, None) for _ in range(2)]
    ref = CachedAttention(get_backend("naive", model.device), caches[0], record_rows=True)
    mine = CachedAttention(get_backend("naive", model.device), caches[1])
    forward_step(model, torch.tensor([prompt]), 0, ref)
    forward_step(model, torch.tensor([prompt]), 0, mine)     # the C step continues this cache
    dec = CDecoder(model, caches[1], record_rows=True)
    token = 7
    for pos in range(len(prompt), 60):                       # crosses paged blocks at 16, 32, 48
        want = forward_step(model, torch.tensor([[token]]), pos, ref)
        got = dec.step(token, pos)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        assert int(got.argmax()) == int(want.argmax())
        assert dec.rows.shape == (model.cfg.n_layers, model.cfg.n_heads, pos + 1)
        torch.testing.assert_close(torch.from_numpy(dec.rows).float(),
                                   torch.from_numpy(ref.row_matrix()).float(), atol=2e-3, rtol=0)
        token = int(want.argmax())
    assert caches[1].length == 60


@pytest.mark.parametrize("head_dim", [16, 64, 128])
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("strategy", ["kv", "paged"])
def test_attention_split_between_threads_is_the_same_attention(threads, strategy, head_dim):
    """Past 32 positions the C step cuts each K/V head's positions into one range per thread
    and merges the ranges' softmaxes (decode_step.c, attend_part / merge_head): logits and
    attention rows stay those of the PyTorch step — with ranges that start inside a paged
    block, with three threads (uneven ranges), and for heads of 64 and 128 floats, whose
    weighted sums of values are held in registers 64 floats at a time."""
    from engine.fast.c_step import CDecoder
    model = tiny_model("qwen2", head_dim=head_dim)
    prompt = [5, 17, 99, 3, 250, 8, 1]
    caches = [make_cache(strategy, model, 128, 16, None, None) for _ in range(2)]
    ref = CachedAttention(get_backend("naive", model.device), caches[0], record_rows=True)
    mine = CachedAttention(get_backend("naive", model.device), caches[1])
    forward_step(model, torch.tensor([prompt]), 0, ref)
    forward_step(model, torch.tensor([prompt]), 0, mine)
    dec = CDecoder(model, caches[1], record_rows=True)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        token = 7
        for pos in range(len(prompt), 110):
            want = forward_step(model, torch.tensor([[token]]), pos, ref)
            got = dec.step(token, pos)
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(torch.from_numpy(dec.rows).float(),
                                       torch.from_numpy(ref.row_matrix()).float(), atol=2e-3,
                                       rtol=0)
            token = int(want.argmax())
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("strategy", ["kv", "paged"])
def test_generate_with_kernel_c_gives_the_reference_tokens(tokenizer, strategy):
    model = tiny_model("llama")
    runs = {}
    for name, fast in (("ref", FastPathConfig()), ("c", FastPathConfig(kernel="c"))):
        cfg = GenerationConfig(strategy=strategy, max_new_tokens=30, stop_at_eos=False,
                               keep_logits=True, fast=fast)
        events, fin = run_to_end(model, tokenizer, "The cat sat", cfg, steps=STEPS)
        runs[name] = (list(fin.tokens), [e for e in events if type(e).__name__ == "AttentionRow"],
                      torch.stack([e.logits for e in events if getattr(e, "logits", None)
                                   is not None]))
    assert runs["c"][0] == runs["ref"][0]
    torch.testing.assert_close(runs["c"][2], runs["ref"][2], atol=1e-4, rtol=1e-4)
    # The heatmap still gets one row matrix per token from the C step.
    assert len(runs["c"][1]) == len(runs["ref"][1]) == 30


def test_kernel_c_refuses_what_it_cannot_run():
    with pytest.raises(ConfigError, match="kv or paged"):
        check_c_step(tiny_model("llama"), "naive")
    with pytest.raises(ConfigError, match="Llama/Qwen2"):
        check_c_step(tiny_model("gpt2"), "kv")
    with pytest.raises(ConfigError, match="float32"):
        check_c_step(tiny_model("llama", dtype=torch.bfloat16), "kv")
    for clash in (dict(layout="cols"), dict(weights="float16"), dict(compile=True),
                  dict(cuda_graphs=True)):
        with pytest.raises(ConfigError, match="--kernel c"):
            FastPathConfig(kernel="c", **clash)
    with pytest.raises(ConfigError, match="kernel"):
        FastPathConfig(kernel="asm")


def test_cli_kernel_flag():
    from cli.flags import generation_config
    from cli.parser import build_parser
    args = build_parser().parse_args(["run", "hi", "--kernel", "c", "--weights", "int8"])
    assert generation_config(args).fast == FastPathConfig(kernel="c", weights="int8")


# ---------------------------------------------------------------------------- the GEMV kernels
@pytest.mark.parametrize("rows,cols", [(72, 64), (70, 64), (8, 33), (1, 8)])
def test_f32_gemv_equals_linear(rows, cols):
    w, b, x = torch.randn(rows, cols), torch.randn(rows), torch.randn(cols)
    torch.testing.assert_close(kernels.f32_gemv(x, w, b), torch.nn.functional.linear(x, w, b),
                               atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(kernels.f32_gemv(x, w, None), w @ x, atol=1e-4, rtol=1e-4)


def test_tiles_round_trip_and_layout():
    q = torch.arange(8 * 16, dtype=torch.int32).view(8, 16)
    t = pack_tiles(q)
    assert torch.equal(unpack_tiles(t), q)
    flat = t.reshape(-1)
    # The first 32 numbers are one tile: rows 0-3, columns 0-7, row by row.
    assert torch.equal(flat[:32], q[:4, :8].reshape(-1))
    assert torch.equal(flat[32:64], q[:4, 8:16].reshape(-1))
    assert torch.equal(flat[64:96], q[4:8, :8].reshape(-1))


@pytest.mark.parametrize("out_features,tiled", [(72, True), (70, False)])
def test_int8_linear_tiles_when_it_can(out_features, tiled):
    lin = torch.nn.Linear(64, out_features, bias=True)
    fast, ref = Int8Linear(lin, kernel="gemv"), Int8Linear(lin, kernel="dequant")
    assert fast.tiled == (tiled and kernels.vectorised())
    assert torch.equal(fast.int8_rows(), ref.qweight)          # same numbers, other layout
    x = torch.randn(1, 1, 64)
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), ref(x), atol=1e-5, rtol=1e-5)
        # More than one token (a prompt) takes the PyTorch path, through the unpacked rows.
        x3 = torch.randn(1, 3, 64)
        torch.testing.assert_close(fast(x3), ref(x3), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------- embedded model
@pytest.mark.slow
def test_embedded_kernel_c_golden(embedded):
    from tests.engine.test_golden import GOLDEN_TOKENS, PROMPT
    for strategy in ("kv", "paged"):
        _, fin = run_to_end(embedded.model, embedded.tokenizer, PROMPT, GenerationConfig(
            strategy=strategy, max_new_tokens=50, attention_rows=False,
            fast=FastPathConfig(kernel="c")), steps=STEPS)
        assert list(fin.tokens) == GOLDEN_TOKENS, strategy
