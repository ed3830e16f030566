"""What the engine emits: small frozen dataclasses, and the one JSON form they travel in.

A run, in order:

    Started → Prefill → ((StepPoint → LogitLens → Forked?)? → Token → CacheSnapshot
                         → AttentionRow? → FlashTiles?)* → Finished

(the step-mode events only in step mode, at each token where the run paused; `Forked` also
where a request forced a token)

around it, what a session says about itself (`Loading`, `Ready`, `Failed`) and about a race
(`RaceStarted` … the contestants' runs … `RaceFinished`). The batching engine's events
(many requests at once: `RequestArrived` … `PoolSnapshot` … `BatchSummary`) are the last group.

Every consumer reads the same stream: the `run` printer, the app, the recorder and `replay`,
the bench. An event only says *what happened*; the `Envelope` around it says *to which run*
and *when* (seconds on the session's clock), so many requests can share one stream.

This module imports neither torch nor NumPy: a laptop that only replays a recording needs
neither. Attention rows are kept as 8-bit levels of each row's peak (`AttentionRow.probs` turns
them into a NumPy array where NumPy is installed).

JSON: `to_json(event)` gives `{"type": …, "v": SCHEMA_VERSION, field: value, …}` and
`from_json` reads it back into an equal event; `Envelope.to_json()` adds `"run"` and `"t"`.
The run printer (`run --json`), the process pipe of the app and recordings all use these two
functions. docs/events.md lists every type, field and unit.
"""

from __future__ import annotations

import base64
import dataclasses
import math
import struct
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Union

from .config import SamplingConfig
from .metrics import RunMetrics

SCHEMA_VERSION = 1
"""Bumped whenever a change would make an older reader misread a newer stream. Adding an
optional field is not such a change: readers ignore fields they do not know."""

RESERVED = ("type", "v", "run", "t")     # keys of the JSON form that are not event fields


# --------------------------------------------------------------------------- payloads
@dataclass(frozen=True, slots=True)
class SequenceBlocks:
    """One sequence's share of a paged pool."""
    seq_id: int
    blocks: tuple[int, ...]     # its block table: logical block i lives in physical blocks[i]
    tokens: int                 # tokens written
    waste: int                  # unused slots in its last block (internal fragmentation)


@dataclass(frozen=True, slots=True)
class CacheStats:
    """What a KV cache holds and costs, at one moment.

    Bytes per token follow the formula 2 (K and V) × layers × kv_heads × head_dim × dtype bytes;
    `bytes_reserved` is the real size of the tensors the cache allocated.
    """
    kind: str                   # "none" | "kv" | "paged"
    tokens: int                 # tokens whose K/V are held (for one sequence, or all in a pool)
    capacity: int               # tokens the reserved memory could hold
    n_layers: int
    bytes_per_token: int
    bytes_used: int             # tokens × bytes_per_token
    bytes_reserved: int         # memory allocated for the cache, used or not
    bytes_without_gqa: int      # what bytes_reserved would be with one K/V head per query head
    recomputed_tokens: int = 0  # naive strategy: positions pushed through the model this step
    block_size: int = 0         # paged only from here on
    blocks_total: int = 0
    blocks_used: int = 0
    sequences: tuple[SequenceBlocks, ...] = ()

    @property
    def bytes_per_layer_used(self) -> int:
        return self.bytes_used // max(self.n_layers, 1)

    @property
    def bytes_per_layer_reserved(self) -> int:
        return self.bytes_reserved // max(self.n_layers, 1)

    @property
    def k_bytes_used(self) -> int:       # K and V are the same size: each is half
        return self.bytes_used // 2

    @property
    def v_bytes_used(self) -> int:
        return self.bytes_used // 2

    @property
    def blocks_free(self) -> int:
        return self.blocks_total - self.blocks_used

    @property
    def waste_tokens(self) -> int:
        """Reserved but unused slots: the tail of a preallocated buffer, or paged last blocks."""
        if self.kind == "paged":
            return sum(s.waste for s in self.sequences)
        return self.capacity - self.tokens


def run_label(strategy: str, backend: str, fast: str = "") -> str:
    """How a run is named everywhere: "kv/sdpa", or "kv/sdpa +c" with fast-path options."""
    return f"{strategy}/{backend}" + (f" +{fast}" if fast else "")


@dataclass(frozen=True, slots=True)
class Contestant:
    """One run of a race: its run id and its name ("kv/sdpa +c")."""
    run: int
    label: str


@dataclass(frozen=True, slots=True)
class RaceRow:
    """One contestant of a race, summarised by the engine (engine/compare.py decides
    "same tokens" and max |Δ logits|, against the first contestant that ran without error)."""
    strategy: str
    backend: str
    reason: str                      # the contestant's Finished.reason
    tokens: tuple[int, ...]
    text: str
    ttft_s: float                    # seconds (nan when the run made no token)
    tpot_s: float                    # seconds per token after the first (nan below 2 tokens)
    tokens_per_s: float              # decode tokens per second, 1 / TPOT
    peak_memory_bytes: int
    kv_bytes: int
    same_tokens: bool | None         # vs the reference; None for the reference itself
    max_logit_delta: float | None    # max |Δ logits| while both had seen the same tokens
    error: str | None = None
    fast: str = ""                   # fast-path options ("" = the plain model)
    run: int = 0                     # the contestant's run id
    first_difference: int | None = None   # first token index that differs from the reference
    forced: Forked | None = None     # the token forced at first_difference: why it differs
    # A remote contestant (engine/remote.py): how its tokens were compared with the reference
    # ("token ids", "token texts", "text"), or why not; and the server's own figures.
    comparison: str = ""
    server_timings: dict[str, float] = field(default_factory=dict)
    server_metrics: RunMetrics | None = None

    @property
    def label(self) -> str:
        fork = f" fork@{self.forced.index}" if self.forced is not None else ""
        return run_label(self.strategy, self.backend, self.fast) + fork

    @property
    def difference(self) -> str:
        """Where (and, for a fork, why) the tokens differ from the reference; "" if they don't."""
        if self.first_difference is None:
            return ""
        why = f": {self.forced.describe()}" if self.forced is not None else ""
        return f"differs from token {self.first_difference}{why}"


@dataclass(frozen=True, slots=True)
class Candidate:
    """One possible next token in step mode, at each stage of the sampling ladder
    (engine/sampling.py `shape`)."""
    id: int
    text: str                        # the token on its own (special tokens spelled out)
    model: float                     # softmax of the model's logits: what the model says
    tempered: float                  # after repetition penalty and temperature
    final: float                     # what the draw uses, after the cuts (0 if cut)
    cut: str = ""                    # "" kept, or what removed it: top-k, top-p, min-p, greedy


@dataclass(frozen=True, slots=True)
class LensLayer:
    """The logit lens at one layer: the final norm and the LM head applied to that layer's
    residual stream, its most likely next tokens first."""
    layer: int
    ids: tuple[int, ...]
    texts: tuple[str, ...]
    probs: tuple[float, ...]

    @property
    def top(self) -> int | None:
        return self.ids[0] if self.ids else None


# --------------------------------------------------------------------------- session events
@dataclass(frozen=True, slots=True)
class Loading:
    """The model is being converted or loaded: what is happening, how far along (0…1)."""
    text: str
    fraction: float


@dataclass(frozen=True, slots=True)
class Ready:
    """A model is loaded and the session takes requests. `backends` and `fast` map each
    attention backend / fast-path choice to None if it can run here, else the reason why not."""
    model: str
    device: str
    dtype: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    max_seq_len: int
    backends: dict[str, str | None] = field(default_factory=dict)
    fast: dict[str, str | None] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Failed:
    """The session (not one run) failed: the model did not load, the engine process ended.
    `fatal`: no more requests will be served."""
    message: str
    fatal: bool = False


# --------------------------------------------------------------------------- race events
@dataclass(frozen=True, slots=True)
class RaceStarted:
    """A race begins: the same prompt through each contestant, one after another, each after
    `warmup_tokens` untimed tokens of its own (0: no warm-up)."""
    prompt: str
    contestants: tuple[Contestant, ...]
    max_new_tokens: int
    warmup_tokens: int = 0


@dataclass(frozen=True, slots=True)
class RaceFinished:
    """Every contestant ran (or the race was stopped: `cancelled`)."""
    prompt: str
    rows: tuple[RaceRow, ...] = ()
    cancelled: bool = False

    @property
    def identical(self) -> bool | None:
        """True when every contestant produced the same tokens as the reference."""
        others = [r for r in self.rows if r.same_tokens is not None]
        if not others:
            return None
        return all(r.same_tokens for r in others)

    @property
    def max_delta(self) -> float | None:
        deltas = [r.max_logit_delta for r in self.rows if r.max_logit_delta is not None]
        return max(deltas) if deltas else None


# --------------------------------------------------------------------------- run events
@dataclass(frozen=True, slots=True)
class Started:
    """A run has begun (settings as the engine understood them)."""
    strategy: str
    backend: str
    device: str
    dtype: str
    prompt: str
    max_new_tokens: int
    fast: str = ""          # fast-path options as words ("c+int8"); "" for the plain model
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    step: bool = False      # step mode: the run pauses before each token (StepPoint, LogitLens)


@dataclass(frozen=True, slots=True)
class Prefill:
    """The prompt went through the model once (for `naive`: the first full forward)."""
    prompt_tokens: tuple[int, ...]
    prompt_pieces: tuple[str, ...]    # the prompt's text, cut at token boundaries
    seconds: float


@dataclass(frozen=True, slots=True)
class Token:
    """One generated token. `latency_s` is this step's time: for the first token it includes
    the prefill (it is the time to first token)."""
    id: int
    text: str                         # the new text this token completes (may be "" mid-character)
    position: int                     # its position in the sequence (prompt length + index)
    index: int                        # 0 for the first generated token
    latency_s: float
    # Only with keep_logits, only inside the engine's process: logits never cross a boundary
    # (not in JSON, not compared by ==); comparisons happen in the engine (engine/compare.py).
    logits: Any = field(default=None, compare=False, metadata={"local": True})
    # Only when the run asked for logprobs: this token's log-probability under the model, and
    # the most likely tokens as (id, logprob), best first (engine.sampling.token_logprobs).
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True, slots=True)
class CacheSnapshot:
    stats: CacheStats


@dataclass(frozen=True, slots=True)
class AttentionRow:
    """How the newest position attended: probs[layer, head, j] over positions j ≤ position.

    Kept compact, 8 bits a probability: for each (layer, head) its peak (float32, in `peaks`)
    and every probability as round(255 · p / peak) (uint8, in `data`). The heatmap normalises
    each row to its own peak and draws at most 256 shades, so it loses nothing it could show;
    a probability is off by peak / 510 at most. The same bytes are drawn live, cross the
    process pipe and fill a recording: the standard 50-token run's rows, every layer, take
    0.5 MB (0.26 MB gzipped) instead of 2 MB as float32.
    """
    position: int
    shape: tuple[int, int, int]       # (n_layers, n_heads, keys)
    data: bytes                       # n_layers × n_heads × keys uint8 levels, row-major
    peaks: bytes                      # n_layers × n_heads little-endian float32 peaks

    def __post_init__(self) -> None:
        if len(self.shape) != 3 or min(self.shape) < 0:
            raise ValueError(f"attention row shape must be 3 non-negative sizes, got {self.shape}")
        n_layers, n_heads, keys = self.shape
        if len(self.data) != n_layers * n_heads * keys or len(self.peaks) != 4 * n_layers * n_heads:
            raise ValueError(f"attention row of shape {self.shape} needs "
                             f"{n_layers * n_heads * keys} + {4 * n_layers * n_heads} bytes, "
                             f"got {len(self.data)} + {len(self.peaks)}")

    @classmethod
    def of(cls, position: int, probs) -> "AttentionRow":
        """From a (n_layers, n_heads, keys) NumPy array of probabilities (any float dtype)."""
        p = probs.astype("float32")
        peak = p.max(axis=-1, keepdims=True) if p.shape[-1] else p[..., :1].sum(-1, keepdims=True)
        levels = (p / (peak + (peak == 0)) * 255).round().astype("uint8")
        return cls(position=position, shape=tuple(int(n) for n in p.shape),
                   data=levels.tobytes(), peaks=peak.astype("<f4").tobytes())

    @property
    def probs(self):
        """The rows as a (n_layers, n_heads, keys) float32 NumPy array."""
        import numpy as np      # only a consumer that wants arrays needs NumPy
        n_layers, n_heads, keys = self.shape
        levels = np.frombuffer(self.data, dtype=np.uint8).reshape(self.shape)
        peaks = np.frombuffer(self.peaks, dtype="<f4").reshape(n_layers, n_heads, 1)
        return levels.astype(np.float32) * (peaks.astype(np.float32) / 255)

    def head(self, layer: int, head: int) -> list[float]:
        """One head's row as plain floats (no NumPy needed)."""
        n_layers, n_heads, keys = self.shape
        k = layer * n_heads + head
        (peak,) = struct.unpack_from("<f", self.peaks, 4 * k)
        return [q * (peak / 255) for q in self.data[k * keys:(k + 1) * keys]]


@dataclass(frozen=True, slots=True)
class FlashTiles:
    """The flash backend's online-softmax state after each key/value tile, for one head."""
    layer: int
    head: int
    tile_size: int
    running_max: tuple[float, ...]
    running_sum: tuple[float, ...]


@dataclass(frozen=True, slots=True)
class StepPoint:
    """Step mode: the run paused before choosing token `index` (at `position`). The candidates
    are the most likely tokens as the sampler ranks them (after the repetition penalty), plus
    the sampler's choice if it is not among them; `chosen` is what the sampler picked — with a
    seed, exactly what an unstepped run picks here."""
    index: int
    position: int
    candidates: tuple[Candidate, ...]
    chosen: int
    kept: int                          # tokens of the vocabulary the cuts left in the draw
    vocab: int


@dataclass(frozen=True, slots=True)
class LogitLens:
    """Step mode: what each layer would predict for the token at `position`, read through the
    final norm and the LM head. `layers` are the run's own model's (the last one is its
    prediction); for a lossy fast path (`fast`, e.g. "int8") `exact` holds the exact model's
    on the same prefix, so one sees where their top choices part."""
    index: int
    position: int
    layers: tuple[LensLayer, ...]
    exact: tuple[LensLayer, ...] = ()
    fast: str = ""

    @property
    def settles_at(self) -> int | None:
        """The first layer from which the top choice is already the final one."""
        if not self.layers:
            return None
        final, at = self.layers[-1].top, self.layers[-1].layer
        for lens in reversed(self.layers):
            if lens.top != final:
                break
            at = lens.layer
        return at

    @property
    def parts_at(self) -> int | None:
        """The first layer where the lossy model's top choice is not the exact model's."""
        for mine, exact in zip(self.layers, self.exact):
            if mine.top != exact.top:
                return mine.layer
        return None


@dataclass(frozen=True, slots=True)
class Forked:
    """Token `index` was forced to `token` where the sampler chose `instead`: from here on the
    run is a fork of the unforced one (it comes just before that Token)."""
    index: int
    position: int
    token: int
    text: str
    instead: int
    instead_text: str

    def describe(self) -> str:
        return f"forced {self.text!r} instead of {self.instead_text!r}"


@dataclass(frozen=True, slots=True)
class Finished:
    reason: str                       # "length" | "eos" | "stop" | "cancelled" | "error"
    tokens: tuple[int, ...]           # the generated ids
    text: str                         # their decoded text
    metrics: RunMetrics | None = None
    tail: str = ""                    # text not yet in any Token piece (an invalid last byte)
    error: str | None = None
    # A run streamed from a server (engine/remote.py): `metrics` are measured by this client;
    # these are the server's own figures for the same request, where it reports them
    # (llama-server's and `serve`'s `timings`: prompt_n, prompt_ms, predicted_n, …), and
    # `server_metrics` the same definitions as `metrics` from the server's per-token times.
    server_timings: dict[str, float] = field(default_factory=dict)
    server_metrics: RunMetrics | None = None


# --------------------------------------------------------------------------- batch events
# The batching engine (engine/batch.py, docs/batching.md): many requests share one paged pool
# and one forward per step. BatchStarted first; then for one request r, in order
#
#     RequestArrived → RequestAdmitted → PrefillChunk+ → RequestToken* → RequestFinished
#                  (RequestPreempted → RequestResumed → PrefillChunk+ → RequestToken*)*
#
# and after each scheduler step StepDone, then PoolSnapshot; BatchSummary when the batch ends.
# Each carries its request id and `time_s`, seconds since the batching engine started.

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
    first token, since its arrival (the time to first token). `tpot_s`: the request's TPOT so
    far (engine/metrics.py, over its latencies up to this token; None before its second), what
    RequestFinished will say once it ends — so a live view shows it while the request runs."""
    request: int
    id: int
    text: str                   # the new text it completes (may be "" mid-character)
    position: int
    index: int                  # 0 for the request's first new token
    latency_s: float
    time_s: float
    # Only with keep_logits, only inside the engine's process (like Token.logits).
    logits: Any = field(default=None, compare=False, metadata={"local": True})
    logprob: float | None = None                        # as Token's, when asked for
    top_logprobs: tuple[tuple[int, float], ...] = ()
    tpot_s: float | None = None


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
    requests: int = 0               # requests arrived so far (errors left out)
    contiguous_fit: int = 0         # … of which a contiguous reservation each would fit in
                                    # this pool's memory at once (at most; smallest first)
    peak_running: int = 0           # most sequences running at once so far
    new_tokens: int = 0             # so far, every request's
    tokens_per_s: float | None = None   # aggregate so far: new tokens / time since the first
                                        # arrival (engine/metrics.py)


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
    contiguous_fit: int = 0     # requests a contiguous reservation each would fit in the pool
    peak_running: int = 0       # most requests running at once


Event = Union[Loading, Ready, Failed, RaceStarted, RaceFinished, Started, Prefill, Token,
              CacheSnapshot, AttentionRow, FlashTiles, StepPoint, LogitLens, Forked, Finished,
              BatchStarted, RequestArrived, RequestAdmitted, PrefillChunk, RequestToken,
              RequestPreempted, RequestResumed, RequestFinished, StepDone, PoolSnapshot,
              BatchSummary]
STEP_EVENTS = (StepPoint, LogitLens, Forked)

TYPES: dict[str, type] = {
    "loading": Loading, "ready": Ready, "failed": Failed,
    "race_started": RaceStarted, "race_finished": RaceFinished,
    "started": Started, "prefill": Prefill, "token": Token, "cache": CacheSnapshot,
    "attention": AttentionRow, "flash_tiles": FlashTiles, "step_point": StepPoint,
    "lens": LogitLens, "forked": Forked, "finished": Finished,
    "batch_started": BatchStarted, "request_arrived": RequestArrived,
    "request_admitted": RequestAdmitted, "prefill_chunk": PrefillChunk,
    "request_token": RequestToken, "request_preempted": RequestPreempted,
    "request_resumed": RequestResumed, "request_finished": RequestFinished,
    "step_done": StepDone, "pool_snapshot": PoolSnapshot, "batch_summary": BatchSummary,
}
TYPE_NAMES: dict[type, str] = {cls: name for name, cls in TYPES.items()}


@dataclass(frozen=True, slots=True)
class Envelope:
    """An event, the run it belongs to, and when it happened.

    run  the run id of a run event; the race id of a race event; 0 for the session's own
    t    seconds on the emitting session's monotonic clock (only differences mean anything)
    """
    run: int
    t: float
    event: Event

    def to_json(self) -> dict:
        d = to_json(self.event)
        return {"type": d.pop("type"), "v": d.pop("v"), "run": self.run, "t": round(self.t, 6),
                **d}

    @classmethod
    def from_json(cls, d: dict) -> "Envelope":
        run, t = d.get("run"), d.get("t")
        if not isinstance(run, int) or isinstance(run, bool) or not _is_number(t):
            raise ValueError("an envelope needs an integer 'run' and a number 't'")
        return cls(run=run, t=float(t), event=from_json(d))


# --------------------------------------------------------------------------- JSON
def to_json(event) -> dict:
    """The JSON form of an event: {"type", "v", its fields}. NaN and ±inf become null, tuples
    lists, bytes base64 text; `local` fields (Token.logits) are left out."""
    name = TYPE_NAMES.get(type(event))
    if name is None:
        raise TypeError(f"not an engine event: {type(event).__name__}")
    return {"type": name, "v": SCHEMA_VERSION, **_encode_fields(event)}


def from_json(d: dict):
    """The event a `to_json` dictionary describes. Raises ValueError with one line saying what
    is wrong (unknown type, other schema version, a missing or ill-typed field)."""
    if not isinstance(d, dict):
        raise ValueError(f"an event must be a JSON object, got {type(d).__name__}")
    if d.get("v") != SCHEMA_VERSION:
        raise ValueError(f"event schema version {d.get('v')!r}; this program reads "
                         f"version {SCHEMA_VERSION}")
    cls = TYPES.get(d.get("type"))
    if cls is None:
        raise ValueError(f"unknown event type {d.get('type')!r}")
    return _converter(cls)(d, cls.__name__)


def _encode_fields(obj) -> dict:
    return {f.name: _encode(getattr(obj, f.name)) for f in dataclasses.fields(obj)
            if not f.metadata.get("local")}


def _encode(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (tuple, list)):
        return [_encode(v) for v in value]
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, dict):
        return {str(k): _encode(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value):
        return _encode_fields(value)
    return value


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


# from_json reads a field with a converter built once per type from its annotation (the app's
# reader thread decodes every event the engine sends, so this is kept cheap).
_CONVERTERS: dict[Any, Callable[[Any, str], Any]] = {}


def _converter(hint) -> Callable[[Any, str], Any]:
    conv = _CONVERTERS.get(hint)
    if conv is None:
        conv = _CONVERTERS[hint] = _build_converter(hint)
    return conv


def _build_converter(hint) -> Callable[[Any, str], Any]:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        inner = _converter(next(o for o in typing.get_args(hint) if o is not type(None)))
        return lambda v, where: None if v is None else inner(v, where)
    if hint is Any:
        return lambda v, where: v
    if hint is float:
        def to_float(v, where):
            if v is None:
                return math.nan
            if not _is_number(v):
                raise ValueError(f"{where}: expected a number, got {v!r:.40}")
            return float(v)
        return to_float
    if hint is int:
        def to_int(v, where):
            if not isinstance(v, int) or isinstance(v, bool):
                raise ValueError(f"{where}: expected an integer, got {v!r:.40}")
            return v
        return to_int
    if hint in (str, bool):
        def to_plain(v, where):
            if not isinstance(v, hint):
                raise ValueError(f"{where}: expected {hint.__name__}, got {v!r:.40}")
            return v
        return to_plain
    if hint is bytes:
        def to_bytes(v, where):
            if not isinstance(v, str):
                raise ValueError(f"{where}: expected base64 text")
            try:
                return base64.b64decode(v, validate=True)
            except ValueError as exc:
                raise ValueError(f"{where}: bad base64 ({exc})") from None
        return to_bytes
    if origin is tuple:
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            item = _converter(args[0])

            def to_tuple(v, where):
                if not isinstance(v, list):
                    raise ValueError(f"{where}: expected a list, got {v!r:.40}")
                return tuple(item(x, where) for x in v)
            return to_tuple
        items = [_converter(a) for a in args]

        def to_fixed(v, where):
            if not isinstance(v, list) or len(v) != len(items):
                raise ValueError(f"{where}: expected a list of {len(items)}, got {v!r:.40}")
            return tuple(c(x, where) for c, x in zip(items, v))
        return to_fixed
    if origin is dict:
        item = _converter(typing.get_args(hint)[1])

        def to_dict(v, where):
            if not isinstance(v, dict):
                raise ValueError(f"{where}: expected an object, got {v!r:.40}")
            return {str(k): item(x, where) for k, x in v.items()}
        return to_dict
    if dataclasses.is_dataclass(hint):
        return _dataclass_converter(hint)
    raise TypeError(f"no JSON form for {hint!r}")


def _dataclass_converter(cls) -> Callable[[Any, str], Any]:
    hints = typing.get_type_hints(cls)
    fields = []                              # (name, converter, required)
    for f in dataclasses.fields(cls):
        if f.metadata.get("local"):
            continue
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        fields.append((f.name, hints[f.name], required))
    converters: list = []

    def to_dataclass(v, where):
        if not isinstance(v, dict):
            raise ValueError(f"{where}: expected an object, got {v!r:.40}")
        if not converters:                   # built on first use: a field may be this class
            converters.extend((n, _converter(h), r) for n, h, r in fields)
        kwargs = {}
        for name, conv, required in converters:
            if name in v:
                kwargs[name] = conv(v[name], f"{where}.{name}")
            elif required:
                raise ValueError(f"{where}: missing field {name!r}")
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as exc:       # the dataclass's own checks
            raise ValueError(f"{where}: {exc}") from None
    return to_dataclass
