"""One request's life inside the batching engine: its tokens, how many are in the KV cache, and
what it has produced so far.

    WAITING  ──admit──▶  RUNNING  ──eos / length / stop / cancel──▶  FINISHED
       ▲                    │
       └────preempt─────────┘   (its blocks are released; its K/V will be recomputed)

The scheduler reads `tokens` and `num_computed`: positions [0, num_computed) have K/V in the
pool, the rest must go through the model. A running sequence that has just sampled a token has
exactly one uncomputed token — that token, whose K/V the next decode step writes. A preempted
sequence drops to num_computed = 0 but keeps its generated tokens (and its sampler's state), so
after recomputing it continues exactly where it stopped.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from .config import GenerationConfig
from .tokenizer import StreamDecoder


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    id: int
    prompt: list[int]
    config: GenerationConfig           # max_new_tokens, sampling, stop rules of this request
    arrival_s: float                   # when the request arrived (engine clock)
    generator: torch.Generator         # its own: a seed gives the same tokens in any batch
    stream: StreamDecoder              # ids → text pieces, across multi-byte characters
    tokens: list[int] = field(default_factory=list)       # prompt + generated
    num_computed: int = 0
    prefill_end: int = 0               # len(tokens) when last admitted: chunks before it are
                                       # prompt (or recomputation), chunks after it decode
    status: Status = Status.WAITING
    admitted_s: float | None = None    # first admission
    token_times: list[float] = field(default_factory=list)   # when each new token was sampled
    latencies: list[float] = field(default_factory=list)     # arrival → first token, then the
                                                             # gaps between tokens (its TTFT,
                                                             # its TPOT: engine/metrics.py)
    cached_tokens: int = 0             # prompt tokens found in the prefix cache at admission
    preemptions: int = 0
    finish_reason: str | None = None
    logits: list[torch.Tensor] | None = None   # each step's logits, if config.keep_logits

    def __post_init__(self) -> None:
        if not self.tokens:
            self.tokens = list(self.prompt)

    @property
    def generated(self) -> list[int]:
        return self.tokens[len(self.prompt):]

    @property
    def uncomputed(self) -> int:
        return len(self.tokens) - self.num_computed
