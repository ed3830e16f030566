"""The batch engine's packed projections (engine/packed_linear.py): the same products as
F.linear to float32 rounding, a copy of the model that leaves the model itself alone, and only
where oneDNN can run them (float32, CPU, plain nn.Linear weights).

The batching tests (tests/engine/test_batch.py) run the batch engine with this layer in place
and hold every request to its lone run's tokens and logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.attention import get_backend
from engine.batch import BatchEngine
from engine.config import FastPathConfig
from engine.fast import prepare
from engine.model import Transformer
from engine.packed_linear import PackedLinear, can_pack, onednn_works, packed_model
from engine.scheduler import SchedulerConfig
from tests.conftest import FAMILIES, byte_tokenizer, tiny_model

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not onednn_works(), reason="this PyTorch has no usable oneDNN")]


@pytest.mark.parametrize("rows", [1, 2, 3, 8, 17, 100])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_equals_f_linear(rows, bias):
    """Any number of rows (the layout is chosen for 8), 2-D and 3-D inputs, with and without a
    bias: F.linear's numbers to float32 rounding (another order of additions, nothing else)."""
    torch.manual_seed(rows)
    linear = nn.Linear(96, 80, bias=bias)
    packed = PackedLinear(linear)
    x = torch.randn(rows, 96)
    with torch.inference_mode():
        want = F.linear(x, linear.weight, linear.bias)
        torch.testing.assert_close(packed(x), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(packed(x[None]), want[None], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_model_is_a_copy_with_the_same_logits(family):
    """Every projection packed (Q/K/V and gate/up fused first); the embedding and norms are the
    model's own tensors; the model itself is untouched; logits within float32 rounding."""
    model = tiny_model(family, dtype=torch.float32)
    linears = {name: m for name, m in model.named_modules() if type(m) is nn.Linear}
    packed = packed_model(model)
    assert packed is not model and packed_model(model) is packed       # built once
    assert not any(type(m) is nn.Linear for m in packed.modules())
    assert sum(isinstance(m, PackedLinear) for m in packed.modules()) > 0
    assert packed.tok_emb.weight is model.tok_emb.weight
    assert packed.norm.weight is model.norm.weight
    assert {name: m for name, m in model.named_modules() if type(m) is nn.Linear} == linears
    tokens = torch.randint(0, model.cfg.vocab_size, (1, 12), generator=torch.Generator()
                           .manual_seed(0))
    sdpa = get_backend("sdpa", model.device)

    def attend(layer, q, k, v):                      # the whole prompt at once, causal
        return sdpa.attend(q, k, v, q_offset=0)

    with torch.inference_mode():
        want = model(tokens, 0, attend)
        got = packed(tokens, 0, attend)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_packing_applies_only_where_onednn_runs_it():
    """float64, and models whose projections are not plain float32 nn.Linear (int8 weights
    here), run as they are."""
    m64 = tiny_model("llama", dtype=torch.float64)
    assert not can_pack(m64) and packed_model(m64) is m64
    int8 = prepare(tiny_model("llama", dtype=torch.float32), FastPathConfig(weights="int8"))
    assert not can_pack(int8) and packed_model(int8) is int8


def test_the_batch_engine_packs_by_default_and_can_be_told_not_to():
    model = tiny_model("llama", dtype=torch.float32)
    cfg = SchedulerConfig(max_batch=2, block_size=4, num_blocks=16)
    on = BatchEngine(model, byte_tokenizer(), cfg, snapshots=False)
    off = BatchEngine(model, byte_tokenizer(), cfg, snapshots=False, packed=False)
    assert isinstance(on.runner.model, Transformer) and on.runner.model is packed_model(model)
    assert off.runner.model is model
