"""`--weights gguf`: decoding in the GGUF file's own quantised blocks (engine/fast/gguf_*.py,
gguf_blocks.c) against the float32 path on the same dequantised weights.

The claim is exactness, so the tests are those of the C step: for tiny random Llama and Qwen2
models written as GGUF in every supported type, at every position the block model's logits are
within 1e-4 of the float32 model built from the same file by the loader's own conversion, the
greedy tokens are identical and the attention rows equal. Below them, the kernels themselves:
dequantisation must be *bit-exact* against gguf.quants.dequantize (it is what makes a prompt's
logits those of the float32 model), products within float32 rounding of a float64 reference —
for every build: the native one (AVX-512 rows where the CPU has them), the AVX2 one and the
portable one (no intrinsics, no OpenMP).

gguf's `quants.quantize` writes Q8_0/Q4_0/Q4_1/Q5_0/Q5_1; K-quants (Q4_K, Q5_K, Q6_K) are
written as random blocks with sane scales.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.attention import get_backend
from engine.config import ConfigError, FastPathConfig, GenerationConfig
from engine.decoding import CachedAttention, forward_step, make_cache, run_to_end
from engine.fast import STEPS, decode_bytes, kernels, prepare
from engine.fast.gguf_file import GGUFFile, GGUFFormatError
from engine.fast.gguf_weights import (GGUFLinear, arrange_for_kernels, is_block_model,
                                      load_block_model)
from engine.loader import ModelLoadError
from engine.bench import markdown
from engine.model import Transformer
from tests.conftest import tiny_model

gguf = pytest.importorskip("gguf")
T = gguf.GGMLQuantizationType
ROOT = Path(__file__).resolve().parents[2]
needs_kernels = pytest.mark.skipif(not kernels.available(),
                                   reason=f"no C kernels here: {kernels.why_unavailable()}")
SMALL = [T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1]       # gguf can quantise these itself
K_QUANTS = [T.Q4_K, T.Q5_K, T.Q6_K]
FLOATS = [T.F32, T.F16, T.BF16]


# ----------------------------------------------------------------------------- writing GGUFs
def random_blocks(qtype, rows: int, cols: int, rng) -> np.ndarray:
    """(rows, row bytes) of random blocks whose float16 scales are small and finite (random
    bytes there could be inf/nan), so the weights stay in a sane range."""
    per_block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows, cols // per_block, nbytes), dtype=np.uint8)

    def halves(lo, hi):
        v = rng.uniform(lo, hi, size=raw.shape[:2]).astype(np.float16)
        return v.view(np.uint8).reshape(*raw.shape[:2], 2)
    if qtype in (T.Q4_K, T.Q5_K):
        raw[..., 0:2], raw[..., 2:4] = halves(2e-4, 6e-4), halves(1e-4, 4e-4)   # d, dmin
    elif qtype == T.Q6_K:
        raw[..., 208:210] = halves(-1e-4, 1e-4)                                  # d
    else:
        raw[..., 0:2] = halves(-0.02, 0.02)                                      # d
        if qtype in (T.Q4_1, T.Q5_1):
            raw[..., 2:4] = halves(-0.1, 0.1)                                    # m
    return raw.reshape(rows, -1)


def encode(arr: np.ndarray, qtype, rng):
    """A float matrix in `qtype`: gguf's own quantiser where it has one, random blocks else."""
    if qtype == T.F32:
        return np.ascontiguousarray(arr, dtype=np.float32)
    if qtype == T.F16:
        return np.ascontiguousarray(arr, dtype=np.float16)
    if qtype in K_QUANTS:
        return random_blocks(qtype, *arr.shape, rng)
    return gguf.quants.quantize(np.ascontiguousarray(arr, dtype=np.float32), qtype)


def interleave(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's Q/K row order: each head's rotary halves interleaved."""
    out, cols = w.shape
    return w.reshape(n_heads, 2, out // n_heads // 2, cols).swapaxes(1, 2).reshape(out, cols)


def write_gguf(path: Path, model: Transformer, qtype, emb_type=T.Q8_0, seed=0) -> Path:
    """`model` (a tiny engine Transformer) as a GGUF with its projections in `qtype`."""
    cfg, rng = model.cfg, np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), cfg.family)
    w.add_block_count(cfg.n_layers)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.dim)
    w.add_feed_forward_length(cfg.ffn_dim)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    tokens = sorted(__import__("tokenizers").pre_tokenizers.ByteLevel.alphabet())
    assert len(tokens) == cfg.vocab_size == 256           # a byte-level vocabulary, as in
    w.add_tokenizer_model("gpt2")                          # tests/engine/gguf_writer.py
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([1] * len(tokens))
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_merges([])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)

    def add(name, arr, t):
        data = encode(arr, t, rng)
        w.add_tensor(name, data, raw_dtype=t if t in SMALL + K_QUANTS else None)
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    add("token_embd.weight", sd["tok_emb.weight"], emb_type)
    if not cfg.tie_embeddings:
        add("output.weight", sd["lm_head.weight"], emb_type)
    w.add_tensor("output_norm.weight", sd["norm.weight"])
    names = {"attn.wq": "attn_q", "attn.wk": "attn_k", "attn.wv": "attn_v",
             "attn.wo": "attn_output",
             "mlp.w_gate": "ffn_gate", "mlp.w_up": "ffn_up", "mlp.w_down": "ffn_down"}
    for i in range(cfg.n_layers):
        for ours, theirs in names.items():
            arr = sd[f"layers.{i}.{ours}.weight"]
            if cfg.family == "llama" and theirs in ("attn_q", "attn_k"):
                arr = interleave(arr, cfg.n_heads if theirs == "attn_q" else cfg.n_kv_heads)
            add(f"blk.{i}.{theirs}.weight", arr, qtype)
            if f"layers.{i}.{ours}.bias" in sd:
                w.add_tensor(f"blk.{i}.{theirs}.bias", sd[f"layers.{i}.{ours}.bias"])
        w.add_tensor(f"blk.{i}.attn_norm.weight", sd[f"layers.{i}.attn_norm.weight"])
        w.add_tensor(f"blk.{i}.ffn_norm.weight", sd[f"layers.{i}.mlp_norm.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def float_model(path: Path) -> Transformer:
    """The float32 reference: the file through the loader's own conversion (dequantise every
    tensor, un-permute Q/K, build the model), noting its source as load_model does."""
    from engine.loader import build_model, gguf_config, gguf_state_dict, hf_to_engine, open_gguf
    reader = open_gguf(path)
    cfg = gguf_config(reader)
    model = build_model(cfg, hf_to_engine(gguf_state_dict(reader, cfg), cfg),
                        torch.device("cpu"), torch.float32)
    model.gguf_path = str(path)
    return model


def tiny(family: str, qtype) -> Transformer:
    """Tiny random weights; K-quants need rows of 256, so their model is wider."""
    if qtype in K_QUANTS:
        return tiny_model(family, dim=256, ffn_dim=256, head_dim=64, n_heads=4, n_kv_heads=2)
    return tiny_model(family)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """(family, type) → (path, float32 model of that file), written once per module."""
    folder, made = tmp_path_factory.mktemp("gguf"), {}

    def get(family, qtype, emb_type=T.Q8_0):
        key = (family, qtype, emb_type)
        if key not in made:
            path = write_gguf(folder / f"{family}-{qtype.name}-{emb_type.name}.gguf",
                              tiny(family, qtype), qtype, emb_type)
            made[key] = path, float_model(path)
        return made[key]
    return get


# ----------------------------------------------------------------------------- the kernels
def lib_for(variant):
    lib = kernels.library(variant)
    if lib is None:
        pytest.skip(f"the {variant} kernels cannot be built here: "
                    f"{kernels.why_unavailable(variant)}")
    return lib


@pytest.mark.parametrize("variant", ["native", "avx2", "portable"])
@pytest.mark.parametrize("qtype", SMALL + K_QUANTS + FLOATS, ids=lambda t: t.name)
def test_block_kernels_against_gguf_dequantize(variant, qtype):
    lib = lib_for(variant)
    rng = np.random.default_rng(int(qtype))
    per_block = gguf.GGML_QUANT_SIZES[qtype][0]
    # Edge shapes: rows not a multiple of anything, one block per row, several blocks per row.
    # Seven blocks a row: the AVX-512 rows' groups of four plus a tail of three.
    for rows, cols in ((7, 256), (1, per_block * 2), (33, 768), (5, max(per_block, 8)),
                       (3, per_block * 7)):
        if qtype in FLOATS:
            blocks = encode(rng.normal(size=(rows, cols)), qtype if qtype != T.BF16 else T.F32,
                            rng)
            if qtype == T.BF16:         # the top half of each float32: a valid bfloat16
                blocks = (blocks.view(np.uint32) >> 16).astype(np.uint16)
            blocks = np.ascontiguousarray(blocks).view(np.uint8).reshape(rows, -1)
        else:
            blocks = random_blocks(qtype, rows, cols, rng)
        want = gguf.quants.dequantize(blocks, qtype).astype(np.float32)
        assert lib.gguf_row_bytes(int(qtype), cols) == blocks.shape[1]
        got = np.empty((rows, cols), np.float32)
        assert lib.gguf_dequant(int(qtype), blocks.ctypes.data, None, got.ctypes.data, rows, cols,
                                2) == 0
        np.testing.assert_array_equal(got, want)                     # bit-exact
        # A row map: output i is stored row order[i] (how Q/K rows and embeddings are read).
        order = np.ascontiguousarray(rng.permutation(rows)[: max(1, rows - 2)], dtype=np.int32)
        part = np.empty((len(order), cols), np.float32)
        lib.gguf_dequant(int(qtype), blocks.ctypes.data, order.ctypes.data, part.ctypes.data,
                         len(order), cols, 2)
        np.testing.assert_array_equal(part, want[order])
        x = rng.normal(size=cols).astype(np.float32)
        bias = rng.normal(size=len(order)).astype(np.float32)
        y = np.empty(len(order), np.float32)
        assert lib.gguf_gemv(int(qtype), blocks.ctypes.data, order.ctypes.data, x.ctypes.data,
                             bias.ctypes.data, y.ctypes.data, len(order), cols, 2) == 0
        ref = want[order].astype(np.float64) @ x.astype(np.float64) + bias
        scale = np.abs(want[order]).astype(np.float64) @ np.abs(x.astype(np.float64)) + 1e-30
        assert np.all(np.abs(y - ref) <= 1e-5 * scale + 1e-6), (rows, cols)


# ----------------------------------------------------------------------------- packed rows
PACKABLE = [T.Q8_0, T.Q4_0, T.Q4_1]


def packed_lib():
    lib = lib_for("native")
    if lib.gguf_packed_type(int(T.Q4_1)) < 0:
        pytest.skip("this CPU has no AVX-512 VNNI: its kernels read every row in the file's order")
    return lib


def gemv(lib, code, blocks, x, rows=None, bias=None):
    n = blocks.shape[0] if rows is None else len(rows)
    y = np.empty(n, np.float32)
    assert lib.gguf_gemv(code, blocks.ctypes.data, None if rows is None else rows.ctypes.data,
                         x.ctypes.data, None if bias is None else bias.ctypes.data,
                         y.ctypes.data, n, x.size, 2) == 0
    return y


@pytest.mark.parametrize("qtype", PACKABLE, ids=lambda t: t.name)
def test_packed_rows_are_the_same_blocks_and_the_same_products(qtype):
    """gguf_pack rearranges each row's whole groups of 16 blocks (the VNNI kernels' order) and
    back, byte for byte; dequantising packed rows is still bit-exact; their products (x as exact
    integer digits) are within float32 rounding of a float64 reference, and no less accurate
    than the float code's on the file's order."""
    lib = packed_lib()
    rng = np.random.default_rng(int(qtype))
    errors = {"packed": [], "file": []}
    # one group; a group + a tail in the file's order (the embedded model's 576 columns);
    # three groups (1536); two groups + one; a tail alone
    for rows, nb in ((3, 16), (5, 18), (4, 48), (2, 33), (3, 1)):
        cols = 32 * nb
        file = random_blocks(qtype, rows, cols, rng)
        want = gguf.quants.dequantize(file, qtype).astype(np.float32)
        packed = file.copy()
        code = lib.gguf_pack(int(qtype), packed.ctypes.data, rows, cols, 2)
        assert code == lib.gguf_packed_type(int(qtype)) and code != int(qtype)
        assert (packed != file).any() == (nb >= 16)                    # whole groups only
        assert lib.gguf_row_bytes(code, cols) == file.shape[1]
        np.testing.assert_array_equal(np.sort(packed, axis=1), np.sort(file, axis=1))
        got = np.empty((rows, cols), np.float32)
        assert lib.gguf_dequant(code, packed.ctypes.data, None, got.ctypes.data, rows, cols,
                                2) == 0
        np.testing.assert_array_equal(got, want)                       # bit-exact
        order = np.ascontiguousarray(rng.permutation(rows), dtype=np.int32)
        bias = rng.normal(size=rows).astype(np.float32)
        for _ in range(20):
            x = (rng.normal(size=cols) * rng.choice([0.1, 1, 30], size=cols)).astype(np.float32)
            ref = want[order].astype(np.float64) @ x.astype(np.float64) + bias
            scale = np.abs(want[order]).astype(np.float64) @ np.abs(x.astype(np.float64))
            for name, (c, b) in (("packed", (code, packed)), ("file", (int(qtype), file))):
                y = gemv(lib, c, b, x, order, bias)
                assert np.all(np.abs(y - ref) <= 1e-5 * scale + 1e-6), (name, rows, cols)
                errors[name] += list(np.abs(y - ref) / scale)
        back = packed.copy()
        assert lib.gguf_pack(code, back.ctypes.data, rows, cols, 2) == int(qtype)
        np.testing.assert_array_equal(back, file)
    assert np.mean(errors["packed"]) <= np.mean(errors["file"])


def test_packed_rows_keep_inf_nan_and_vanishing_activations_as_the_float_code_does():
    """x that has no exact digits (inf, NaN, blocks below 2^-90) goes through the float code on
    the same packed bytes: the file order's numbers (to float32 rounding), NaN and inf too."""
    lib = packed_lib()
    rng = np.random.default_rng(7)
    rows, cols = 6, 32 * 18
    file = random_blocks(T.Q4_1, rows, cols, rng)
    packed = file.copy()
    code = lib.gguf_pack(int(T.Q4_1), packed.ctypes.data, rows, cols, 2)
    for poke in ("inf", "nan", "tiny", "zero block", "zeros"):
        x = rng.normal(size=cols).astype(np.float32)
        if poke == "inf":
            x[40] = np.inf
        elif poke == "nan":
            x[300] = np.nan
        elif poke == "tiny":
            x[64:96] = 1e-35
        elif poke == "zero block":
            x[:32] = 0
        else:
            x[:] = 0
        y_packed, y_file = gemv(lib, code, packed, x), gemv(lib, int(T.Q4_1), file, x)
        np.testing.assert_allclose(y_packed, y_file, rtol=1e-5, atol=1e-6)  # NaN where NaN
        assert np.isfinite(y_packed).all() == (poke not in ("inf", "nan"))


@pytest.mark.parametrize("variant", ["avx2", "portable"])
def test_builds_without_vnni_neither_pack_nor_read_packed_rows(variant):
    lib = lib_for(variant)
    packed_code = int(T.Q4_1) | 256
    assert lib.gguf_packed_type(int(T.Q4_1)) == -1
    assert lib.gguf_row_bytes(packed_code, 512) == -1
    w = np.zeros((1, 320), np.uint8)
    assert lib.gguf_pack(int(T.Q4_1), w.ctypes.data, 1, 512, 1) == -1
    x, y = np.zeros(512, np.float32), np.zeros(1, np.float32)
    assert lib.gguf_gemv(packed_code, w.ctypes.data, None, x.ctypes.data, None, y.ctypes.data,
                         1, 512, 1) == -1


def test_row_bytes_refuses_what_the_kernels_cannot_read():
    lib = lib_for("native")
    assert lib.gguf_row_bytes(int(T.Q4_K), 300) == -1          # not whole 256-weight blocks
    assert lib.gguf_row_bytes(int(T.Q2_K), 256) == -1          # a type they do not read
    assert lib.gguf_gemv(int(T.Q2_K), None, None, None, None, None, 1, 256, 1) == -1


# ----------------------------------------------------------------------------- whole models
def step_all(model, prompt, n, c_step, strategy="kv", record=True):
    """Prefill `prompt`, then decode greedily for n steps on a fresh cache: every step's logits,
    the tokens, and every step's attention rows."""
    from engine.fast.c_step import CDecoder
    cache = make_cache(strategy, model, len(prompt) + n + 1, 16)
    attn = CachedAttention(get_backend("naive", model.device), cache, record_rows=record)
    logits = forward_step(model, torch.tensor([prompt]), 0, attn)
    dec = CDecoder(model, cache, record_rows=record) if c_step else None
    out, tokens, rows = [logits], [], []
    for i in range(n):
        tokens.append(int(logits.argmax()))
        if dec is not None:
            logits = dec.step(tokens[-1], len(prompt) + i)
            rows.append(dec.rows)
        else:
            logits = forward_step(model, torch.tensor([[tokens[-1]]]), len(prompt) + i, attn)
            rows.append(attn.row_matrix() if record else None)
    cache.free()
    return torch.stack(out + [logits]), tokens, rows


@needs_kernels
@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("qtype", SMALL + K_QUANTS + [T.F16], ids=lambda t: t.name)
def test_block_model_equals_float32_model_at_every_position(files, family, qtype):
    path, ref = files(family, qtype)
    blocks = load_block_model(path)
    assert is_block_model(blocks) and not is_block_model(ref)
    prompt = [5, 17, 99, 3, 250, 42]
    want, want_tokens, want_rows = step_all(ref, prompt, 40, c_step=False)
    for c_step in (True, False):                 # the C step, and the PyTorch gguf modules
        got, tokens, rows = step_all(blocks, prompt, 40, c_step=c_step)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        assert tokens == want_tokens
        for a, b in zip(rows, want_rows):
            np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), atol=2e-3)


@needs_kernels
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_prompt_logits_are_the_float32_models_bit_for_bit(files, family):
    """A short prompt multiplies dequantised tiles in F.linear, as the float32 model does: its
    numbers exactly. (From ONEDNN_ROWS tokens on, oneDNN multiplies them: the next test.)"""
    path, ref = files(family, T.Q4_1, T.Q4_1)
    blocks = load_block_model(path)
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.inference_mode():
        hidden = {}
        for name, m in (("ref", ref), ("blocks", blocks)):
            attn = CachedAttention(get_backend("naive", m.device))
            x = m.tok_emb(ids)
            for layer in m.layers:
                x = layer(x, (m.rope_cos[:8], m.rope_sin[:8]), attn)
            hidden[name] = m.norm(x)
    assert torch.equal(hidden["blocks"], hidden["ref"])


@needs_kernels
@pytest.mark.parametrize("c_step", [True, False])
def test_long_prompts_multiply_in_onednn_within_float32_rounding(files, monkeypatch, c_step):
    """A prompt of ONEDNN_ROWS tokens or more runs its products in oneDNN (where it works):
    another order of additions than the float32 model's MKL, so logits within 1e-4 at every
    position after it, and the same greedy tokens."""
    from engine.fast import onednn
    from engine.fast.gguf_weights import ONEDNN_ROWS
    calls = []
    real = onednn.linear
    monkeypatch.setattr(onednn, "linear", lambda *a: calls.append(1) or real(*a))
    path, ref = files("llama", T.Q4_1)
    blocks = load_block_model(path)
    prompt = [(7 * i + 3) % 250 for i in range(ONEDNN_ROWS + 16)]
    want, want_tokens, _ = step_all(ref, prompt, 12, c_step=False, record=False)
    got, tokens, _ = step_all(blocks, prompt, 12, c_step=c_step, record=False)
    assert bool(calls) == onednn.onednn_works() and tokens == want_tokens
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@needs_kernels
@pytest.mark.parametrize("strategy", ["kv", "paged"])
@pytest.mark.parametrize("spec", ["c+gguf", "gguf"])
def test_generate_with_gguf_weights_gives_the_float32_tokens(files, tokenizer, strategy, spec):
    path, ref = files("llama", T.Q4_1)
    runs = {}
    for name, fast in (("ref", FastPathConfig()), (spec, FastPathConfig.from_spec(spec))):
        cfg = GenerationConfig(strategy=strategy, max_new_tokens=30, stop_at_eos=False,
                               keep_logits=True, fast=fast)
        events, fin = run_to_end(ref, tokenizer, "The cat sat", cfg, steps=STEPS)
        runs[name] = (list(fin.tokens), torch.stack([e.logits for e in events
                                                     if getattr(e, "logits", None) is not None]))
        assert events[0].fast == fast.spec()
    assert runs[spec][0] == runs["ref"][0]
    torch.testing.assert_close(runs[spec][1], runs["ref"][1], atol=1e-4, rtol=1e-4)
    variant = prepare(ref, FastPathConfig.from_spec(spec))
    assert is_block_model(variant) and prepare(ref, FastPathConfig(weights="gguf")) is variant
    # Bytes per token: 4-bit blocks (+ their scales) instead of float32.
    assert decode_bytes(variant) < decode_bytes(ref) / 3


@needs_kernels
def test_packed_blocks_give_the_float32_tokens_and_follow_the_build_that_reads_them(
        tmp_path, monkeypatch):
    """A model with the embedded model's widths (576 columns: one group of 16 blocks + 2;
    1536: three groups) is arranged packed where the kernels read packed rows, decodes the
    float32 model's tokens, and its blocks go back to the file's order for a build (or gguf's
    numpy code) that reads that order, and packed again — while the file is never written."""
    import hashlib
    model = tiny_model("llama", dim=576, ffn_dim=1536, n_heads=9, n_kv_heads=3, head_dim=64)
    path = write_gguf(tmp_path / "wide.gguf", model, T.Q4_1, T.Q8_0)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    ref = float_model(path)
    prompt = [5, 17, 99, 3]
    want, want_tokens, _ = step_all(ref, prompt, 24, c_step=False, record=False)
    blocks = load_block_model(path)
    up, emb = blocks.layers[0].mlp.w_up.matrix, blocks.tok_emb.matrix
    assert (up.code, emb.code) == (int(T.Q4_1), int(T.Q8_0))      # the file's order, until …
    arrange_for_kernels(blocks)                                    # … load_gguf_blocks does this
    packed = kernels.library().gguf_packed_type(int(T.Q4_1)) >= 0

    def check(c_step, code_up, code_emb):
        got, tokens, _ = step_all(blocks, prompt, 24, c_step=c_step, record=False)
        assert tokens == want_tokens
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        assert (up.code, emb.code) == (code_up, code_emb)
    on_load = (int(T.Q4_1) | 256, int(T.Q8_0) | 256) if packed else (int(T.Q4_1), int(T.Q8_0))
    assert (up.code, emb.code) == on_load
    check(True, *on_load)
    check(False, *on_load)
    if lib_for_maybe("avx2"):
        monkeypatch.setenv("MINILLM_KERNELS", "avx2")
        check(True, int(T.Q4_1), int(T.Q8_0))
        monkeypatch.delenv("MINILLM_KERNELS")
        check(True, *on_load)
    with monkeypatch.context() as m:
        m.setattr(kernels, "library", lambda variant=None: None)
        with torch.inference_mode():
            ids = torch.tensor([[1, 2, 250]])
            assert torch.equal(blocks.tok_emb(ids), ref.tok_emb(ids))
            torch.testing.assert_close(blocks.layers[0].mlp.w_up(ref.tok_emb(ids)),
                                       ref.layers[0].mlp.w_up(ref.tok_emb(ids)),
                                       atol=1e-5, rtol=1e-5)
        assert (up.code, emb.code) == (int(T.Q4_1), int(T.Q8_0))
    check(True, *on_load)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest


def lib_for_maybe(variant):
    return kernels.library(variant) is not None


@needs_kernels
@pytest.mark.parametrize("variant", ["avx2", "portable"])
def test_other_builds_give_the_same_tokens(files, monkeypatch, variant):
    """The AVX2 kernels (what a CPU without AVX-512 runs; on this one, MINILLM_KERNELS=avx2) and
    the kernels without intrinsics or OpenMP (MINILLM_KERNELS=portable, what an ARM laptop
    without OpenMP builds) decode the same greedy tokens as the native build, logits within
    float32 rounding."""
    lib_for(variant)
    path, ref = files("qwen2", T.Q4_1)
    blocks = load_block_model(path)
    prompt = [9, 8, 7, 6]
    want, want_tokens, _ = step_all(blocks, prompt, 30, c_step=True, record=False)
    monkeypatch.setenv("MINILLM_KERNELS", variant)
    assert kernels.vectorised() == (variant == "avx2")
    got, tokens, _ = step_all(blocks, prompt, 30, c_step=True, record=False)
    assert tokens == want_tokens
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    got, tokens, _ = step_all(blocks, prompt, 30, c_step=False, record=False)
    assert tokens == want_tokens


def test_without_kernels_the_modules_fall_back_to_float32(files, monkeypatch):
    """No compiler: the same modules dequantise once (gguf's numpy code) and run PyTorch."""
    path, ref = files("llama", T.Q8_0)
    blocks = load_block_model(path)
    x = torch.randn(1, 1, ref.cfg.dim)
    with torch.inference_mode():
        want = ref.layers[0].attn.wq(x)
        monkeypatch.setattr(kernels, "library", lambda variant=None: None)
        got = blocks.layers[0].attn.wq(x)
        ids = torch.tensor([[1, 2]])
        assert torch.equal(blocks.tok_emb(ids), ref.tok_emb(ids))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_no_compiler_is_one_clear_line_and_gguf_still_runs(files, tmp_path):
    """CC names no compiler: --kernel c says so in one line; gguf alone runs in PyTorch."""
    path, _ = files("llama", T.Q4_0)
    env = {"CC": "/nonexistent/cc", "XDG_CACHE_HOME": str(tmp_path), "PATH": "/usr/bin:/bin",
           "MINILLM_CACHE": str(tmp_path / "m"), "PYTHONPATH": str(ROOT)}
    probe = ("import sys; from engine.fast import kernels; "
             "print(kernels.available(), kernels.why_unavailable())")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.stdout.startswith("False no C compiler found (CC=/nonexistent/cc)"), out.stderr
    run = subprocess.run([sys.executable, "main.py", "run", "hi", "--model", str(path),
                          "--weights", "gguf", "--kernel", "c", "--max-new-tokens", "2"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "C kernels could not be built" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1 and "Traceback" not in run.stderr


# ----------------------------------------------------------------------------- refusals, files
def test_gguf_weights_refuse_a_model_not_from_a_gguf(tokenizer):
    cfg = GenerationConfig(max_new_tokens=2, fast=FastPathConfig(weights="gguf"))
    with pytest.raises(ConfigError, match="not loaded from a .gguf"):
        run_to_end(tiny_model("llama"), tokenizer, "hi", cfg, steps=STEPS)
    for clash in ("fuse+gguf", "cols+gguf", "gguf+head-full"):
        with pytest.raises(ConfigError, match="--weights gguf"):
            FastPathConfig.from_spec(clash)
    assert FastPathConfig.from_spec("c+gguf").spec() == "c+gguf"


@needs_kernels
def test_token_ids_outside_the_vocabulary_are_refused_not_read(files):
    from engine.fast.c_step import CDecoder
    blocks = load_block_model(files("llama", T.Q8_0)[0])
    cache = make_cache("kv", blocks, 8)
    with pytest.raises(IndexError):
        CDecoder(blocks, cache).step(blocks.cfg.vocab_size, 0)
    with pytest.raises(IndexError):
        blocks.tok_emb(torch.tensor([[0, -1]]))


def test_block_model_refuses_other_weight_options(files):
    blocks = load_block_model(files("llama", T.Q8_0)[0])
    with pytest.raises(ConfigError, match="loaded with --weights gguf"):
        prepare(blocks, FastPathConfig(weights="int8"))
    assert prepare(blocks, FastPathConfig(weights="gguf")) is blocks
    assert prepare(blocks, FastPathConfig(kernel="c")) is blocks


def _rewrite(path: Path, out: Path, edit) -> Path:
    data = bytearray(path.read_bytes())
    edit(data)
    out.write_bytes(bytes(data))
    return out


def test_hostile_files_are_refused_before_any_kernel_reads_them(files, tmp_path):
    path, _ = files("llama", T.Q4_1)
    data = path.read_bytes()
    # Truncated anywhere: in the header, in the tensor table, in the tensor data.
    for cut in (3, 40, len(data) // 3, len(data) - 1):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises((ConfigError, ModelLoadError)):
            load_block_model(bad)
    # A metadata count that claims more than the file holds.
    lying = _rewrite(path, tmp_path / "count.gguf", lambda d: d.__setitem__(
        slice(16, 24), (2**60).to_bytes(8, "little")))
    with pytest.raises(GGUFFormatError, match="claims"):
        GGUFFile(lying)
    # Right size, wrong shape: a projection that does not fit the model's config.
    good = GGUFFile(path)
    q = next(t for t in good.tensors if t.name == "blk.0.attn_q.weight")
    assert tuple(q.shape.tolist()) == (64, 64)
    with pytest.raises(ConfigError, match="the model needs"):
        from engine.fast.gguf_weights import _matrix
        _matrix(q, 32, 128, q.name)
    # A type the kernels do not read is named, with what to do instead.
    folder = tmp_path / "q2k"
    folder.mkdir()
    model = tiny("llama", T.Q4_K)
    odd = write_gguf(folder / "q2k.gguf", model, T.Q4_K)
    raw = bytearray(odd.read_bytes())
    table = GGUFFile(odd)
    # Rewrite one tensor's type field from Q4_K (12) to Q2_K (10) — same block size, fewer bytes.
    name = b"blk.0.ffn_up.weight"
    at = raw.index(name) + len(name) + 4 + 8 * 2
    assert int.from_bytes(raw[at:at + 4], "little") == int(T.Q4_K)
    raw[at:at + 4] = int(T.Q2_K).to_bytes(4, "little")
    (folder / "bad.gguf").write_bytes(bytes(raw))
    with pytest.raises(ConfigError, match="Q2_K"):
        load_block_model(folder / "bad.gguf")
    assert table.tensors                  # the original still reads


def test_cli_weights_gguf_flag():
    from cli.flags import generation_config
    from cli.parser import build_parser
    args = build_parser().parse_args(["run", "hi", "--kernel", "c", "--weights", "gguf"])
    assert generation_config(args).fast == FastPathConfig(kernel="c", weights="gguf")


# ----------------------------------------------------------------------------- embedded model
@pytest.mark.slow
@needs_kernels
def test_embedded_c_gguf_golden(embedded):
    """The embedded Q4_1 file decoded in its own blocks gives the float32 golden tokens."""
    from tests.engine.test_golden import GOLDEN_TOKENS, PROMPT
    assert embedded.model.gguf_path.endswith(".gguf")
    # The PyTorch path (one C product per projection) is the slow one: its first 16 tokens.
    for strategy, spec, n in (("kv", "c+gguf", 50), ("paged", "c+gguf", 50), ("kv", "gguf", 16)):
        _, fin = run_to_end(embedded.model, embedded.tokenizer, PROMPT, GenerationConfig(
            strategy=strategy, max_new_tokens=n, attention_rows=False,
            fast=FastPathConfig.from_spec(spec)), steps=STEPS)
        assert list(fin.tokens) == GOLDEN_TOKENS[:n], (strategy, spec)
    blocks = prepare(embedded.model, FastPathConfig(weights="gguf"))
    assert isinstance(blocks.layers[0].mlp.w_up, GGUFLinear)
    assert blocks.layers[0].mlp.w_up.matrix.type_name == "Q4_1"
    assert blocks.tok_emb.matrix.type_name == "Q8_0"
    # The file's bytes, not a copy: the blocks live inside the file's memory map.
    assert decode_bytes(blocks) < 100e6


@pytest.mark.slow
@needs_kernels
def test_embedded_loads_straight_from_the_map(tmp_path, monkeypatch):
    from engine.fast.gguf_weights import load_gguf_blocks
    monkeypatch.setenv("MINILLM_CACHE", str(tmp_path / "no-cache"))
    lm = load_gguf_blocks(None, "cpu")
    assert is_block_model(lm.model)
    assert not (tmp_path / "no-cache").exists() or not any((tmp_path / "no-cache").iterdir())
    from tests.engine.test_golden import GOLDEN_TOKENS, PROMPT
    _, fin = run_to_end(lm.model, lm.tokenizer, PROMPT, GenerationConfig(
        max_new_tokens=12, attention_rows=False, fast=FastPathConfig.from_spec("c+gguf")),
        steps=STEPS)
    assert list(fin.tokens) == GOLDEN_TOKENS[:12]


@needs_kernels
def test_session_offers_and_races_gguf_as_an_exact_option(files, tokenizer):
    """What the app's engine process serves (engine.session): c+gguf and gguf are usable beside
    a float32 model read from a GGUF (and refused, with the reason, for one that was not); a
    race puts them next to the reference with identical tokens."""
    from types import SimpleNamespace
    from engine.events import RaceFinished
    from engine.requests import RaceRequest, RunRequest
    from engine.session import Session
    path, ref = files("llama", T.Q4_1)
    session = Session(SimpleNamespace(model=ref, tokenizer=tokenizer, config=ref.cfg,
                                      name="tiny"))
    ready = session.ready()
    assert ready.fast["c+gguf"] is None and ready.fast["gguf"] is None
    runs = tuple(RunRequest("The cat", GenerationConfig(max_new_tokens=12, stop_at_eos=False,
                                                        fast=FastPathConfig.from_spec(spec)), i)
                 for i, spec in enumerate(("", "c+gguf", "gguf"), start=1))
    done = [e.event for e in session.race(RaceRequest(race_id=9, runs=runs))
            if isinstance(e.event, RaceFinished)][0]
    assert [r.error for r in done.rows] == [None] * 3
    assert done.rows[1].same_tokens and done.rows[2].same_tokens
    assert done.rows[1].max_logit_delta < 1e-4
    plain = Session(SimpleNamespace(model=tiny_model("llama"), tokenizer=tokenizer,
                                    config=ref.cfg, name="tiny"))
    assert "not loaded from a .gguf" in plain.ready().fast["c+gguf"]


@needs_kernels
def test_bench_rows_for_gguf(files, tmp_path, monkeypatch):
    """`bench --fast c+gguf --fast gguf` on a GGUF: both rows identical to the reference, fewer
    bytes per token than float32 and int8, and the format ceilings side by side."""
    import json
    from cli.main import main as cli_main
    monkeypatch.setenv("MINILLM_CACHE", str(tmp_path / "cache"))
    path, _ = files("llama", T.Q4_1)
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("The cat sat on the mat because")
    out = tmp_path / "bench.json"
    before = torch.get_num_threads()
    try:
        assert cli_main(["bench", "--model", str(path), "--device", "cpu", "--quick",
                         "--strategies", "kv", "--backends", "sdpa", "--threads", "1",
                         "--no-progress", "--prompt-file", str(prompt), "--fast", "c+gguf",
                         "--fast", "gguf", "--json", str(out)]) == 0
    finally:
        torch.set_num_threads(before)
    doc = json.loads(out.read_text())
    assert doc["prompt_tokens"] == len("The cat sat on the mat because")     # one byte a token
    rows = {r["label"]: r for r in doc["rows"]}
    assert "transformers (no cache)" not in rows          # only timed beside naive
    for label in ("kv/sdpa +c+gguf", "kv/sdpa +gguf"):
        assert rows[label]["identical"] is True, rows[label]
    fmt = {f["format"].split(" ")[0]: f for f in doc["bandwidth"]["formats"]}
    sizes = [fmt[k]["weight_bytes"] for k in ("gguf", "int8", "float32")]
    assert sizes == sorted(sizes) and len(set(sizes)) == 3
    assert "Q4_1" in next(f["format"] for f in doc["bandwidth"]["formats"]
                          if f["format"].startswith("gguf"))
    per_row = {r["label"]: r for r in doc["bandwidth"]["rows"]}
    assert per_row["kv/sdpa +c+gguf"]["weight_bytes"] == fmt["gguf"]["weight_bytes"]
    assert "bytes per token" in markdown.markdown(doc)


def test_bench_prompt_file_errors_are_one_line(tmp_path):
    from cli.main import main as cli_main
    code = cli_main(["bench", "--prompt-file", str(tmp_path / "missing.txt"), "--quick"])
    assert code == 2


ARM_HARNESS = r"""
#include "decode_step.c"
#include <stdio.h>
/* argv: files of (type, rows, cols, row bytes) + blocks + x + dequantised + y + |W|·|x| */
int main(int argc, char **argv) {
    int fails = 0;
    for (int a = 1; a < argc; a++) {
        FILE *f = fopen(argv[a], "rb");
        int64_t h[4];
        if (!f || fread(h, 8, 4, f) != 4) return 2;
        int64_t rows = h[1], cols = h[2], rb = h[3];
        uint8_t *w = malloc(rows * rb);
        float *x = malloc(4 * cols), *deq = malloc(4 * rows * cols), *y = malloc(4 * rows),
              *scale = malloc(4 * rows), *out = malloc(4 * rows * cols), *got = malloc(4 * rows);
        if (fread(w, 1, rows * rb, f) + fread(x, 4, cols, f) + fread(deq, 4, rows * cols, f) +
            fread(y, 4, rows, f) + fread(scale, 4, rows, f) == 0) return 2;
        fclose(f);
        int bad = gguf_row_bytes((int)h[0], cols) != rb;
        bad |= gguf_dequant((int)h[0], w, NULL, out, rows, cols, 2) != 0;
        bad |= memcmp(out, deq, 4 * rows * cols) != 0;
        bad |= gguf_gemv((int)h[0], w, NULL, x, NULL, got, rows, cols, 2) != 0;
        for (int64_t r = 0; r < rows; r++)
            bad |= fabsf(got[r] - y[r]) > 1e-5f * scale[r] + 1e-6f;
        printf("%s %s\n", argv[a], bad ? "FAIL" : "ok");
        fails += bad;
    }
    return fails != 0;
}
"""


@pytest.mark.skipif(not (__import__("shutil").which("aarch64-linux-gnu-gcc") and
                         __import__("shutil").which("qemu-aarch64")),
                    reason="needs an aarch64 cross-compiler and qemu-user")
def test_kernels_on_arm_give_the_same_numbers(tmp_path):
    """What an ARM laptop builds (no AVX2: the lanes loops, which the compiler turns into NEON;
    with and without OpenMP), run under qemu: dequantisation bit-exact, products within
    float32 rounding, for every block type."""
    import struct
    rng = np.random.default_rng(7)
    files = []
    for qtype in SMALL + K_QUANTS + [T.F16, T.F32]:
        rows, cols = 19, 512
        if qtype in FLOATS:
            blocks = np.ascontiguousarray(encode(rng.normal(size=(rows, cols)), qtype, rng))
            blocks = blocks.view(np.uint8).reshape(rows, -1)
        else:
            blocks = random_blocks(qtype, rows, cols, rng)
        deq = gguf.quants.dequantize(blocks, qtype).astype(np.float32)
        x = rng.normal(size=cols).astype(np.float32)
        y = (deq.astype(np.float64) @ x.astype(np.float64)).astype(np.float32)
        scale = (np.abs(deq).astype(np.float64) @ np.abs(x).astype(np.float64)).astype(np.float32)
        path = tmp_path / f"{qtype.name}.bin"
        path.write_bytes(struct.pack("<4q", int(qtype), rows, cols, blocks.shape[1]) +
                         b"".join(a.tobytes() for a in (blocks, x, deq, y, scale)))
        files.append(str(path))
    (tmp_path / "harness.c").write_text(ARM_HARNESS)
    for flags in ([], ["-fopenmp"]):
        exe = tmp_path / f"harness{'-omp' if flags else ''}"
        subprocess.run(["aarch64-linux-gnu-gcc", "-O3", "-ffp-contract=off", *flags, "-static",
                        "-I", str(ROOT / "engine" / "fast"), str(tmp_path / "harness.c"),
                        "-o", str(exe), "-lm"], check=True, capture_output=True)
        run = subprocess.run(["qemu-aarch64", str(exe), *files], capture_output=True, text=True,
                             timeout=300)
        assert run.returncode == 0, run.stdout + run.stderr
        assert run.stdout.count(" ok") == len(files)
