"""Loading GGUF files and Hugging Face folders, the conversion cache, and clear errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from engine.attention.naive import NaiveAttention
from engine.config import ConfigError, ModelConfig
from engine.decoding import CachedAttention
from engine.loader import ModelLoadError, cache_root, gguf_cache_key, load_model
from tests.conftest import byte_tokenizer
from tests.engine.gguf_writer import write_tiny_llama_gguf

transformers = pytest.importorskip("transformers")


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("MINILLM_CACHE", str(d))
    return d


def hf_llama(seed=0):
    cfg = ModelConfig.from_name("tiny-llama")
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg.to_hf())).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def write_hf_folder(folder: Path, model) -> Path:
    model.save_pretrained(folder, safe_serialization=True)
    byte_tokenizer().backend.save(str(folder / "tokenizer.json"))
    return folder


def naive_logits(model, ids):
    with torch.no_grad():
        return model(ids, 0, CachedAttention(NaiveAttention()))


def test_hf_folder_loads_and_matches(tmp_path):
    ref = hf_llama()
    folder = write_hf_folder(tmp_path / "tiny", ref)
    lm = load_model(str(folder), device="cpu")
    ids = torch.tensor([lm.tokenizer.encode("hello, world")])
    with torch.no_grad():
        expected = ref(ids).logits
    assert (naive_logits(lm.model, ids) - expected).abs().max() <= 1e-4
    assert lm.tokenizer.decode(ids[0].tolist()) == "hello, world"


def test_gguf_loads_unpermutes_and_caches(tmp_path, cache_dir):
    ref = hf_llama(1)
    path = tmp_path / "tiny.gguf"
    tokens = sorted(__import__("tokenizers").pre_tokenizers.ByteLevel.alphabet())
    write_tiny_llama_gguf(path, ref, tokens)
    first = load_model(str(path), device="cpu")
    assert first.converted
    ids = torch.tensor([first.tokenizer.encode("rotary heads")])
    with torch.no_grad():
        expected = ref(ids).logits
    # F32 tensors: only the Q/K un-permutation stands between the file and HF's model
    assert (naive_logits(first.model, ids) - expected).abs().max() <= 1e-4
    assert first.config.eos_token_ids == (1,)
    second = load_model(str(path), device="cpu")
    assert not second.converted                      # read from the cache, not converted again
    assert Path(second.hf_folder).parent == cache_dir
    assert torch.equal(naive_logits(second.model, ids), naive_logits(first.model, ids))


def test_quantised_gguf_dequantises(tmp_path, cache_dir):
    ref = hf_llama(2)
    path = tmp_path / "q8.gguf"
    tokens = sorted(__import__("tokenizers").pre_tokenizers.ByteLevel.alphabet())
    write_tiny_llama_gguf(path, ref, tokens, quantize_embeddings=True)
    lm = load_model(str(path), device="cpu")
    emb = lm.model.tok_emb.weight
    ref_emb = ref.model.embed_tokens.weight
    # Q8_0 keeps 8 bits per weight with one scale per 32: error ≤ scale/2 ≈ max|w|/254
    assert (emb - ref_emb).abs().max() <= ref_emb.abs().max() / 200


def test_half_written_cache_entry_is_redone(tmp_path, cache_dir):
    ref = hf_llama(3)
    path = tmp_path / "tiny.gguf"
    tokens = sorted(__import__("tokenizers").pre_tokenizers.ByteLevel.alphabet())
    write_tiny_llama_gguf(path, ref, tokens)
    entry = cache_root() / gguf_cache_key(path)
    entry.mkdir(parents=True)
    (entry / "config.json").write_text("{}")            # as if killed mid-conversion
    (entry / "model.safetensors").write_bytes(b"\0" * 10)
    lm = load_model(str(path), device="cpu")
    assert lm.converted
    assert (entry / "complete.json").is_file()


def test_read_only_cache_falls_back_to_memory(tmp_path, monkeypatch):
    ref = hf_llama(4)
    path = tmp_path / "tiny.gguf"
    tokens = sorted(__import__("tokenizers").pre_tokenizers.ByteLevel.alphabet())
    write_tiny_llama_gguf(path, ref, tokens)
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("MINILLM_CACHE", str(blocker / "cache"))
    lm = load_model(str(path), device="cpu")
    assert lm.converted and lm.hf_folder is None
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        assert (naive_logits(lm.model, ids) - ref(ids).logits).abs().max() <= 1e-4


def test_missing_path():
    with pytest.raises(ModelLoadError, match="not found"):
        load_model("/definitely/not/here.gguf")


def test_corrupt_gguf(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(200))
    with pytest.raises(ModelLoadError, match="not a valid GGUF"):
        load_model(str(bad))


def test_truncated_safetensors(tmp_path):
    folder = write_hf_folder(tmp_path / "tiny", hf_llama())
    st = folder / "model.safetensors"
    st.write_bytes(st.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match="corrupt or truncated"):
        load_model(str(folder))


def test_unsupported_architecture_is_named(tmp_path):
    folder = tmp_path / "bert"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ConfigError, match="'bert'.*supported: llama, qwen2, gpt2"):
        load_model(str(folder))


def test_pickle_checkpoints_are_refused(tmp_path):
    folder = tmp_path / "old"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(ModelConfig().to_hf()))
    (folder / "pytorch_model.bin").write_bytes(b"not even opened")
    with pytest.raises(ModelLoadError, match="arbitrary code"):
        load_model(str(folder))
    with pytest.raises(ModelLoadError, match="arbitrary code"):
        load_model(str(folder / "pytorch_model.bin"))


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path))


def test_unknown_device_and_dtype():
    with pytest.raises(ConfigError, match="unknown device"):
        load_model(None, device="tpu")
    with pytest.raises(ConfigError, match="unknown dtype"):
        load_model(None, device="cpu", dtype="float8")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            load_model(None, device="cuda")
