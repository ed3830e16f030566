"""Chat messages → the prompt text the model was trained on, through the model's own template.

    {"role": "user", "content": "Hi"}   ──template──▶   "<|im_start|>user\\nHi<|im_end|>\\n
                                                         <|im_start|>assistant\\n"

The template is Jinja text from the model file (engine/loader/chat_template.py reads it), and a
model file is something we do not trust: a template could try to reach Python objects
(`''.__class__.__mro__…`), or to build a gigabyte string. So it is rendered only in Jinja's
`ImmutableSandboxedEnvironment` — no attribute starting with `_`, no mutating lists or dicts,
`range` capped at 100 000 items — with `*` and `**` bounded here too (the sandbox leaves them
alone), and the prompt it produces is capped at MAX_PROMPT_CHARS. What a template may use is
what transformers gives it: `messages`, `add_generation_prompt`, `bos_token`, `eos_token`,
`raise_exception(msg)` and `strftime_now(fmt)`.
"""

from __future__ import annotations

import datetime

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from engine.config import ConfigError

MAX_PROMPT_CHARS = 4 << 20        # the rendered prompt; far beyond any model's context
MAX_REPEAT = 1 << 20              # "x" * n and friends: at most this many items


class TemplateFailed(ConfigError):
    """The template raised (raise_exception) or broke; the message is for the client."""


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, with `*` and `**` that cannot exhaust memory or time."""

    intercepted_binops = frozenset(["*", "**"])

    def call_binop(self, context, operator, left, right):
        if operator == "**":
            if isinstance(right, (int, float)) and abs(right) > 64:
                raise TemplateError("exponent too large in the chat template")
        elif isinstance(left, (str, list, tuple)) or isinstance(right, (str, list, tuple)):
            seq, n = (left, right) if isinstance(left, (str, list, tuple)) else (right, left)
            if isinstance(n, int) and len(seq) * n > MAX_REPEAT:
                raise TemplateError("the chat template builds a string or list too large")
        return super().call_binop(context, operator, left, right)


def _raise_exception(message):
    raise TemplateFailed(f"the chat template refused the messages: {message}")


def _strftime_now(fmt):
    return datetime.datetime.now().strftime(str(fmt))


class ChatTemplate:
    """One model's template, compiled once (a syntax error fails at `serve` start)."""

    def __init__(self, source: str, bos_token: str = "", eos_token: str = ""):
        env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True)
        env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
        try:
            self.template = env.from_string(source)
        except TemplateError as exc:
            raise ConfigError(f"the chat template does not compile: {exc}") from None
        self.bos_token, self.eos_token = bos_token, eos_token

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        try:
            text = self.template.render(messages=messages,
                                        add_generation_prompt=add_generation_prompt,
                                        bos_token=self.bos_token, eos_token=self.eos_token)
        except TemplateFailed:
            raise
        except (TemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError,
                ArithmeticError, RecursionError) as exc:
            raise TemplateFailed(f"the model's chat template failed on these messages "
                                 f"({type(exc).__name__}: {str(exc)[:200]})") from None
        if len(text) > MAX_PROMPT_CHARS:
            raise TemplateFailed("the chat template produced a prompt larger than "
                                 f"{MAX_PROMPT_CHARS >> 20} M characters")
        return text
