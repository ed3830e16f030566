"""The tokenizer built from a GGUF's own metadata (engine/loader/gguf_tokenizer.py).

It must give the very ids transformers' GGUF conversion gives — on byte-level BPE files (with
the pre-tokenizers of GPT-2, Llama 3 and Qwen2) and SentencePiece BPE files (merges recovered
from scores), trained here on a small varied corpus, and on the embedded model (slow) — and it
must read nothing but the GGUF: a folder offering an `auto_map` and Python code next to the
model is never opened, let alone run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.config import ModelConfig
from engine.loader import open_gguf, tokenizer_from_gguf
from tests.engine.gguf_writer import gguf_parts, write_gguf

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[2]

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "Deep learning is a subset of machine learning based on neural networks.",
    "The quick brown fox jumps over the lazy dog; naïve café, résumé, über, façade.",
    "東京は日本の首都です。中文分词测试，汉字和标点。",
    "emoji: 🙂 👍🏽 🇫🇷 ❤️ — and ümlauts.",
    "def forward(self, x):\n    return self.proj(x) ** 2  # squared\n",
    "    indented    with   runs   of    spaces\t\ttabs\n\n\nnewlines",
    "numbers 2024, 3.14159, 1000000 and 42nd; I'm, you're, we'll, it's, they've.",
]
STRINGS = [
    "Deep learning is", "héllo wörld — naïve café", "東京は日本の首都です。中文测试",
    "emoji 🙂👍🏽🇫🇷 ok", "def f(x):\n\treturn x**2  # sq\n\n\n", "   lots    of   spaces  ",
    "<|im_start|>user\nHi there<|im_end|>\n<|endoftext|>", "in 2024, 3.14 and 1000000 ways",
    "\u00a0nbsp and \u200b zwsp", "Ω≈ç√∫˜µ≤≥÷ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "I'm you're we'LL IT'S", "tab\tand\r\nCRLF",
    "x", " leading space", "trailing space ", "ÀÉÎÕÜ àéîõü", "a" * 40,
]


def tiny_llama(vocab: int):
    cfg = ModelConfig.from_name("tiny-llama")
    cfg.vocab_size = vocab
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg.to_hf())).eval()


def write_with_tokenizer(path: Path, tokens: list[str], tok_meta: dict) -> Path:
    arch, meta, tensors = gguf_parts(tiny_llama(len(tokens)), tokens)
    meta = {k: v for k, v in meta.items() if not k.startswith("tokenizer.")}
    meta.update(tok_meta)
    write_gguf(path, arch, meta, tensors)
    return path


def byte_level_gguf(path: Path, pre: str) -> Path:
    """A byte-level BPE vocabulary learned from CORPUS, as a GGUF's tokenizer.ggml.* fields."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(CORPUS * 3, trainers.BpeTrainer(
        vocab_size=700, special_tokens=SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    model = json.loads(tok.to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    types = [3 if t in SPECIALS else 1 for t in tokens]
    return write_with_tokenizer(path, tokens, {
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges, "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2})


def sentencepiece_gguf(path: Path, add_space_prefix: bool = True) -> Path:
    """A SentencePiece-style vocabulary (▁ for spaces, <0xNN> byte tokens, one score per token,
    no merges — as llama.cpp writes Llama 2's) learned from CORPUS."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first",
                                                 split=False)
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    tok.train_from_iterator(CORPUS * 3, trainers.BpeTrainer(
        vocab_size=900, special_tokens=["<unk>", "<s>", "</s>", *byte_tokens],
        show_progress=False))
    vocab = json.loads(tok.to_str())["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    types = [2 if t == "<unk>" else 3 if t in ("<s>", "</s>") else 6 if t in byte_tokens else 1
             for t in tokens]
    scores = [0.0 if k != 1 else -float(i) for i, k in enumerate(types)]   # learned order
    return write_with_tokenizer(path, tokens, {
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": scores, "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0, "tokenizer.ggml.add_space_prefix": add_space_prefix})


def transformers_reference(path: Path):
    """transformers' own conversion of the GGUF's tokenizer (a test-only reference)."""
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def assert_same_ids(path: Path, strings=STRINGS) -> None:
    ours, add_bos = tokenizer_from_gguf(open_gguf(path))
    ref = transformers_reference(path)
    for s in strings:
        expected = ref.encode(s, add_special_tokens=False)
        assert ours.encode(s, add_special_tokens=False).ids == expected, s
        assert ours.decode(expected, skip_special_tokens=True) == \
            ref.decode(expected, skip_special_tokens=True), s
    assert ours.get_vocab_size() == len(ref)


@pytest.mark.parametrize("pre", ["gpt2", "llama-bpe", "qwen2"])
def test_byte_level_bpe_matches_transformers(tmp_path, pre):
    assert_same_ids(byte_level_gguf(tmp_path / "bpe.gguf", pre))


def test_sentencepiece_bpe_matches_transformers(tmp_path):
    path = sentencepiece_gguf(tmp_path / "spm.gguf")
    assert_same_ids(path)
    _, add_bos = tokenizer_from_gguf(open_gguf(path))
    assert add_bos                                        # llama.cpp's default for SentencePiece


def test_sentencepiece_without_a_space_prefix(tmp_path):
    """tokenizer.ggml.add_space_prefix = false: llama.cpp then adds no "▁" before the text.
    (transformers' converter ignores the flag, so it is no reference here.)"""
    ours, _ = tokenizer_from_gguf(open_gguf(sentencepiece_gguf(tmp_path / "spm.gguf", False)))
    with_prefix, _ = tokenizer_from_gguf(open_gguf(sentencepiece_gguf(tmp_path / "p.gguf", True)))
    assert not ours.encode("Deep learning", add_special_tokens=False).tokens[0].startswith("▁")
    assert with_prefix.encode("Deep learning", add_special_tokens=False).tokens[0] \
        .startswith("▁")
    for s in STRINGS:
        if "<|" not in s:                                 # no special tokens in this vocabulary
            assert ours.decode(ours.encode(s, add_special_tokens=False).ids) == s


def test_special_tokens_stay_whole_and_decode_away(tmp_path):
    ours, _ = tokenizer_from_gguf(open_gguf(byte_level_gguf(tmp_path / "bpe.gguf", "gpt2")))
    ids = ours.encode("<|im_start|>hi<|im_end|>", add_special_tokens=False).ids
    assert ids[0] == 1 and ids[-1] == 2
    assert ours.decode(ids, skip_special_tokens=True) == "hi"


@pytest.mark.slow
def test_the_embedded_model_tokenizer_matches_transformers(embedded, tmp_path):
    from engine.loader import embedded_gguf
    gguf = embedded_gguf()
    (tmp_path / gguf.name).symlink_to(gguf)               # a folder holding only the GGUF
    assert_same_ids(tmp_path / gguf.name)
    # and the loaded model's tokenizer (from the conversion cache) is that one
    built, _ = tokenizer_from_gguf(open_gguf(gguf))
    for s in STRINGS:
        assert embedded.tokenizer.encode(s) == built.encode(s, add_special_tokens=False).ids


# ----------------------------------------------------------------------------- remote code
PLANTED_LOAD = """
import json, sys
opened = []
def audit(event, args):
    if event == "open" and isinstance(args[0], (str, bytes)):
        opened.append(str(args[0]))
sys.addaudithook(audit)
from engine.loader import load_model
lm = load_model(sys.argv[1], device="cpu")
print(json.dumps({"opened": opened, "ids": lm.tokenizer.encode("hello"),
                  "transformers": "transformers" in sys.modules, "converted": lm.converted}))
"""


def test_a_planted_auto_map_beside_the_gguf_is_never_read_or_run(tmp_path):
    """The old conversion called AutoTokenizer.from_pretrained(<the GGUF's folder>), which read
    that folder's tokenizer_config.json and, asked "run the custom code? [y/N]", ran it. Now the
    folder beside the GGUF is not even opened: an audit hook records every open() of the child
    process, and the planted code's marker never appears."""
    folder = tmp_path / "downloads"
    folder.mkdir()
    path = byte_level_gguf(folder / "model.gguf", "gpt2")
    marker = tmp_path / "PWNED"
    evil = f"open({str(marker)!r}, 'w').write('ran')\n"
    for name in ("tokenization_evil.py", "configuration_evil.py", "modeling_evil.py"):
        (folder / name).write_text(evil + "class EvilTokenizer: pass\n")
    auto = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None],
            "AutoConfig": "configuration_evil.EvilConfig",
            "AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"auto_map": auto, "tokenizer_class": "EvilTokenizer"}))
    (folder / "config.json").write_text(json.dumps({"auto_map": auto, "model_type": "evil"}))
    (folder / "tokenizer.json").write_text("{ planted, and not even valid")
    cache = tmp_path / "cache"
    proc = subprocess.run([sys.executable, "-c", PLANTED_LOAD, str(path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
                          env={**os.environ, "MINILLM_CACHE": str(cache)})
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.splitlines()[-1])
    assert report["converted"] and report["ids"]
    beside = [p for p in report["opened"] if Path(p).parent == folder and Path(p) != path]
    assert beside == [], beside
    assert not marker.exists()
    assert not report["transformers"]            # a cold conversion does not even import it
