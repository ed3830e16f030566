"""The embedded model's greedy continuation, pinned, and equal to transformers' generate()."""

from __future__ import annotations

import pytest
import torch

from engine.config import GenerationConfig
from engine.decoding import run_to_end

pytestmark = pytest.mark.slow

PROMPT = "Deep learning is"
# SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to float32), greedy, 50 new tokens.
GOLDEN_TOKENS = [253, 16624, 338, 12378, 3215, 639, 29, 18769, 28, 7093, 28, 284, 260, 2470, 288,
                 835, 429, 1449, 30, 657, 506, 253, 970, 282, 1036, 338, 7420, 346, 288, 1998,
                 2029, 28, 4811, 5360, 28, 284, 1075, 347, 253, 1055, 30, 198, 198, 504, 2359,
                 282, 1380, 314, 441, 915]
GOLDEN_TEXT = (" a mindset that prioritizes self-awareness, curiosity, and the ability to learn "
               "from others. It's a way of being that encourages you to ask questions, seek "
               "answers, and grow as a person.\n\nThe idea of learning is not just")


@pytest.mark.parametrize("strategy", ["naive", "kv", "paged"])
def test_golden_continuation(embedded, strategy):
    _, fin = run_to_end(embedded.model, embedded.tokenizer, PROMPT,
                        GenerationConfig(strategy=strategy, max_new_tokens=50,
                                         attention_rows=False))
    assert list(fin.tokens) == GOLDEN_TOKENS
    assert fin.text == GOLDEN_TEXT


def test_transformers_generate_gives_the_same_tokens(embedded):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(embedded.hf_folder,
                                                           dtype=torch.float32).eval()
    ids = embedded.tokenizer.encode(PROMPT)
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=50, do_sample=False)
    assert out[0, len(ids):].tolist() == GOLDEN_TOKENS


def test_embedded_model_shape(embedded):
    cfg = embedded.config
    assert (cfg.family, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.dim) == \
        ("llama", 30, 9, 3, 576)
    assert cfg.tie_embeddings
