"""The engine's forward equals Hugging Face's reference models on the same random weights."""

from __future__ import annotations

import pytest
import torch

from engine.attention.naive import NaiveAttention
from engine.config import ModelConfig
from engine.decoding import CachedAttention
from engine.loader import build_model, hf_to_engine

transformers = pytest.importorskip("transformers")

HF_CLASSES = {"llama": ("LlamaConfig", "LlamaForCausalLM"),
              "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
              "gpt2": ("GPT2Config", "GPT2LMHeadModel")}


def hf_reference(cfg: ModelConfig, seed: int = 0):
    conf_name, model_name = HF_CLASSES[cfg.family]
    hf_cfg = getattr(transformers, conf_name)(**cfg.to_hf())
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(hf_cfg).eval()
    # Default init is tiny (std 0.02) and makes every logit ≈ 0; widen it so a wrong
    # wiring shows up as a large difference.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def engine_logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(ids, 0, CachedAttention(NaiveAttention()))


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("length", [1, 5, 33])
def test_logits_match_hugging_face(family, length):
    cfg = ModelConfig.from_name(f"tiny-{family}")
    ref = hf_reference(cfg)
    ours = build_model(cfg, hf_to_engine(ref.state_dict(), cfg), torch.device("cpu"),
                       torch.float32)
    ids = torch.randint(0, cfg.vocab_size, (1, length), generator=torch.Generator().manual_seed(length))
    with torch.no_grad():
        expected = ref(ids).logits.float()
        got = engine_logits(ours, ids)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-4


def test_llama3_rope_scaling_matches_hugging_face():
    cfg = ModelConfig.from_name("tiny-llama")
    cfg.rope_scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    ref = hf_reference(cfg)
    ours = build_model(cfg, hf_to_engine(ref.state_dict(), cfg), torch.device("cpu"),
                       torch.float32)
    ids = torch.randint(0, cfg.vocab_size, (1, 100), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (engine_logits(ours, ids) - ref(ids).logits).abs().max().item()
    assert diff <= 1e-4


def test_config_round_trips_through_hugging_face_json():
    for family in ("llama", "qwen2", "gpt2"):
        cfg = ModelConfig.from_name(f"tiny-{family}")
        back = ModelConfig.from_hf(cfg.to_hf())
        assert back == cfg
