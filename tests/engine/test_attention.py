"""Every attention backend against the naive reference, through the same door the model uses.

Each case builds queries and keys for one step — a prompt (prefill), one new token (decode) or a
few new tokens after a prefix (extend) — writes the earlier keys into a cache (none, contiguous
or paged), and runs `engine.decoding.CachedAttention` with the backend under test, so the paged
case really reads through a scrambled block table. The reference is `NaiveAttention` on the full
K/V.

Tolerances, tied to the dtype:
  float32   max |Δ| ≤ 1e-5 (the exact paths' bound). Every backend sums in float32; only the order of
            the additions differs, which costs ~1e-7 here.
  bfloat16  |Δ| ≤ 2⁻⁷·|ref| + 2⁻⁸. A bfloat16 keeps 8 significant bits, so rounding a float32
            result moves it by at most half a unit in the last place (ulp), ≤ 2⁻⁸·|x|; two
            results rounded separately — ours and the reference's — may land one ulp apart,
            ≤ 2⁻⁷·|x|. FlashAttention kernels also round the probabilities P to bfloat16 before
            P·V (relative error 2⁻⁹ per term); the outputs are averages of V entries of size ~1,
            which the absolute 2⁻⁸ covers.

Triton runs under its interpreter on a machine without CUDA (slow: small sizes only).
"""

from __future__ import annotations

import importlib.util
import os

import torch

if not torch.cuda.is_available():
    # Must be set before the first Triton kernel is wrapped (engine.attention.triton_kernels
    # wraps them on first use, so setting it at import time of the tests is early enough).
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

from engine.attention import backend_names, get_backend  # noqa: E402
from engine.attention.naive import NaiveAttention  # noqa: E402
from engine.cache import BlockPool, ContiguousKVCache, PagedKVCache  # noqa: E402
from engine.config import ConfigError  # noqa: E402
from engine.decoding import CachedAttention  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
HAS_TRITON = importlib.util.find_spec("triton") is not None
TILE = 16          # flash tile; lengths 32 and 37 are / are not multiples of it
TRITON_TILE = 32   # fewer, larger programs: much faster in the interpreter
BLOCK_SIZE = 16    # paged cache block size
HEADS = {"mha": (4, 4), "gqa3": (6, 2), "gqa4": (8, 2), "mqa": (4, 1)}   # (n_heads, n_kv)
TOL = {torch.float32: "max |Δ| ≤ 1e-5", torch.bfloat16: "|Δ| ≤ 2⁻⁷·|ref| + 2⁻⁸"}


def make_backend(name: str):
    if name == "triton" and not HAS_TRITON:
        pytest.skip("triton is not installed")
    # split_blocks=1: triton's paged decode splits the block table into one-block chunks, so
    # 32 and 37 keys (2 and 3 blocks of 16) exercise its merge of partial results.
    return get_backend(name, DEVICE, tile=TRITON_TILE if name == "triton" else TILE,
                       split_blocks=1)


def make_cache(kind: str, n_heads: int, n_kv: int, hd: int, capacity: int, dtype):
    """A one-layer cache; the paged pool's free list is shuffled so the block table is not
    simply 0, 1, 2, … and a kernel that ignored it would read the wrong keys."""
    if kind == "kv":
        return ContiguousKVCache(1, n_kv, hd, capacity, dtype, DEVICE, n_heads=n_heads)
    blocks = -(-capacity // BLOCK_SIZE) + 3
    pool = BlockPool(1, n_kv, hd, blocks, BLOCK_SIZE, dtype, DEVICE, n_heads=n_heads)
    pool.free_list = [pool.free_list[i] for i in torch.randperm(blocks).tolist()]
    return PagedKVCache(pool)


def attend_through_cache(backend, kind: str, q, k, v, q_offset: int) -> torch.Tensor:
    """Run one step as generation does. k, v hold all keys (1, n_kv, Tk, hd); the first
    q_offset of them are written to the cache beforehand, as an earlier step would have."""
    if kind == "none":
        return backend.attend(q, k, v, q_offset)
    B, H, Tq, hd = q.shape
    cache = make_cache(kind, H, k.shape[1], hd, k.shape[2], q.dtype)
    if q_offset:   # the history, written by an earlier step (its output is not under test)
        earlier = CachedAttention(NaiveAttention(), cache)
        earlier.begin(0, q_offset)
        earlier(0, torch.zeros(B, H, q_offset, hd, dtype=q.dtype, device=q.device),
                k[:, :, :q_offset], v[:, :, :q_offset])
        earlier.end(q_offset)
    step = CachedAttention(backend, cache)
    step.begin(q_offset, Tq)
    out = step(0, q, k[:, :, q_offset:], v[:, :, q_offset:])
    step.end(q_offset + Tq)
    return out


def random_step(phase: str, n_heads: int, n_kv: int, hd: int, length: int, dtype, batch=1):
    """q for the new positions and K/V for all `length` positions; returns (q, k, v, q_offset)."""
    tq = {"prefill": length, "decode": 1, "extend": 5}[phase]
    g = torch.Generator().manual_seed(1000 * length + 10 * hd + n_heads + n_kv)
    q = torch.randn(batch, n_heads, tq, hd, generator=g)           # (B, H, Tq, hd)
    k = torch.randn(batch, n_kv, length, hd, generator=g)          # (B, n_kv, Tk, hd)
    v = torch.randn(batch, n_kv, length, hd, generator=g)
    return (*(t.to(DEVICE, dtype) for t in (q, k, v)), length - tq)


def assert_close_to_naive(out, ref, dtype):
    assert out.shape == ref.shape and out.dtype == ref.dtype
    diff = (out.float() - ref.float()).abs()
    if dtype == torch.float32:
        limit = torch.full_like(diff, 1e-5)
    else:
        limit = 2**-7 * ref.float().abs() + 2**-8
    worst = (diff - limit).argmax()
    assert (diff <= limit).all(), (f"{TOL[dtype]} violated: |Δ| = {diff.flatten()[worst]:.3g} "
                                   f"where ref = {ref.flatten()[worst].item():.3g}")


def cases():
    """The grid: every backend × dtype × cache/phase × head layout × (head dim, length).

    Lengths 32 and 37 are and are not multiples of the tile (16; triton's 32) and of the block
    size (16). Not the full product — each dimension is crossed with the others where they
    interact: float32 gets every layout, bfloat16 a spread. Triton in the interpreter costs
    0.2–3 s a call, so on a CPU it gets a thinner slice of the same grid.
    """
    slow_triton = DEVICE.type != "cuda"
    steps = [("none", "prefill"), ("kv", "prefill"), ("kv", "decode"),
             ("paged", "prefill"), ("paged", "decode")]
    out = []

    def add(backend, dtype, kind, phase, heads, hd, length):
        out.append(pytest.param(backend, dtype, kind, phase, heads, hd, length,
                                id=f"{backend}-{str(dtype)[6:]}-{kind}-{phase}-{heads}-"
                                   f"hd{hd}-T{length}"))

    for backend in ("sdpa", "flash", "triton"):
        thin = backend == "triton" and slow_triton
        for kind, phase in steps:
            for heads in HEADS:
                shapes = [(64, 37), (128, 32)] if thin else [(64, 32), (64, 37), (128, 37)]
                for hd, length in shapes:
                    if thin and hd == 128 and heads not in ("mha", "gqa3"):
                        continue
                    add(backend, torch.float32, kind, phase, heads, hd, length)
            for heads in ("gqa3",) if thin else ("mha", "gqa3"):
                for hd, length in [(64, 37)] if thin else [(64, 37), (128, 32)]:
                    add(backend, torch.bfloat16, kind, phase, heads, hd, length)
        # A few new tokens after a prefix (chunked prefill): the mask is neither causal-square
        # nor absent.
        for kind in ("kv", "paged"):
            for heads in ("gqa3",) if thin else ("gqa3", "gqa4"):
                add(backend, torch.float32, kind, "extend", heads, 64, 37)
    return out


@pytest.mark.parametrize("name, dtype, kind, phase, heads, hd, length", cases())
def test_backend_matches_naive(name, dtype, kind, phase, heads, hd, length):
    backend = make_backend(name)
    n_heads, n_kv = HEADS[heads]
    batch = 2 if kind == "none" else 1      # the paged cache holds one sequence
    q, k, v, q_offset = random_step(phase, n_heads, n_kv, hd, length, dtype, batch)
    out = attend_through_cache(backend, kind, q, k, v, q_offset)
    ref = NaiveAttention().attend(q, k, v, q_offset)
    assert_close_to_naive(out, ref, dtype)


@pytest.mark.parametrize("tile", [1, 5, 16, 64, 100])
@pytest.mark.parametrize("phase", ["prefill", "decode", "extend"])
def test_flash_any_tile_size(tile, phase):
    """Tiles larger than the sequence, of size 1, and not dividing it all give the same answer."""
    backend = get_backend("flash", DEVICE, tile=tile)
    q, k, v, q_offset = random_step(phase, 6, 2, 64, 37, torch.float32)
    ref = NaiveAttention().attend(q, k, v, q_offset)
    assert_close_to_naive(backend.attend(q, k, v, q_offset), ref, torch.float32)


@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_flash_trace_is_the_online_softmax_state(phase):
    """After the last tile the running max is the row's max score, and max + log(sum) is its
    log-sum-exp; the running max never decreases; there is one entry per tile."""
    backend = get_backend("flash", DEVICE, tile=8, trace=True)
    q, k, v, q_offset = random_step(phase, 6, 2, 64, 37, torch.float32)
    backend.current_layer = 3
    backend.attend(q, k, v, q_offset)
    trace = backend.tile_trace
    scores = (q[0, 0, -1].float() @ k[0, 0].float().T) / 64**0.5    # head 0, newest query
    assert trace["layer"] == 3 and trace["head"] == 0 and trace["tile_size"] == 8
    assert len(trace["running_max"]) == len(trace["running_sum"]) == 5    # ⌈37 / 8⌉
    assert list(trace["running_max"]) == sorted(trace["running_max"])
    m, s = trace["running_max"][-1], trace["running_sum"][-1]
    assert m == pytest.approx(scores.max().item(), abs=1e-5)
    assert m + torch.log(torch.tensor(s)).item() == pytest.approx(
        torch.logsumexp(scores, 0).item(), abs=1e-5)


def test_flash_trace_off_by_default():
    backend = get_backend("flash", DEVICE)
    q, k, v, q_offset = random_step("decode", 4, 4, 64, 37, torch.float32)
    backend.attend(q, k, v, q_offset)
    assert not backend.tile_trace


def test_registry_lists_every_backend():
    assert {"naive", "sdpa", "flash", "triton"} <= set(backend_names())
    assert get_backend("triton").caps.paged_native
    assert get_backend("flash").caps.needs_cuda is False


def test_triton_without_gpu_or_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ConfigError, match="TRITON_INTERPRET=1"):
        get_backend("triton", "cpu")


def test_triton_not_installed_is_a_clear_error(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "engine.attention.triton_kernels", None)   # import fails
    with pytest.raises(ConfigError, match="Triton is not installed"):
        get_backend("triton", "cpu")


def test_sdpa_reports_its_kernel():
    backend = get_backend("sdpa", DEVICE)
    q, k, v, q_offset = random_step("prefill", 6, 2, 64, 32, torch.float32)
    backend.attend(q, k, v, q_offset)
    kernel = backend.last_info()["kernel"]
    if DEVICE.type == "cuda":
        assert kernel in ("flash", "memory-efficient", "math")
    else:
        assert kernel == "cpu-fused"
