"""A tokenizer built from a GGUF's own metadata, and nothing else.

A GGUF carries its tokenizer as metadata (`tokenizer.ggml.*`): the tokens, their types, the BPE
merges (or SentencePiece scores), the special ids. This file turns those into a `tokenizers`
Tokenizer directly. It reads no file beside the GGUF — so a `tokenizer_config.json` with an
`auto_map`, or a Python file planted next to the model, is never seen, let alone run — and it
does not import transformers (a cold start stays lighter).

Two kinds of tokenizer cover the llama / qwen2 / gpt2 files this engine runs:

    tokenizer.ggml.model = "gpt2"    byte-level BPE (GPT-2, Llama 3, Qwen2, SmolLM): text is cut
                                     into pieces by a regular expression, each piece's UTF-8
                                     bytes are spelled as 256 printable characters, then merged
    tokenizer.ggml.model = "llama"   SentencePiece-style BPE (Llama 2, Mistral): spaces become
                                     "▁", pairs merge by score, unknown bytes fall back to
                                     <0xNN> tokens

Tokens marked CONTROL (type 3) become special tokens (matched whole, skipped when decoding);
USER_DEFINED ones (type 4) are matched whole too. tests/engine/test_gguf_tokenizer.py checks the
result against transformers' own GGUF conversion, id for id.
"""

from __future__ import annotations

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

from ..config import UnsupportedModel
from .errors import ModelLoadError

CONTROL, USER_DEFINED = 3, 4

# How byte-level vocabularies cut text before merging, by `tokenizer.ggml.pre`. The patterns are
# the ones these models' own tokenizer.json files use; anything else gets GPT-2's (the default
# of the ByteLevel pre-tokenizer), as transformers' converter does.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
SPLITS = {"llama-bpe": LLAMA3_SPLIT, "llama3": LLAMA3_SPLIT, "llama-v3": LLAMA3_SPLIT,
          "smaug-bpe": LLAMA3_SPLIT, "dbrx": LLAMA3_SPLIT, "falcon3": LLAMA3_SPLIT,
          "qwen2": QWEN2_SPLIT, "deepseek-r1-qwen": QWEN2_SPLIT}


def byte_spelling() -> dict[int, str]:
    """GPT-2's spelling of the 256 byte values as printable characters.

    Bytes that are already visible characters (! … ~, ¡ … ¬, ® … ÿ) spell themselves; the other
    68 (control characters, the space, …) are given the characters from U+0100 upward, in byte
    order. So a space is "Ġ" (U+0120) and a newline "Ċ" (U+010A)."""
    visible = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
               *range(ord("®"), ord("ÿ") + 1)]
    spelling, extra = {b: chr(b) for b in visible}, 0
    for b in range(256):
        if b not in spelling:
            spelling[b] = chr(256 + extra)
            extra += 1
    return spelling


def _strings(reader, key: str, required: bool = True) -> list | None:
    field = reader.fields.get(key)
    if field is None:
        if required:
            raise ModelLoadError(f"GGUF metadata has no {key}")
        return None
    try:
        values = field.contents()
    except Exception:
        raise ModelLoadError(f"GGUF metadata {key} cannot be read") from None
    if not isinstance(values, list):
        raise ModelLoadError(f"GGUF metadata {key} must be a list")
    return values


def _scalar(reader, key: str):
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def _added_tokens(tokens: list[str], types: list | None, spelled: set[str] | None):
    """(special, plain) AddedTokens: CONTROL tokens and USER_DEFINED ones. In a byte-level
    vocabulary a "control" token spelled outside the byte alphabet is a mislabel, skipped."""
    special, plain = [], []
    for token, kind in zip(tokens, types or ()):
        if kind == CONTROL and (spelled is None or set(token) <= spelled):
            special.append(AddedToken(token, special=True, normalized=False))
        elif kind == USER_DEFINED:
            plain.append(AddedToken(token, special=False, normalized=False))
    return special, plain


def byte_level_bpe(tokens: list[str], merges: list[str] | None, types: list | None,
                   pre: str | None) -> Tokenizer:
    """GPT-2-style byte-level BPE from a vocabulary and its merges ("a b" strings). Without
    merges, every token that splits into two others is a merge, earlier ids first."""
    spelling = byte_spelling()
    alphabet = set(spelling.values())
    # Tokens are written in the byte alphabet already; a few files write an added token in
    # plain text (" <think>") — spell those the way the model sees them.
    vocab = {t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i
             for i, t in enumerate(tokens)}
    if merges is None:
        pairs = merges_from_scores(list(vocab), [-i for i in vocab.values()])
    else:
        pairs = []
        for m in merges:
            left, sep, right = m.partition(" ")
            if not sep or not left or not right:
                raise ModelLoadError(f"GGUF merge {m!r} is not two tokens separated by a "
                                     f"space"[:120])
            pairs.append((left, right))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs))
    split = SPLITS.get(pre)
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    special, plain = _added_tokens(tokens, types, alphabet)
    tok.add_special_tokens(special)
    tok.add_tokens(plain)
    return tok


def merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """SentencePiece files keep scores instead of merges: a token with a higher score is merged
    earlier. Every way to cut a token into two tokens of the vocabulary is a merge, ranked by
    the whole token's score (best first), then longer left and right parts first."""
    ids = {t: i for i, t in enumerate(tokens)}
    ranked = []
    for i, token in enumerate(tokens):
        cuts = [(token[:k], token[k:]) for k in range(1, len(token))
                if token[:k] in ids and token[k:] in ids]
        cuts.sort(key=lambda lr: (ids[lr[0]], ids[lr[1]]))
        ranked += [(-float(scores[i]), -len(left), -len(right), n, left, right)
                   for n, (left, right) in enumerate(cuts, start=len(ranked))]
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def sentencepiece_bpe(tokens: list[str], scores: list | None, merges: list[str] | None,
                      types: list | None, unk_id: int | None, add_prefix_space: bool) -> Tokenizer:
    """SentencePiece-style BPE: "▁" for spaces, byte fallback (<0x41> …) for what is not in the
    vocabulary."""
    vocab = {t: i for i, t in enumerate(tokens)}
    if merges is not None:
        pairs = [tuple(m.split(" ", 1)) for m in merges]
    elif scores is not None and len(scores) == len(tokens):
        pairs = merges_from_scores(tokens, scores)
    else:
        raise ModelLoadError("GGUF SentencePiece vocabulary has neither merges nor one score "
                             "per token")
    unk = tokens[unk_id] if unk_id is not None and 0 <= unk_id < len(tokens) else None
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, unk_token=unk, fuse_unk=True,
                               byte_fallback=True))
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if add_prefix_space else "never", split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix_space:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(steps)
    special, plain = _added_tokens(tokens, types, None)
    tok.add_special_tokens(special)
    tok.add_tokens(plain)
    return tok


def tokenizer_from_gguf(reader) -> tuple[Tokenizer, bool]:
    """(the tokenizer, whether to add BOS) from the GGUF's metadata alone."""
    kind = _scalar(reader, "tokenizer.ggml.model")
    tokens = _strings(reader, "tokenizer.ggml.tokens")
    types = _strings(reader, "tokenizer.ggml.token_type", required=False)
    add_bos = _scalar(reader, "tokenizer.ggml.add_bos_token")
    try:
        if kind == "gpt2":
            tok = byte_level_bpe(tokens, _strings(reader, "tokenizer.ggml.merges", False), types,
                                 _scalar(reader, "tokenizer.ggml.pre"))
            add_bos = bool(add_bos)
        elif kind == "llama":
            add_space = _scalar(reader, "tokenizer.ggml.add_space_prefix")
            tok = sentencepiece_bpe(tokens, _strings(reader, "tokenizer.ggml.scores", False),
                                    _strings(reader, "tokenizer.ggml.merges", False), types,
                                    _scalar(reader, "tokenizer.ggml.unknown_token_id"),
                                    add_prefix_space=add_space is not False)
            add_bos = True if add_bos is None else bool(add_bos)   # llama.cpp's default
        else:
            raise UnsupportedModel(f"GGUF tokenizer type {kind!r} is not supported; supported: "
                                   f"gpt2 (byte-level BPE), llama (SentencePiece BPE)"[:200])
    except (ModelLoadError, UnsupportedModel):
        raise
    except Exception as exc:             # the tokenizers library raises plain Exception
        raise ModelLoadError(f"GGUF tokenizer metadata is inconsistent: "
                             f"{str(exc).splitlines()[0][:160]}") from None
    return tok, add_bos


def gguf_tokenizer_json(reader) -> tuple[str, dict]:
    """(tokenizer.json text, tokenizer_config dict) for the conversion cache."""
    tok, add_bos = tokenizer_from_gguf(reader)
    return tok.to_str(), {"add_bos_token": add_bos}


__all__ = ["tokenizer_from_gguf", "gguf_tokenizer_json", "byte_spelling", "merges_from_scores"]
