"""Files on disk are claims, not facts: lying metadata, hostile shapes, NaN weights,
FIFOs, a damaged or planted conversion cache, a full disk, signals during a cold start, and
GPT-2 GGUF files with llama.cpp's tensor names.

Every file here is tiny (a two-layer model written by tests/engine/gguf_writer.py); nothing loads
the embedded model.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.attention.naive import NaiveAttention
from engine.config import ConfigError, ModelConfig, UnsupportedModel
from engine.decoding import CachedAttention
from engine.loader import ModelLoadError, cache_root, gguf_cache_key, load_model
from tests.conftest import byte_tokenizer
from tests.engine.gguf_writer import byte_tokens, gguf_parts, write_gguf

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[2]
IS_ROOT = hasattr(os, "getuid") and os.getuid() == 0
OTHER_UID = 65534                                   # "nobody"


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("MINILLM_CACHE", str(d))
    return d


def hf_model(family: str = "llama", seed: int = 0):
    cfg = ModelConfig.from_name(f"tiny-{family}")
    torch.manual_seed(seed)
    if family == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**cfg.to_hf()))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg.to_hf()))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def tiny_gguf(path: Path, family="llama", seed=0, edit=None) -> Path:
    """Write a tiny GGUF; `edit(meta, tensors)` may make it lie first."""
    arch, meta, tensors = gguf_parts(hf_model(family, seed), byte_tokens())
    if edit:
        arch = edit(meta, tensors) or arch
    write_gguf(path, arch, meta, tensors)
    return path


def logits(model, ids):
    with torch.no_grad():
        return model(ids, 0, CachedAttention(NaiveAttention()))


def partials(folder: Path) -> list[Path]:
    return sorted(folder.glob(".partial-*")) if folder.exists() else []


# ----------------------------------------------------------------------------- lying GGUF metadata
def _set(key, value):
    def edit(meta, tensors):
        meta[key] = value
    return edit


def _drop(key):
    def edit(meta, tensors):
        del meta[key]
    return edit


def _drop_tensor(name):
    def edit(meta, tensors):
        del tensors[name]
    return edit


def _extra_tokens(meta, tensors):
    meta["tokenizer.ggml.tokens"] = byte_tokens() + [f"<extra{i}>" for i in range(40)]
    meta["tokenizer.ggml.token_type"] = [1] * (256 + 40)


def _narrow_q(meta, tensors):
    tensors["blk.1.attn_q.weight"] = tensors["blk.1.attn_q.weight"][:-8]   # one head of 16 → 8


def _nan_weight(meta, tensors):
    tensors["blk.1.ffn_up.weight"] = tensors["blk.1.ffn_up.weight"].copy()
    tensors["blk.1.ffn_up.weight"][3, 5] = np.nan


def _inf_weight(meta, tensors):
    tensors["output_norm.weight"] = tensors["output_norm.weight"].copy()
    tensors["output_norm.weight"][0] = np.inf


def _odd_tensor(meta, tensors):
    tensors["blk.0.attn_mystery.weight"] = np.zeros((4, 4), np.float32)


@pytest.mark.parametrize("edit, error, text", [
    (_set("llama.block_count", 10**9), ModelLoadError, "block_count = 1000000000 is out of range (1 … 512)"),
    (_set("llama.block_count", 3), ModelLoadError, "block_count = 3, but the file holds tensors for 2 layers"),
    (_set("llama.context_length", 50_000_000), ModelLoadError, "context_length = 50000000 is out of range"),
    (_drop("llama.attention.head_count"), ModelLoadError, "has no llama.attention.head_count"),
    (_set("llama.attention.head_count", 0), ModelLoadError, "head_count = 0 is out of range"),
    (_set("llama.attention.head_count", 4.0), ModelLoadError, "head_count must be an integer"),
    (_set("llama.embedding_length", 65), ModelLoadError, "token_embd.weight is 64 wide"),
    (_set("llama.feed_forward_length", 1 << 19), ModelLoadError, "w_gate.weight has shape (128, 64), but the metadata"),
    (_drop("tokenizer.ggml.tokens"), ModelLoadError, "has no tokenizer.ggml.tokens"),
    (_extra_tokens, ModelLoadError, "vocabulary has 296 tokens but token_embd.weight only 256 rows"),
    (_set("tokenizer.ggml.eos_token_id", 9999), ModelLoadError, "eos_token_id = 9999 is not a token id"),
    (_drop_tensor("blk.1.ffn_down.weight"), ModelLoadError, "has no tensor for layers.1.mlp.w_down.weight"),
    (_narrow_q, ModelLoadError, "layers.1.attn.wq.weight has shape (56, 64)"),
    (_odd_tensor, ModelLoadError, "unexpected tensor blk.0.attn_mystery.weight"),
    (_nan_weight, ModelLoadError, "tensor model.layers.1.mlp.up_proj.weight holds 1 NaN/Inf values"),
    (_inf_weight, ModelLoadError, "tensor model.norm.weight holds 1 NaN/Inf values"),
    (_set("tokenizer.ggml.model", "bert"), UnsupportedModel, "tokenizer type 'bert' is not supported"),
    (lambda meta, tensors: "mamba", UnsupportedModel, "unsupported architecture 'mamba'"),
], ids=lambda x: x.__name__ if callable(x) else None)
def test_lying_gguf_metadata_is_one_clear_error(tmp_path, cache_dir, edit, error, text):
    path = tiny_gguf(tmp_path / "lie.gguf", edit=edit)
    with pytest.raises(error) as info:
        load_model(str(path), device="cpu")
    message = str(info.value)
    assert text in message and "\n" not in message
    assert not partials(cache_dir) and not list(cache_dir.glob("lie-*"))   # nothing cached


def test_a_claimed_context_of_a_million_builds_no_giant_tables(tmp_path):
    """In bounds but huge: the RoPE tables grow with the positions a run reaches (a 2^20
    context of head_dim 16 would be 128 MB of tables built up front)."""
    path = tiny_gguf(tmp_path / "long.gguf", edit=_set("llama.context_length", 1 << 20))
    lm = load_model(str(path), device="cpu")
    assert lm.config.max_seq_len == 1 << 20
    assert lm.model.rope_cos.shape[0] <= lm.model.ROPE_START
    ids = torch.tensor([list(range(5))])
    short = logits(lm.model, ids)
    lm.model.ensure_rope(10_000)                 # as a long run would: same numbers at 0…4
    assert lm.model.rope_cos.shape[0] >= 10_000
    assert torch.equal(logits(lm.model, ids), short)


def test_a_tensor_claiming_terabytes_is_refused(tmp_path):
    """The header says token_embd.weight has 2^40 rows; the file has a few KB of data."""
    path = tiny_gguf(tmp_path / "huge.gguf")
    data = bytearray(path.read_bytes())
    name = b"token_embd.weight"
    at = data.index(name) + len(name)                     # then n_dims (u32), dims (u64 each)
    assert int.from_bytes(data[at:at + 4], "little") == 2
    data[at + 12:at + 20] = (1 << 40).to_bytes(8, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match="huge.gguf is not a valid GGUF file"):
        load_model(str(path), device="cpu")


def test_truncated_gguf_at_every_tenth(tmp_path):
    full = tiny_gguf(tmp_path / "full.gguf").read_bytes()
    for i in range(1, 10):
        cut = tmp_path / f"cut{i}.gguf"
        cut.write_bytes(full[:len(full) * i // 10])
        with pytest.raises(ModelLoadError):
            load_model(str(cut), device="cpu")


def test_fewer_tokens_than_embedding_rows_loads(tmp_path):
    """A vocabulary smaller than the embedding (padded rows, as many models have) is fine."""
    def edit(meta, tensors):
        meta["tokenizer.ggml.tokens"] = byte_tokens()[:100]
        meta["tokenizer.ggml.token_type"] = [1] * 100
    lm = load_model(str(tiny_gguf(tmp_path / "small-vocab.gguf", edit=edit)), device="cpu")
    assert lm.config.vocab_size == 256 and lm.tokenizer.vocab_size == 100


# ----------------------------------------------------------------------------- lying config.json
def hf_folder(tmp_path: Path, name="tiny") -> Path:
    folder = tmp_path / name
    hf_model().save_pretrained(folder, safe_serialization=True)
    byte_tokenizer().backend.save(str(folder / "tokenizer.json"))
    return folder


def _config(change):
    def edit(folder: Path):
        cfg = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps(change(cfg)))
    return edit


def _tokenizer_bigger(folder: Path):
    cfg = json.loads((folder / "config.json").read_text())
    cfg["vocab_size"] = 200
    (folder / "config.json").write_text(json.dumps(cfg))
    from safetensors.torch import load_file, save_file
    sd = load_file(str(folder / "model.safetensors"))
    sd = {k: v[:200].contiguous() if k == "model.embed_tokens.weight" else v
          for k, v in sd.items()}
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _nan_safetensors(folder: Path):
    from safetensors.torch import load_file, save_file
    sd = load_file(str(folder / "model.safetensors"))
    sd["model.layers.0.self_attn.v_proj.weight"][1, 1] = float("nan")
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("edit, error, text", [
    (_config(lambda c: [c]), ModelLoadError, "config.json: config.json must hold a JSON object, not a list"),
    (_config(lambda c: {**c, "hidden_size": 64.0}), ModelLoadError, "hidden_size must be an integer, got 64.0"),
    (_config(lambda c: {**c, "num_hidden_layers": "2"}), ModelLoadError, "num_hidden_layers must be an integer, got '2'"),
    (_config(lambda c: {k: v for k, v in c.items() if k != "num_attention_heads"}), ModelLoadError, "has no 'num_attention_heads'"),
    (_config(lambda c: {**c, "num_attention_heads": 0}), ModelLoadError, "num_attention_heads = 0 is out of range"),
    (_config(lambda c: {**c, "num_hidden_layers": 10**9}), ModelLoadError, "num_hidden_layers = 1000000000 is out of range"),
    (_config(lambda c: {**c, "max_position_embeddings": 10**12}), ModelLoadError, "max_position_embeddings = 1000000000000 is out of range"),
    (_config(lambda c: {**c, "vocab_size": 300}), ModelLoadError, "tok_emb.weight has shape (256, 64), but the metadata"),
    (_config(lambda c: {**c, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}), UnsupportedModel, "RoPE scaling 'yarn' is not supported"),
    (_config(lambda c: {**c, "model_type": "bert"}), UnsupportedModel, "unsupported architecture 'bert'"),
    (_tokenizer_bigger, ModelLoadError, "the tokenizer has 256 tokens but the model only 200 embedding rows"),
    (lambda f: (f / "tokenizer.json").write_text('{"model": 5}'), ModelLoadError, "cannot read the tokenizer"),
    (lambda f: (f / "config.json").write_text("{not json"), ModelLoadError, "is not valid JSON"),
    (_nan_safetensors, ModelLoadError, "tensor model.layers.0.self_attn.v_proj.weight holds 1 NaN/Inf"),
])
def test_lying_config_json_is_one_clear_error(tmp_path, edit, error, text):
    folder = hf_folder(tmp_path)
    edit(folder)
    with pytest.raises(error) as info:
        load_model(str(folder), device="cpu")
    assert text in str(info.value) and "\n" not in str(info.value)


def test_unsupported_is_a_config_error_and_lies_are_load_errors():
    """Exit status 2 (change the command) for a model we do not implement; 1 for a broken one."""
    assert issubclass(UnsupportedModel, ConfigError)
    assert not issubclass(ModelLoadError, ConfigError)


# ----------------------------------------------------------------------------- not regular files
FIFO_RUNS = """
import sys
from cli.main import main
for target in sys.argv[1:]:
    print("exit", main(["run", "hi", "--model", target, "--device", "cpu"]), file=sys.stderr)
"""


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_fifo_never_hangs_the_load(tmp_path):
    """open() on a FIFO waits for a writer forever; the loader must refuse it at once, as the
    model file or as any file of a model folder. Run in a child process with a timeout, so a
    regression fails instead of hanging the suite."""
    targets = [tmp_path / "model.gguf"]
    os.mkfifo(targets[0])
    for name in ("config.json", "tokenizer.json", "model.safetensors"):
        folder = hf_folder(tmp_path, f"fifo-{name}")
        (folder / name).unlink()
        os.mkfifo(folder / name)
        targets.append(folder)
    proc = subprocess.run([sys.executable, "-c", FIFO_RUNS, *map(str, targets)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "MINILLM_CACHE": str(tmp_path / "c")})
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 2 * len(targets), proc.stderr
    for error, status in zip(lines[::2], lines[1::2]):
        assert status == "exit 1" and "is a FIFO, not a regular file" in error, proc.stderr
        assert error.startswith("error: ")


# ----------------------------------------------------------------------------- GPT-2 GGUF
def test_gpt2_gguf_with_llama_cpp_names_matches_transformers(tmp_path, cache_dir):
    """token_embd, position_embd, blk.N.attn_norm (weight + bias), the fused attn_qkv,
    attn_output, ffn_norm, ffn_up, ffn_down, output_norm, output: as llama.cpp writes GPT-2."""
    ref = hf_model("gpt2", seed=5)
    arch, meta, tensors = gguf_parts(ref, byte_tokens())
    assert arch == "gpt2" and "blk.0.attn_qkv.weight" in tensors and "output.weight" in tensors
    path = tmp_path / "gpt2.gguf"
    write_gguf(path, arch, meta, tensors)
    lm = load_model(str(path), device="cpu")
    assert lm.config.family == "gpt2" and lm.config.tie_embeddings and lm.converted
    ids = torch.tensor([lm.tokenizer.encode("the fused qkv of GPT-2")])
    with torch.no_grad():
        expected = ref(ids).logits
    assert (logits(lm.model, ids) - expected).abs().max() <= 1e-4
    # The conversion cache is an ordinary Hugging Face GPT-2 folder: transformers agrees.
    warm = load_model(str(path), device="cpu")
    assert not warm.converted and Path(warm.hf_folder).parent == cache_dir
    again = transformers.AutoModelForCausalLM.from_pretrained(warm.hf_folder).eval()
    with torch.no_grad():
        assert (again(ids).logits - expected).abs().max() <= 1e-5
    assert torch.equal(logits(warm.model, ids), logits(lm.model, ids))


# ----------------------------------------------------------------------------- the cache
def entry_of(path: Path) -> Path:
    return cache_root() / gguf_cache_key(path)


def flip_bit(file: Path, offset: int) -> None:
    data = bytearray(file.read_bytes())
    data[offset] ^= 0x10
    file.write_bytes(bytes(data))


def tensor_offset(st_file: Path, name: str) -> int:
    """Where tensor `name`'s bytes start in a safetensors file (8-byte length, JSON header)."""
    raw = st_file.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return 8 + n + json.loads(raw[8:8 + n])[name]["data_offsets"][0]


@pytest.mark.parametrize("damage", ["bit-in-a-tensor", "header", "config", "tokenizer",
                                    "manifest", "missing-file", "world-writable"])
def test_a_damaged_cache_entry_is_named_removed_and_redone(tmp_path, capfd, damage):
    path = tiny_gguf(tmp_path / "tiny.gguf", seed=3)
    first = load_model(str(path), device="cpu")
    entry = Path(first.hf_folder)
    assert entry == entry_of(path)
    weights = entry / "model.safetensors"
    if damage == "bit-in-a-tensor":     # one bit of layers.1's o_proj: silently wrong text before
        flip_bit(weights, tensor_offset(weights, "model.layers.1.self_attn.o_proj.weight") + 101)
    elif damage == "header":
        flip_bit(weights, 20)
    elif damage == "config":
        (entry / "config.json").write_text((entry / "config.json").read_text().replace("2", "3"))
    elif damage == "tokenizer":
        (entry / "tokenizer.json").write_text("{}")
    elif damage == "manifest":
        (entry / "complete.json").write_text("{")
    elif damage == "missing-file":
        (entry / "tokenizer_config.json").unlink()
    else:
        os.chmod(entry, 0o777)
    capfd.readouterr()
    again = load_model(str(path), device="cpu")
    err = capfd.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"note: conversion cache {entry} failed its check")
    assert again.converted                                   # converted afresh …
    ids = torch.tensor([[3, 30, 60, 90]])
    assert torch.equal(logits(again.model, ids), logits(first.model, ids))   # … right again
    third = load_model(str(path), device="cpu")              # and the new entry is trusted
    assert not third.converted and capfd.readouterr().err == ""


@pytest.mark.skipif(not IS_ROOT, reason="needs root to give a file to another user")
def test_a_cache_entry_owned_by_someone_else_is_not_read(tmp_path, capfd):
    path = tiny_gguf(tmp_path / "tiny.gguf")
    entry = Path(load_model(str(path), device="cpu").hf_folder)
    for f in [entry, *entry.iterdir()]:
        os.chown(f, OTHER_UID, OTHER_UID)
    capfd.readouterr()
    again = load_model(str(path), device="cpu")
    assert again.converted and f"owned by uid {OTHER_UID}" in capfd.readouterr().err
    assert entry.stat().st_uid == os.getuid()


@pytest.mark.skipif(not IS_ROOT, reason="needs root to give a folder to another user")
def test_a_cache_root_owned_by_someone_else_is_not_used(tmp_path, cache_dir, capfd):
    cache_dir.mkdir(mode=0o777)
    os.chmod(cache_dir, 0o777)
    os.chown(cache_dir, OTHER_UID, OTHER_UID)
    path = tiny_gguf(tmp_path / "tiny.gguf")
    lm = load_model(str(path), device="cpu")
    err = capfd.readouterr().err
    assert "not using the conversion cache" in err and f"owned by uid {OTHER_UID}" in err
    assert lm.converted and lm.hf_folder is None and list(cache_dir.iterdir()) == []


def test_the_cache_is_private_even_under_umask_000(tmp_path, cache_dir):
    old = os.umask(0)
    try:
        lm = load_model(str(tiny_gguf(tmp_path / "tiny.gguf")), device="cpu")
    finally:
        os.umask(old)
    entry = Path(lm.hf_folder)
    for p in (cache_dir, entry):
        assert stat.S_IMODE(p.stat().st_mode) == 0o700, p
    for f in entry.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f


def test_the_key_is_the_content_not_size_and_mtime(tmp_path):
    """Replace the GGUF by another of the same size and mtime: the old conversion is not used."""
    path = tiny_gguf(tmp_path / "tiny.gguf", seed=1)
    before = path.stat()
    first = load_model(str(path), device="cpu")
    tiny_gguf(path, seed=2)                                  # other weights, same shapes
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_size == before.st_size and path.stat().st_mtime_ns == before.st_mtime_ns
    second = load_model(str(path), device="cpu")
    assert second.converted and second.hf_folder != first.hf_folder
    ids = torch.tensor([[1, 2, 3]])
    assert not torch.equal(logits(second.model, ids), logits(first.model, ids))
    # the entry for the file as it was is superseded: removed, not left to fill the disk
    assert not Path(first.hf_folder).exists()


def test_an_older_format_entry_is_replaced(tmp_path, cache_dir):
    path = tiny_gguf(tmp_path / "tiny.gguf")
    old = cache_dir / "tiny-0123456789ab"                     # format 1: path|size|mtime key
    old.mkdir(parents=True)
    (old / "model.safetensors").write_bytes(b"\0" * 64)
    (old / "complete.json").write_text(json.dumps({"source": str(path), "sizes": {}}))
    load_model(str(path), device="cpu")
    assert not old.exists()


# ----------------------------------------------------------------------------- a full disk
def test_a_full_disk_is_one_notice_and_the_model_loads_from_memory(tmp_path, cache_dir,
                                                                  monkeypatch, capfd):
    from safetensors import SafetensorError
    import safetensors.torch

    def full(sd, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 100)              # a partial write, then the error
        raise SafetensorError("Error while serializing: IoError(No space left on device)")
    monkeypatch.setattr(safetensors.torch, "save_file", full)
    path = tiny_gguf(tmp_path / "tiny.gguf", seed=4)
    lm = load_model(str(path), device="cpu")
    lines = capfd.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "could not write the conversion cache" in lines[0]
    assert "No space left on device" in lines[0]
    assert lm.converted and lm.hf_folder is None
    assert list(cache_dir.iterdir()) == []                   # no .partial-*, no half entry
    ref = hf_model("llama", 4)
    ids = torch.tensor([[7, 8, 9]])
    with torch.no_grad():
        assert (logits(lm.model, ids) - ref(ids).logits).abs().max() <= 1e-4


@pytest.mark.skipif(not IS_ROOT or not Path("/proc/mounts").exists(), reason="needs mount")
def test_a_really_full_tmpfs(tmp_path, cache_dir, capfd):
    """The same on a real 256 KB tmpfs (the tiny model's weights are ~360 KB), if this machine
    lets us mount one."""
    cache_dir.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs", str(cache_dir)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        lm = load_model(str(tiny_gguf(tmp_path / "tiny.gguf")), device="cpu")
        err = capfd.readouterr().err
        assert "could not write the conversion cache" in err and err.count("\n") == 1
        assert lm.converted and lm.hf_folder is None
        assert list(cache_dir.iterdir()) == []
    finally:
        subprocess.run(["umount", str(cache_dir)], check=True)


# ----------------------------------------------------------------------------- signals
HOLD_IN_PARTIAL = """
import signal, sys
from engine.loader import load_model

def progress(message, fraction):
    if message == "writing the conversion cache" and fraction >= 0.9:
        print("weights written", file=sys.stderr, flush=True)   # the partial folder is full now
        signal.pause()                                           # until the test's signal

load_model(sys.argv[1], device="cpu", progress=progress)
"""


def start_cold_load(tmp_path: Path, cache_dir: Path) -> tuple[subprocess.Popen, Path]:
    path = tiny_gguf(tmp_path / "tiny.gguf")
    proc = subprocess.Popen([sys.executable, "-c", HOLD_IN_PARTIAL, str(path)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "MINILLM_CACHE": str(cache_dir)})
    line = proc.stderr.readline()              # wait for the line, not for a clock
    assert line == "weights written\n", line + proc.stderr.read()
    assert len(partials(cache_dir)) == 1
    assert (partials(cache_dir)[0] / "model.safetensors").stat().st_size > 100_000
    return proc, path


@pytest.mark.parametrize("sig, status", [(signal.SIGINT, -signal.SIGINT),  # KeyboardInterrupt
                                         (signal.SIGTERM, 128 + signal.SIGTERM)])
def test_ctrl_c_or_sigterm_during_a_cold_start_removes_the_partial_folder(tmp_path, cache_dir,
                                                                         sig, status):
    proc, _ = start_cold_load(tmp_path, cache_dir)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == status, err
    assert partials(cache_dir) == []
    assert [p for p in cache_dir.iterdir()] == []            # and no finished entry either


def test_after_sigkill_the_next_start_sweeps_the_partial_folder(tmp_path, cache_dir):
    proc, path = start_cold_load(tmp_path, cache_dir)
    proc.kill()
    proc.communicate(timeout=60)
    left = partials(cache_dir)
    assert len(left) == 1 and f".partial-{proc.pid}-" in left[0].name   # SIGKILL: no cleanup
    lm = load_model(str(path), device="cpu")                  # the next start
    assert partials(cache_dir) == [] and Path(lm.hf_folder).is_dir()


def test_a_partial_folder_of_a_live_process_is_left_alone(tmp_path, cache_dir):
    proc, path = start_cold_load(tmp_path, cache_dir)
    try:
        load_model(str(path), device="cpu")                   # a second, concurrent start
        assert len(partials(cache_dir)) == 1                  # the other's work is untouched
    finally:
        proc.kill()
        proc.communicate(timeout=60)


def test_errno_is_in_the_notice_for_an_oserror(tmp_path, cache_dir, monkeypatch, capfd):
    import safetensors.torch

    def full(sd, filename, metadata=None):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(safetensors.torch, "save_file", full)
    lm = load_model(str(tiny_gguf(tmp_path / "tiny.gguf")), device="cpu")
    assert lm.hf_folder is None and "No space left on device" in capfd.readouterr().err
    assert partials(cache_dir) == []
