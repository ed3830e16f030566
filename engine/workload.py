"""What a batch of requests is made of: the prompts, when each arrives, each one's settings.

Shared by `python main.py batch` (cli/batch.py), the session's batch operation
(engine/session.py) and the app's server view. No torch: the command line builds its parser
from here before any model is loaded.

The built-in prompts are what a small assistant behind a server sees: every request starts with
the same system prompt (long enough to fill several KV blocks) and ends with its own question —
the case prefix caching is for: the system prompt's blocks are computed once and shared.
"""

from __future__ import annotations

import dataclasses
import random
import sys

from .config import ConfigError, GenerationConfig

MAX_FILE_BYTES = 64 << 20          # a prompts file larger than this is a mistake, not a workload

SYSTEM_PROMPT = (
    "You are a helpful assistant at a workshop about how language models run on a computer. "
    "Answer the question below in two or three plain sentences, for a curious student who "
    "knows some programming but has never trained a neural network. Be precise and friendly.\n\n"
)

QUESTIONS = (
    "What is a token?",
    "Why does a model generate one token at a time?",
    "What is the KV cache for?",
    "What does attention compute?",
    "Why is decoding limited by memory bandwidth?",
    "What is a block in a paged KV cache?",
    "Why do servers batch many requests together?",
    "What does greedy decoding mean?",
    "What does the temperature change when sampling?",
    "What is the time to first token?",
    "Why can two requests share the same cached blocks?",
    "What happens when a server runs out of KV memory?",
    "What is quantisation of weights?",
    "Why is the first token slower than the others?",
    "What is a transformer layer made of?",
    "How does a tokenizer split a word it has never seen?",
)

BUILTIN_PROMPTS = tuple(f"{SYSTEM_PROMPT}Question: {q}\nAnswer:" for q in QUESTIONS)


def arrival_times(n: int, rate: float | None, seed: int) -> list[float]:
    """Seconds after the start: all 0, or a Poisson process — exponential gaps of mean 1/rate."""
    if rate is None:
        return [0.0] * n
    rng, t, out = random.Random(seed), 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


def request_config(config: GenerationConfig, i: int) -> GenerationConfig:
    """Request i's settings: `config`, with seed + i when a seed is given — requests sample
    differently from each other, and the same again next time."""
    seed = config.sampling.seed
    if seed is None:
        return config
    return dataclasses.replace(config, sampling=dataclasses.replace(config.sampling,
                                                                    seed=seed + i))


def read_prompts(path: str) -> list[tuple[int, str]]:
    """(line number, prompt) for every non-blank line. Raises ConfigError with one line."""
    if path == "-":
        raw = sys.stdin.buffer.read(MAX_FILE_BYTES + 1)
        name = "standard input"
    else:
        try:
            with open(path, "rb") as f:
                raw = f.read(MAX_FILE_BYTES + 1)
        except FileNotFoundError:
            raise ConfigError(f"prompts file not found: {path}") from None
        except IsADirectoryError:
            raise ConfigError(f"{path} is a directory; --prompts wants a text file, one prompt "
                              f"a line") from None
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
        name = path
    if len(raw) > MAX_FILE_BYTES:
        raise ConfigError(f"{name} is larger than {MAX_FILE_BYTES >> 20} MiB; split it into "
                          f"smaller files")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise ConfigError(f"{name} is not UTF-8 text (line {line}, byte {exc.start}): save it "
                          f"as UTF-8") from None
    text = text.removeprefix("\ufeff")                 # a byte-order mark from some editors
    prompts = [(i, line.rstrip("\r")) for i, line in enumerate(text.split("\n"), 1)
               if line.strip()]
    if not prompts:
        raise ConfigError(f"no prompts in {name}: write one prompt a line")
    return prompts
