"""Text ↔ token ids, and streaming decode that never splits a character.

Byte-level BPE tokenizers (GPT-2, Llama 3, SmolLM2) work on UTF-8 *bytes*: an emoji or a CJK
character is often two or three tokens, and decoding just the first gives the replacement
character "�". `StreamDecoder` therefore decodes everything generated so far and only hands out
text once it no longer ends in a half-finished character — so the pieces, concatenated, are
always exactly the decode of all ids.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

REPLACEMENT = "\ufffd"
LIMIT = 1 << 28          # bytes: the largest tokenizer.json known is ~30 MB


class Tokenizer:
    def __init__(self, backend: HFTokenizer, bos_token_id: int | None = None,
                 eos_token_ids: tuple[int, ...] = (), add_bos: bool = False):
        self.backend = backend
        self.bos_token_id = bos_token_id
        self.eos_token_ids = tuple(eos_token_ids)
        self.add_bos = add_bos

    @classmethod
    def from_folder(cls, folder: str | Path, bos_token_id=None, eos_token_ids=(),
                    add_bos: bool | None = None) -> "Tokenizer":
        """Read `tokenizer.json`, or GPT-2 style `vocab.json` + `merges.txt` — as data only,
        each a regular file of bounded size (a FIFO under one of these names cannot hang us)."""
        from .files import read_regular
        folder = Path(folder)
        if (folder / "tokenizer.json").exists():     # of any kind: read_regular checks
            backend = HFTokenizer.from_str(read_regular(folder / "tokenizer.json", LIMIT).decode())
        elif (folder / "vocab.json").exists() and (folder / "merges.txt").exists():
            from tokenizers import decoders, models, pre_tokenizers
            vocab = json.loads(read_regular(folder / "vocab.json", LIMIT))
            lines = read_regular(folder / "merges.txt", LIMIT).decode().splitlines()
            merges = [tuple(line.split(" ")) for line in lines
                      if line and not line.startswith("#version")]
            backend = HFTokenizer(models.BPE(vocab=vocab, merges=merges))
            backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            backend.decoder = decoders.ByteLevel()
        else:
            raise FileNotFoundError(f"no tokenizer.json (or vocab.json + merges.txt) in {folder}")
        cfg_path = folder / "tokenizer_config.json"
        if add_bos is None:
            add_bos = False
            if cfg_path.exists():
                settings = json.loads(read_regular(cfg_path, LIMIT))
                add_bos = isinstance(settings, dict) and settings.get("add_bos_token") is True
        return cls(backend, bos_token_id, eos_token_ids, add_bos)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:   # e.g. a lone surrogate pasted from a broken source
            from .config import ConfigError
            raise ConfigError(f"the prompt contains invalid Unicode ({exc.reason} at character "
                              f"{exc.start}); remove or replace it") from None
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if self.add_bos and self.bos_token_id is not None:
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=True)

    def token_text(self, token_id: int) -> str:
        """One token on its own, special tokens spelled out ("<|im_end|>"): for showing a
        candidate (step mode), not for building text — a lone byte of a multi-byte character
        shows as "�"."""
        return self.backend.decode([token_id], skip_special_tokens=False)

    def pieces(self, ids) -> list[str]:
        """Cut the decoded text at token boundaries (a partial character joins the next token)."""
        stream = StreamDecoder(self)
        out = [stream.push(i) for i in ids]
        out[-1:] = [out[-1] + stream.flush()] if out else []
        return out


class StreamDecoder:
    """Turns ids, one at a time, into text pieces whose concatenation is decode(all ids).

    Decoding everything each step would cost O(n) per token; like vLLM we decode a short window
    instead: the ids since `prefix` (already printed, kept as context so that tokenizers which
    strip a leading space see the same neighbourhood) against the same window up to `read`.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix = 0          # start of the context window
        self.read = 0            # ids before this are already printed

    def _diff(self) -> str:
        before = self.tok.decode(self.ids[self.prefix:self.read])
        after = self.tok.decode(self.ids[self.prefix:])
        return after[len(before):] if after.startswith(before) else ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        piece = self._diff()
        if not piece or piece.endswith(REPLACEMENT):
            return ""            # a character is still incomplete: wait for its other bytes
        self.prefix, self.read = self.read, len(self.ids)
        return piece

    def flush(self) -> str:
        """Whatever is left at the end (e.g. a genuinely invalid byte sequence)."""
        piece = self._diff()
        self.prefix, self.read = self.read, len(self.ids)
        return piece
