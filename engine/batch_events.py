"""What the batching engine emits: small frozen dataclasses of plain values (no tensors, no
torch import), each convertible to and from one JSON object.

BatchStarted first; then for one request r, in order:

    RequestArrived → RequestAdmitted → PrefillChunk+ → RequestToken* → RequestFinished
                          (RequestPreempted → RequestResumed → PrefillChunk+ → RequestToken*)*

and once per scheduler step, after the step's request events:

    StepDone (what the forward computed, queue lengths) → PoolSnapshot (every block's holders)

then BatchSummary when the run ends. Times are seconds since the engine started (`time_s`).
These are meant to join the engine's one event schema (engine/events.py) when it becomes plain
JSON; until then `to_json` / `from_json` here do the same job for the batch events.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class BatchStarted:
    """The engine's settings, once, before any request."""
    model: str
    device: str
    dtype: str
    backend: str
    max_batch: int
    max_step_tokens: int
    block_size: int
    num_blocks: int
    bytes_per_block: int        # K and V of block_size tokens, every layer
    prefix_caching: bool


@dataclass(frozen=True, slots=True)
class RequestArrived:
    request: int
    prompt_tokens: int
    max_new_tokens: int
    time_s: float
    prompt: str = ""            # its text (decoded, if it came as token ids)


@dataclass(frozen=True, slots=True)
class RequestAdmitted:
    """The request got its blocks and joined the running batch."""
    request: int
    cached_tokens: int          # prompt tokens whose K/V came from the prefix cache
    queue_s: float              # time spent waiting since arrival
    time_s: float


@dataclass(frozen=True, slots=True)
class PrefillChunk:
    """Positions [start, start + tokens) went through the model in step `step`."""
    request: int
    start: int
    tokens: int
    last: bool                  # it completed the prompt (a token is sampled from it)
    step: int


@dataclass(frozen=True, slots=True)
class RequestToken:
    """One new token of request r. `latency_s` is the time since its previous token — for the
    first token, since its arrival (the time to first token)."""
    request: int
    id: int
    text: str                   # the new text it completes (may be "" mid-character)
    position: int
    index: int                  # 0 for the request's first new token
    latency_s: float
    time_s: float
    logits: tuple[float, ...] | None = None   # only with keep_logits (tests, comparisons)


@dataclass(frozen=True, slots=True)
class RequestPreempted:
    """The pool ran out: r's blocks were released, it waits again to be recomputed."""
    request: int
    freed_blocks: int
    recompute_tokens: int       # its tokens so far (prompt + generated), to compute again
    step: int
    time_s: float


@dataclass(frozen=True, slots=True)
class RequestResumed:
    """A preempted request was admitted again."""
    request: int
    cached_tokens: int          # of its tokens, found again in the prefix cache
    recompute_tokens: int       # the rest, computed again in prefill chunks
    time_s: float


@dataclass(frozen=True, slots=True)
class RequestFinished:
    request: int
    reason: str                 # "length" | "eos" | "stop" | "cancelled" | "error"
    tokens: tuple[int, ...]
    text: str
    prompt_tokens: int
    cached_tokens: int
    preemptions: int
    ttft_s: float | None        # arrival → first token (None without tokens)
    tpot_s: float | None        # per token after the first (None with fewer than two)
    queue_s: float | None       # arrival → first admission
    time_s: float
    tail: str = ""              # text not yet in any token piece (an invalid last byte)
    error: str | None = None


@dataclass(frozen=True, slots=True)
class StepDone:
    """One forward pass of the batch."""
    step: int
    seconds: float              # the forward and the sampling
    batch: int                  # sequences in the forward
    decode_tokens: int          # … of which decoding one token
    prefill_tokens: int         # tokens of prompt chunks (incl. recomputation)
    running: int                # sequences holding blocks after the step
    waiting: int
    time_s: float


@dataclass(frozen=True, slots=True)
class SequenceView:
    """One running sequence's share of the pool."""
    request: int
    blocks: tuple[int, ...]     # its block table
    tokens: int                 # tokens whose K/V it holds
    waste: int                  # unused slots in its last block (the paged cache's only waste)
    shared: int                 # of its blocks, held by other sequences too


@dataclass(frozen=True, slots=True)
class PoolSnapshot:
    """The block pool after a step: who holds each block, and what a contiguous cache would
    have needed for the same requests."""
    step: int
    block_size: int
    blocks_total: int
    blocks_used: int
    ref_counts: tuple[int, ...]     # per block: how many sequences hold it (0 = free)
    owners: tuple[int, ...]         # per block: the first request holding it (-1 = free)
    cached: tuple[int, ...]         # blocks in the prefix cache (used or free, revivable)
    sequences: tuple[SequenceView, ...]
    waiting: int
    running: int
    preemptions: int                # so far
    prefix_hit_tokens: int          # so far, prompt tokens found in the prefix cache …
    prefix_lookup_tokens: int       # … of those looked up
    contiguous_tokens: int          # what the running requests would reserve contiguously:
                                    # prompt + max new tokens each (the `kv` cache's way)
    time_s: float


@dataclass(frozen=True, slots=True)
class BatchSummary:
    """The whole run (definitions of the figures: engine/metrics.py, BatchMetrics)."""
    requests: int
    finished: int               # ended by length / eos / stop
    cancelled: int
    failed: int
    new_tokens: int
    wall_s: float
    tokens_per_s: float | None
    decode_tokens_per_s: float | None
    ttft_p50_s: float | None
    ttft_p99_s: float | None
    tpot_p50_s: float | None
    tpot_p99_s: float | None
    steps: int
    preemptions: int
    prefix_hit_rate: float | None
    peak_blocks_used: int
    blocks_total: int
    block_size: int
    peak_contiguous_blocks: int  # the same peak, had each request reserved prompt + max new
    interrupted: bool = False


BatchEvent = (BatchStarted | RequestArrived | RequestAdmitted | PrefillChunk | RequestToken
              | RequestPreempted | RequestResumed | RequestFinished | StepDone | PoolSnapshot
              | BatchSummary)

_TYPES = {cls.__name__: cls for cls in (
    BatchStarted, RequestArrived, RequestAdmitted, PrefillChunk, RequestToken, RequestPreempted,
    RequestResumed, RequestFinished, StepDone, PoolSnapshot, BatchSummary)}


def to_dict(event) -> dict:
    """{"type": class name, every field}: tuples become lists, views become objects."""
    out = {"type": type(event).__name__}
    for f in dataclasses.fields(event):
        value = getattr(event, f.name)
        if f.name == "sequences":
            value = [dataclasses.asdict(s) for s in value]
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


def from_dict(data: dict):
    """The inverse of to_dict. Raises ValueError for an unknown type or missing fields."""
    kind = data.get("type")
    cls = _TYPES.get(kind)
    if cls is None:
        raise ValueError(f"unknown batch event type {kind!r}")
    kw = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            if f.default is not dataclasses.MISSING:
                continue
            raise ValueError(f"{kind} event without {f.name!r}")
        value = data[f.name]
        if f.name == "sequences":
            value = tuple(SequenceView(**{**s, "blocks": tuple(s["blocks"])}) for s in value)
        elif isinstance(value, list):
            value = tuple(value)
        kw[f.name] = value
    return cls(**kw)


def to_json(event) -> str:
    """One line of JSON. NaN is not JSON: figures that do not exist are null."""
    return json.dumps(to_dict(event), allow_nan=False, ensure_ascii=False)


def from_json(line: str):
    return from_dict(json.loads(line))
