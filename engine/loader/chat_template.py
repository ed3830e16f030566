"""A model's chat template: the Jinja text that turns a list of messages into the prompt the
model was trained on ("<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n").

Where it lives:

    a GGUF file         the metadata string `tokenizer.chat_template`
    a Hugging Face      `chat_template.jinja` beside the weights (newer transformers), or the
    folder              "chat_template" of tokenizer_config.json — a string, or a list of
                        {"name", "template"} of which "default" is the one to use

This only *reads* the text, as data, from a regular file of bounded size. The template comes
from a file we do not trust: it is rendered only in a sandbox (serve/chat.py), never here.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..files import UntrustedPath, read_regular
from .errors import ModelLoadError

LIMIT = 1 << 20        # bytes: real templates are a few KB (the largest known are ~30 KB)


def chat_template(source: str | Path) -> str | None:
    """The chat template of the model at `source` (a .gguf file or a model folder), or None when
    it has none. A template that is there but unreadable or too large is a ModelLoadError."""
    source = Path(source)
    if source.is_dir():
        return _from_folder(source)
    from .gguf import _field, open_gguf
    text = _field(open_gguf(source), "tokenizer.chat_template")
    return _checked(text, f"{source.name}: tokenizer.chat_template")


def _from_folder(folder: Path) -> str | None:
    jinja = folder / "chat_template.jinja"
    if jinja.exists():
        return _checked(_read(jinja).decode("utf-8", errors="replace"), str(jinja))
    config = folder / "tokenizer_config.json"
    if not config.exists():
        return None
    try:
        settings = json.loads(_read(config))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{config} is not valid JSON: {exc}") from None
    text = settings.get("chat_template") if isinstance(settings, dict) else None
    if isinstance(text, list):           # several named templates: the default one
        named = {t.get("name"): t.get("template") for t in text if isinstance(t, dict)}
        text = named.get("default")
    return _checked(text, f"{config}: chat_template")


def _read(path: Path) -> bytes:
    try:
        return read_regular(path, LIMIT)
    except UntrustedPath as exc:
        raise ModelLoadError(str(exc)) from None


def _checked(text, where: str) -> str | None:
    if text is None:
        return None
    if not isinstance(text, str):
        raise ModelLoadError(f"{where} is not text")
    if len(text.encode("utf-8", errors="replace")) > LIMIT:
        raise ModelLoadError(f"{where} is larger than {LIMIT >> 10} KiB: not a chat template")
    return text or None
