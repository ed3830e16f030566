"""A session: one loaded model that turns requests into events.

    session = Session.load(None, "cpu", "float32")               # or Session(loaded_model)
    session.ready()                                              # → Ready: model, shape, what runs
    for env in session.run(RunRequest("Deep learning is", GenerationConfig(), run_id=1)):
        env.run, env.t, env.event                                # Started, Prefill, Token, …
    for env in session.race(RaceRequest(2, (RunRequest(…, run_id=3), RunRequest(…, run_id=4)))):
        …                                                        # RaceStarted, runs, RaceFinished
    for env in session.batch(BatchRequest(prompts, GenerationConfig(), batch_id=5)):
        …                      # BatchStarted, RequestArrived … PoolSnapshot …, BatchSummary
    session.cancel()                                             # from any thread

    for env in session.run(RunRequest("Deep learning is", run_id=2, step=True)):   # step mode
        …                            # StepPoint, LogitLens: the run has paused before a token
    session.step(StepCommand(2, "next"))           # from another thread: next / force / run

Everything a session does comes out as `engine.events` in an `Envelope` (run id, time), so the
same stream feeds `python main.py run`, the app's engine process, a recording, and later an
HTTP server. A run that fails ends in `Finished(reason="error", error=…)` instead of raising
(unless asked to raise: the command line wants the exception's kind for its exit status).

A batch is many prompts served together by the batching engine (engine/batch.py: continuous
batching on one paged pool, prefix caching); its events all carry the batch id, and each names
its request. Cancelling stops it at the next scheduler step: what is running or waiting is
cancelled and the summary says `interrupted`.

Requests run one at a time; the race compares its contestants here, with engine/compare.py, so
logits never leave the process — a remote contestant too (a run on an OpenAI-compatible server,
engine/remote.py), so a consumer only renders the verdict. Each contestant first runs a few
tokens untimed (`warmup`): the first run of a kind pays one-off costs — threads starting, a
kernel library loading, weights being converted — which would otherwise land in its TTFT (387 ms
instead of 106 ms measured for the first contestant in the app). Cancelling sets a flag the running request sees at its next
token; the flag stays set until whoever sends the next request clears it (`clear_cancel`) —
the app clears it *before* sending, so a stop pressed right after a start cannot be lost.

A step-mode run (engine/stepping.py) waits on the session's `inbox` for StepCommands: by
default a queue that `step()` fills; the app's engine process hands in its command queue
instead. `cancel()` also puts a wake-up there, so a paused run stops at once.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from typing import Callable, Iterator

from . import fast, stepping
from .attention import backend_names, get_backend
from .compare import compare
from .config import FAST_CHOICES, FastPathConfig, GenerationConfig
from .decoding import StepBuilder, generate
from .events import (Contestant, Envelope, Event, Failed, Finished, Forked, RaceFinished,
                     RaceRow, RaceStarted, Ready, Started, Token)
from .loader import load_model
from .remote import compare_remote, remote_events
from .requests import REMOTE, WAKE_UP, BatchRequest, RaceRequest, RunRequest, StepCommand
from .workload import arrival_times, request_config

WARMUP_TOKENS = 2      # untimed tokens each race contestant runs first

def error_message(exc: BaseException) -> str:
    """One line for the user, whatever went wrong."""
    name = type(exc).__name__
    text = (str(exc).strip().splitlines() or [""])[0]
    if "OutOfMemory" in name or "out of memory" in text.lower():
        return f"out of memory: {text or name} — try fewer tokens, a smaller dtype or another strategy"
    if name in ("ConfigError", "ModelLoadError", "CacheFullError", "FileNotFoundError"):
        return text or name
    return f"{name}: {text}" if text else name


class Session:
    """Owns a loaded model (`lm`: .model, .tokenizer, .name, .config) and serves requests.

    generate, steps: the decoding loop and the fast path's step builder (tests hand in others).
    cancel: the flag a run checks at each token (anything with is_set/set/clear; a
    multiprocessing Event when another process stops runs). inbox: where a paused step-mode
    run reads its StepCommands (anything with get/put). clock: the envelopes' time source.
    """

    def __init__(self, lm, *, generate: Callable[..., Iterator[Event]] = generate,
                 steps: StepBuilder = fast.STEPS, cancel=None, inbox=None,
                 clock: Callable[[], float] = time.monotonic):
        self.lm, self.generate, self.steps, self.clock = lm, generate, steps, clock
        self.flag = cancel if cancel is not None else threading.Event()
        self.inbox = inbox if inbox is not None else queue.Queue()
        self.endpoints: dict = {}            # remote servers resolved once (engine/remote.py)

    @classmethod
    def load(cls, model: str | None = None, device: str = "auto", dtype: str = "float32",
             progress: Callable[[str, float], None] | None = None, weights: str = "same",
             **kw) -> "Session":
        """weights="gguf": a GGUF's matrices kept in its own blocks (`run --weights gguf`) —
        the fast path's own loader, so that the loader never imports the fast path."""
        if weights == "gguf":
            from .fast.gguf_weights import load_gguf_blocks
            return cls(load_gguf_blocks(model, device, dtype, progress), **kw)
        return cls(load_model(model, device, dtype, progress=progress), **kw)

    # ------------------------------------------------------------------ what is loaded
    def ready(self, probe: bool = True) -> Ready:
        """The model, its shape, and (`probe`) which backends and fast-path choices can run
        here — trying them takes a moment (the C step may be compiled), so `run` skips it."""
        lm, cfg = self.lm, self.lm.config
        device = lm.model.device
        backends: dict[str, str | None] = {}
        for name in backend_names() if probe else ():
            try:
                get_backend(name, device)
                backends[name] = None
            except Exception as exc:      # noqa: BLE001 — any reason is a reason to say
                backends[name] = error_message(exc)
        choices: dict[str, str | None] = {}
        for spec in FAST_CHOICES if probe else ():
            try:
                self.steps.check(lm.model, "kv", FastPathConfig.from_spec(spec))
                choices[spec] = None
            except Exception as exc:      # noqa: BLE001
                choices[spec] = error_message(exc)
        return Ready(model=lm.name, device=str(device),
                     dtype=str(lm.model.dtype).removeprefix("torch."), n_layers=cfg.n_layers,
                     n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
                     max_seq_len=cfg.max_seq_len, backends=backends, fast=choices)

    # ------------------------------------------------------------------ requests
    def envelope(self, run: int, event: Event) -> Envelope:
        return Envelope(run=run, t=self.clock(), event=event)

    def run(self, request: RunRequest, *, raise_errors: bool = False) -> Iterator[Envelope]:
        """The run's events, in envelopes carrying its run id."""
        for event in self._events(request, raise_errors):
            yield self.envelope(request.run_id, event)

    def race(self, race: RaceRequest, warmup: int = WARMUP_TOKENS) -> Iterator[Envelope]:
        """Each contestant in turn on the same prompt — `warmup` tokens untimed first, then
        its run — compared with the first local one that finishes without an error:
        RaceStarted, every contestant's run, RaceFinished. A contestant stopped part-way is
        compared on the tokens it made. A remote contestant (`RunRequest.remote`) streams from
        its server and is compared by what the server sent (`_remote_row`)."""
        yield self.envelope(race.race_id, RaceStarted(
            prompt=race.prompt, max_new_tokens=max(r.config.max_new_tokens for r in race.runs),
            contestants=tuple(Contestant(r.run_id, r.label) for r in race.runs),
            warmup_tokens=warmup))
        rows: list[RaceRow] = []
        reference = None                      # (tokens, logits, Token events) of the reference
        cancelled = False
        for request in race.runs:
            if self.flag.is_set():
                cancelled = True
                break
            cfg = dataclasses.replace(request.config, keep_logits=True,
                                      sampling=shared_seed(request.config.sampling))
            if warmup:
                self.warm_up(dataclasses.replace(request, config=cfg), warmup)
            logits, forks, fin, tokens = [], [], None, []
            for event in self._events(dataclasses.replace(request, config=cfg)):
                if isinstance(event, Token):
                    if event.logits is not None:
                        logits.append(event.logits)      # compared here, never sent on
                        event = dataclasses.replace(event, logits=None)
                    tokens.append(event)
                if isinstance(event, Forked):
                    forks.append(event)
                if isinstance(event, Finished):
                    fin = event
                yield self.envelope(request.run_id, event)
            row = race_row(request, fin)
            cancelled = fin is not None and fin.reason == "cancelled"
            if row.error is None and request.remote is not None:
                row = self._remote_row(row, tokens, reference, cfg, cancelled)
            elif row.error is None:
                if reference is None and not cancelled:
                    reference = (row.tokens, logits, tokens)
                elif reference is not None:
                    n = len(row.tokens) if cancelled else None     # stopped: its prefix
                    c = compare(row.tokens, reference[0][:n], logits, reference[1][:n], forks)
                    row = dataclasses.replace(row, same_tokens=c.identical,
                                              first_difference=c.first_difference,
                                              max_logit_delta=c.max_logit_delta,
                                              forced=c.forced)
            rows.append(row)
            if cancelled:
                break
        yield self.envelope(race.race_id, RaceFinished(prompt=race.prompt, rows=tuple(rows),
                                                       cancelled=cancelled))

    def _remote_row(self, row: RaceRow, tokens: list, reference, cfg: GenerationConfig,
                    cancelled: bool) -> RaceRow:
        """A remote contestant against the reference, by what the server sent
        (engine/remote.py compare_remote) — only greedy: a sampled server draws its own
        random numbers, however the seed is set."""
        if reference is None:
            return dataclasses.replace(row, comparison="not compared: no local contestant "
                                                       "finished to compare with")
        if cfg.sampling.temperature > 0:
            return dataclasses.replace(row, comparison="not compared: sampled — the server "
                                                       "draws its own random numbers")
        n = len(tokens) if cancelled else None                  # stopped: its prefix
        ref_tokens = reference[2][:n]
        tok = self.lm.tokenizer
        c, how = compare_remote(tokens, row.text, ref_tokens,
                                "".join(t.text for t in ref_tokens),
                                piece=getattr(tok, "token_text", None),
                                encode=getattr(tok, "encode", None))
        if c is None:
            return dataclasses.replace(row, comparison=how)
        return dataclasses.replace(row, same_tokens=c.identical,
                                   first_difference=c.first_difference, comparison=how)

    def batch(self, request: BatchRequest) -> Iterator[Envelope]:
        """Serve every prompt of `request` at once: the batching engine's events, each in an
        envelope carrying the batch id — BatchStarted first, BatchSummary last. A batch that
        cannot start (a bad setting, no room for its longest request) is one Failed event; a
        request that can never run finishes with reason "error" and the others go on."""
        from .batch import serve
        try:
            engine, requests = self._batch_engine(request)
        except Exception as exc:          # noqa: BLE001 — said, not raised
            yield self.envelope(request.batch_id,
                                Failed(f"the batch did not start: {error_message(exc)}"))
            return
        events = serve(engine, requests, stop=self.flag.is_set)
        try:
            for event in events:
                yield self.envelope(request.batch_id, event)
        except Exception as exc:          # noqa: BLE001 — a failed step ends the batch, said
            events.close()
            yield self.envelope(request.batch_id, Failed(f"the batch failed: "
                                                         f"{error_message(exc)}"))
            engine.cancel_all()
            for event in [*engine.drain(), engine.summary(interrupted=True)]:
                yield self.envelope(request.batch_id, event)

    def _batch_engine(self, request: BatchRequest):
        """The batching engine for `request`, and its (arrival time, prompt, config) requests.
        The pool: request.num_blocks, or a contiguous reservation's worth for `reserve_for`
        (default max_batch) of the longest requests."""
        from .batch import BatchEngine
        from .scheduler import SchedulerConfig
        lm, cfg = self.lm, request.config
        lengths = [len(lm.tokenizer.encode(p)) for p in request.prompts]
        per_request = -(-(max(lengths) + cfg.max_new_tokens) // cfg.block_size)
        blocks = request.num_blocks or (request.reserve_for or request.max_batch) * per_request
        limits = SchedulerConfig(max_batch=request.max_batch,
                                 max_step_tokens=request.max_step_tokens,
                                 block_size=cfg.block_size, num_blocks=blocks,
                                 prefix_caching=request.prefix_caching)
        engine = BatchEngine(lm.model, lm.tokenizer, limits, backend=cfg.backend,
                             model_name=lm.name)
        times = arrival_times(len(request.prompts), request.arrival_rate, request.arrival_seed)
        return engine, [(t, p, request_config(cfg, i))
                        for i, (t, p) in enumerate(zip(times, request.prompts))]

    def warm_up(self, request: RunRequest, tokens: int) -> None:
        """Run `request` for a few tokens and drop its events: what a first run pays once
        (threads, kernels, converted weights) is paid here, outside the timing."""
        cfg = dataclasses.replace(request.config, keep_logits=False,
                                  max_new_tokens=min(tokens, request.config.max_new_tokens))
        for _ in self._events(dataclasses.replace(request, config=cfg)):
            pass

    def step(self, command: StepCommand) -> None:
        """Tell the paused step-mode run `command.run_id` what to do next (from any thread)."""
        self.inbox.put(command)

    def cancel(self) -> None:
        """Stop the current request at its next token (a race: the whole race); a step-mode
        run paused before a token stops at once."""
        self.flag.set()
        self.inbox.put(StepCommand(WAKE_UP, "cancel"))

    def clear_cancel(self) -> None:
        self.flag.clear()

    # ------------------------------------------------------------------ inside
    def _events(self, request: RunRequest, raise_errors: bool = False) -> Iterator[Event]:
        if request.remote is not None:       # on a server: engine/remote.py streams it
            yield from remote_events(request, self.flag, self.endpoints)
            return
        cfg = request.config
        try:
            options = self._backend_options(cfg)
            pause = self._pause(request)
            if pause is not None:
                options["pause"] = pause
            for event in self.generate(self.lm.model, self.lm.tokenizer, request.prompt, cfg,
                                       cancel=self.flag, steps=self.steps, **options):
                if request.step and isinstance(event, Started):
                    event = dataclasses.replace(event, step=True)   # say so to every consumer
                yield event
        except Exception as exc:          # noqa: BLE001 — a failed run is an event, not a crash
            if raise_errors:
                raise
            yield Finished(reason="error", tokens=(), text="", error=error_message(exc))

    def _pause(self, request: RunRequest):
        """What the run does between choosing a token and taking it: stop and wait (step
        mode), take a forced token (a fork), or nothing."""
        if request.step:
            return stepping.step_pause(stepping.Stepper(request.run_id, self.inbox, self.flag),
                                       self.lm.model)
        if request.forces:
            return stepping.forced_pause(request.forces)
        return None

    def _backend_options(self, cfg: GenerationConfig) -> dict:
        """The flash backend records its tile-by-tile softmax state only when attention rows are
        asked for (the app animates it); other backends are built by `generate` itself."""
        if cfg.backend != "flash" or not cfg.attention_rows:
            return {}
        return dict(backend=get_backend("flash", self.lm.model.device, tile=cfg.flash_tile,
                                        trace=True))


def shared_seed(sampling):
    """Sampled contestants can only be compared if they draw the same random numbers."""
    if sampling.temperature > 0 and sampling.seed is None:
        return dataclasses.replace(sampling, seed=0)
    return sampling


def race_row(request: RunRequest, fin: Finished | None) -> RaceRow:
    """One contestant's line of the race table (the comparison is filled in by the caller)."""
    cfg, m = request.config, getattr(fin, "metrics", None)
    nan = float("nan")
    if request.remote is not None:           # named as RunRequest.label names it
        return dataclasses.replace(
            race_row(dataclasses.replace(request, remote=None), fin),
            strategy=REMOTE, backend=request.remote.name, fast="",
            server_timings=dict(getattr(fin, "server_timings", None) or {}),
            server_metrics=getattr(fin, "server_metrics", None))
    return RaceRow(strategy=cfg.strategy, backend=cfg.backend, fast=cfg.fast.spec(),
                   run=request.run_id, reason=fin.reason if fin else "error",
                   tokens=tuple(fin.tokens) if fin else (), text=fin.text if fin else "",
                   ttft_s=m.ttft_s if m else nan, tpot_s=m.tpot_s if m else nan,
                   tokens_per_s=m.decode_tokens_per_s if m else nan,
                   peak_memory_bytes=m.peak_memory_bytes if m else 0,
                   kv_bytes=m.kv_bytes if m else 0, same_tokens=None, max_logit_delta=None,
                   error=(fin.error if fin else "no result"))
