"""Shared fixtures: tiny random models of every family, a byte-level tokenizer, the embedded model.

Tests that need no real weights build tiny models in memory (a few ms); tests marked `slow` load
the embedded SmolLM2-135M (about 4 s once converted; the first conversion takes ~20 s).
"""

from __future__ import annotations

import os

import pytest
import torch

# Without a GPU, Triton kernels run in its CPU interpreter (chosen before a kernel is first used);
# with one, they run for real.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from engine.config import ModelConfig  # noqa: E402
from engine.model import Transformer  # noqa: E402
from engine.tokenizer import Tokenizer  # noqa: E402

FAMILIES = ("llama", "qwen2", "gpt2")


def byte_tokenizer(eos_token_ids=(), vocab_size: int = 256) -> Tokenizer:
    """A byte-level BPE tokenizer with no merges: one token per UTF-8 byte.

    Every multi-byte character (é, 中, 🙂) is split over several tokens — the hardest case for
    streaming text — and any id below 256 decodes, so random models can use it.
    """
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    backend = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    return Tokenizer(backend, bos_token_id=None, eos_token_ids=eos_token_ids)


def tiny_model(family: str = "llama", seed: int = 0, dtype=torch.float32, **overrides) -> Transformer:
    cfg = ModelConfig.from_name(f"tiny-{family}")
    for k, v in overrides.items():
        setattr(cfg, k, v)
    torch.manual_seed(seed)
    model = Transformer(cfg)
    # PyTorch's default N(0, 1) embedding, tied to the LM head, makes every distribution a
    # spike on the last input token; a narrower one gives varied, sample-able outputs.
    torch.nn.init.normal_(model.tok_emb.weight, std=0.2)
    return model.to(dtype).eval()


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    return byte_tokenizer()


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def embedded():
    """The embedded default model (converted once into the user's cache)."""
    from engine.loader import load_model
    try:
        return load_model(None, device="cpu", dtype="float32")
    except Exception as exc:   # not installed: say so instead of erroring every test
        pytest.skip(f"embedded model unavailable: {exc}")


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """A tiny random Llama saved as a Hugging Face folder, with the byte-level tokenizer."""
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("tiny-llama")
    cfg = ModelConfig.from_name("tiny-llama")
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg.to_hf())).save_pretrained(folder)
    byte_tokenizer().backend.save(str(folder / "tokenizer.json"))
    return folder


@pytest.fixture
def scripted():
    """Start tests/sse_server.py's Scripted servers (a token stream over OpenAI's API); all
    closed after the test."""
    from tests.sse_server import Scripted
    servers = []

    def start(*a, **kw):
        servers.append(Scripted(*a, **kw))
        return servers[-1]
    yield start
    for s in servers:
        s.close()


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module (`pytestmark = pytest.mark.usefixtures("one_thread")`),
    restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def session():
    """A Session (the engine's one door) on the tiny Llama, seed 5, with the byte tokenizer — one
    per module. A module that needs another model defines its own `session`."""
    from types import SimpleNamespace

    from engine.session import Session
    model = tiny_model("llama", seed=5)
    lm = SimpleNamespace(model=model, tokenizer=byte_tokenizer(), name="tiny-llama",
                         config=model.cfg)
    return Session(lm)
