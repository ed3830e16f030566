"""Streaming text pieces are exact for multi-byte characters split across tokens."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from engine.config import GenerationConfig
from engine.decoding import run_to_end
from engine.events import Prefill, Token
from engine.tokenizer import REPLACEMENT, StreamDecoder
from tests.conftest import byte_tokenizer, tiny_model

TEXTS = ["Deep learning is 🙂🚀 fun", "注意力就是你所需要的", "café naïve résumé Ångström",
         "مرحبا بالعالم", "👩‍👩‍👧 family", "a"]


@pytest.mark.parametrize("text", TEXTS)
def test_stream_pieces_of_real_text(text):
    tok = byte_tokenizer()
    ids = tok.encode(text)
    assert len(ids) == len(text.encode("utf-8"))     # one token per byte: maximal splitting
    stream = StreamDecoder(tok)
    pieces = [stream.push(i) for i in ids]
    pieces.append(stream.flush())
    assert "".join(pieces) == text
    assert not any(REPLACEMENT in p for p in pieces)
    assert "".join(tok.pieces(ids)) == text


@given(st.lists(st.integers(0, 255), max_size=40))
@settings(max_examples=200, deadline=None)
def test_stream_concatenation_equals_decode_for_any_bytes(ids):
    tok = byte_tokenizer()
    stream = StreamDecoder(tok)
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    full = tok.decode(ids)
    assert "".join(pieces) == full
    if REPLACEMENT not in full:
        assert not any(REPLACEMENT in p for p in pieces)


@pytest.mark.parametrize("text", TEXTS[:4])
def test_generation_events_concatenate_to_the_decoded_text(text):
    tok = byte_tokenizer()
    model = tiny_model("llama", seed=7)
    events, fin = run_to_end(model, tok, text, GenerationConfig(max_new_tokens=30,
                                                               stop_at_eos=False))
    pieces = "".join(e.text for e in events if isinstance(e, Token)) + fin.tail
    assert pieces == fin.text == tok.decode(fin.tokens)
    if REPLACEMENT not in fin.text:
        assert not any(REPLACEMENT in e.text for e in events if isinstance(e, Token))
    prefill = next(e for e in events if isinstance(e, Prefill))
    assert "".join(prefill.prompt_pieces) == text
