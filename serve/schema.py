"""OpenAI request bodies → this engine's GenerationConfig, every field checked; errors as
OpenAI writes them.

    parse_completion(body, defaults)   POST /v1/completions
    parse_chat(body, defaults)         POST /v1/chat/completions

A value of the wrong *type* is said the way OpenAI says it ("Invalid type for 'max_tokens':
expected an integer, but got a string instead."); a value of the right type that cannot work is
refused by the engine's own config classes, so the message is the one `run` prints for the same
mistake (`max_tokens: -1` → "max new tokens must be at least 1, got -1", as `run
--max-new-tokens -1`). Fields we do not implement are refused when they would change the answer
(n > 1, echo, logit_bias, a non-zero presence/frequency penalty, tools) and ignored when they
would not (user, metadata, …): benchmark clients send many fields.

The sampling fields of vLLM's API that OpenAI lacks are taken too: top_k (-1 or 0 = off),
min_p, repetition_penalty, ignore_eos.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from engine.config import MAX_LOGPROBS, ConfigError, GenerationConfig, SamplingConfig


@dataclass
class APIError(Exception):
    """An HTTP error with OpenAI's JSON body: {"error": {message, type, param, code}}."""
    status: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None

    def __str__(self) -> str:
        return self.message

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


# Which request field a ConfigError is about: the engine names settings as the CLI does.
_PARAMS = (("temperature", "temperature"), ("top-p", "top_p"), ("top-k", "top_k"),
           ("min-p", "min_p"), ("repetition penalty", "repetition_penalty"), ("seed", "seed"),
           ("max new tokens", "max_tokens"), ("logprobs", "logprobs"), ("a stop string", "stop"),
           ("prompt of", "prompt"), ("the prompt", "prompt"), ("a prompt of", "prompt"))


def config_error(exc: ConfigError, prompt_param: str = "prompt") -> APIError:
    """A ConfigError from the engine as a 400: the engine's message, the flag it names said as
    the request field ("lower --max-new-tokens" → "lower max_tokens")."""
    message = str(exc).replace("--max-new-tokens", "max_tokens")
    param = next((p for prefix, p in _PARAMS if message.startswith(prefix)), None)
    if param == "prompt":
        param = prompt_param
    return bad_request(message, param)


@dataclass(frozen=True)
class Parsed:
    """A checked request. `prompt`: text or token ids (completions); `messages` (chat)."""
    model: str | None
    config: GenerationConfig
    max_tokens_given: bool
    stream: bool
    include_usage: bool
    continuous_usage: bool
    prompt: str | list[int] | None = None
    messages: list[dict] | None = None


# ----------------------------------------------------------------------------- one field
_KINDS = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
          list: "an array", dict: "an object"}


def _kind_of(value) -> str:
    if value is None:
        return "null"
    for t, name in ((bool, "a boolean"), (int, "an integer"), (float, "a number"),
                    (str, "a string"), (list, "an array"), (dict, "an object")):
        if isinstance(value, t):
            return name
    return type(value).__name__


def field(body: dict, name: str, kind, default=None):
    """body[name] if it is of `kind` (int excludes bool; float takes ints), else a 400."""
    value = body.get(name)
    if value is None:
        return default
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool)) if kind is float \
        else (isinstance(value, int) and not isinstance(value, bool)) if kind is int \
        else isinstance(value, kind)
    if not ok:
        raise bad_request(f"Invalid type for '{name}': expected {_KINDS[kind]}, but got "
                          f"{_kind_of(value)} instead.", name, "invalid_type")
    return float(value) if kind is float else value


def _unsupported(body: dict, name: str, allowed, why: str) -> None:
    value = body.get(name)
    if value is not None and value not in allowed:
        raise bad_request(f"'{name}' = {str(value)[:40]} is not supported by this server: {why}",
                          name, "unsupported_parameter")


# ----------------------------------------------------------------------------- the bodies
def _common(body: dict, defaults: GenerationConfig, logprobs: int | None) -> tuple:
    """What completions and chat share: sampling, length, stop, streaming. Returns
    (GenerationConfig, max_tokens given?, stream, include_usage, continuous_usage)."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    _unsupported(body, "n", (1,), "one choice per request (send n requests: they are batched)")
    _unsupported(body, "best_of", (1,), "one choice per request")
    _unsupported(body, "echo", (False,), "the prompt is not repeated in the answer")
    _unsupported(body, "logit_bias", ({},), "logit biases are not implemented")
    _unsupported(body, "presence_penalty", (0, 0.0), "use repetition_penalty")
    _unsupported(body, "frequency_penalty", (0, 0.0), "use repetition_penalty")
    _unsupported(body, "tools", ([],), "no tool calling")
    _unsupported(body, "suffix", ("",), "no fill-in-the-middle")
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise bad_request("'response_format' other than text is not supported by this server",
                          "response_format", "unsupported_parameter")
    d = defaults.sampling
    top_k = field(body, "top_k", int, d.top_k)
    if top_k is not None and top_k in (-1, 0):            # vLLM's way of saying "off"
        top_k = None
    max_tokens = field(body, "max_completion_tokens", int)
    max_tokens = field(body, "max_tokens", int, max_tokens)
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    elif stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise bad_request("Invalid type for 'stop': expected a string or an array of strings.",
                          "stop", "invalid_type")
    stream = field(body, "stream", bool, False)
    options = field(body, "stream_options", dict, {})
    seed = field(body, "seed", int, d.seed)
    try:
        sampling = SamplingConfig(
            temperature=field(body, "temperature", float, d.temperature),
            top_p=field(body, "top_p", float, d.top_p), top_k=top_k,
            min_p=field(body, "min_p", float, d.min_p),
            repetition_penalty=field(body, "repetition_penalty", float, d.repetition_penalty),
            seed=seed)
        config = dataclasses.replace(
            defaults, sampling=sampling, logprobs=logprobs,
            max_new_tokens=defaults.max_new_tokens if max_tokens is None else max_tokens,
            stop=tuple(stop) if stop is not None else defaults.stop,
            stop_at_eos=not field(body, "ignore_eos", bool, False))
    except ConfigError as exc:
        raise config_error(exc) from None
    return (config, max_tokens is not None, stream,
            bool(stream and options.get("include_usage")),
            bool(stream and options.get("continuous_usage_stats")))


def parse_completion(body: dict, defaults: GenerationConfig) -> Parsed:
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    logprobs = field(body, "logprobs", int)
    if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
        raise bad_request(f"logprobs must be an integer from 0 to {MAX_LOGPROBS}, got {logprobs}",
                          "logprobs")
    config, given, stream, usage, continuous = _common(body, defaults, logprobs)
    return Parsed(model=field(body, "model", str), config=config, max_tokens_given=given,
                  stream=stream, include_usage=usage, continuous_usage=continuous,
                  prompt=_prompt(body.get("prompt")))


def _prompt(prompt) -> str | list[int]:
    """A string, token ids, or a list holding exactly one of those."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        raise bad_request(f"this server takes one prompt per request, got {len(prompt)}: send "
                          f"them as separate requests (they are batched on the server)", "prompt")
    if isinstance(prompt, str):
        return prompt
    if (isinstance(prompt, list) and
            all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)):
        return list(prompt)
    if prompt is None:
        raise bad_request("you must provide a 'prompt'", "prompt", "missing_required_parameter")
    raise bad_request("Invalid type for 'prompt': expected a string, an array of token ids, or "
                      "an array holding one of those.", "prompt", "invalid_type")


ROLES = ("system", "developer", "user", "assistant", "tool")


def parse_chat(body: dict, defaults: GenerationConfig) -> Parsed:
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    want = field(body, "logprobs", bool, False)
    top = field(body, "top_logprobs", int)
    if top is not None and not want:
        raise bad_request("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    if top is not None and not 0 <= top <= MAX_LOGPROBS:
        raise bad_request(f"top_logprobs must be an integer from 0 to {MAX_LOGPROBS}, got {top}",
                          "top_logprobs")
    config, given, stream, usage, continuous = _common(body, defaults,
                                                       (top or 0) if want else None)
    return Parsed(model=field(body, "model", str), config=config, max_tokens_given=given,
                  stream=stream, include_usage=usage, continuous_usage=continuous,
                  messages=_messages(body.get("messages")))


def _messages(messages) -> list[dict]:
    if messages is None:
        raise bad_request("you must provide 'messages'", "messages", "missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty array of {role, content} objects",
                          "messages", "invalid_type")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad_request(f"Invalid type for '{where}': expected an object, but got "
                              f"{_kind_of(m)} instead.", where, "invalid_type")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise bad_request(f"'{where}.role' must be one of {', '.join(ROLES)}, got "
                              f"{str(role)[:40]!r}", f"{where}.role")
        if isinstance(content, list):        # [{"type": "text", "text": …}, …]
            if not all(isinstance(p, dict) and p.get("type") == "text"
                       and isinstance(p.get("text"), str) for p in content):
                raise bad_request(f"'{where}.content': only text parts are supported "
                                  f"(this model reads text)", f"{where}.content")
            content = "".join(p["text"] for p in content)
        elif content is None:
            content = ""
        elif not isinstance(content, str):
            raise bad_request(f"Invalid type for '{where}.content': expected a string or an "
                              f"array of text parts, but got {_kind_of(content)} instead.",
                              f"{where}.content", "invalid_type")
        out.append({"role": role, "content": content})
    return out
