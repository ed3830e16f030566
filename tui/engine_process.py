"""The engine side of the app: a loop that loads a model, runs requests and sends events back.

The app never runs the model in its own process. Textual draws from the same Python process,
and the GIL makes a model thread and the UI slow each other down (see ../shared/STYLE.md: a
665 tok/s producer fell to ~110 tok/s when it fed the UI token by token). So the model lives in a
child process started with "spawn" (a fresh interpreter: no inherited threads or CUDA state),
and this module is all that child runs. It imports no Textual.

Protocol (plain picklable values):
    app → engine   ("run", RunRequest) | ("race", RaceRequest) | None (shut down)
                   plus a shared cancel Event, set by the app to stop the current run or race
    engine → app   ("progress", text, fraction) | ("ready", info) | ("load_failed", text)
                   ("events", run_id, [event, …]) | ("error", run_id, text) | ("race", dict)

Events are batched: one ("events", …) message about every 1/12 s, so the app receives and
repaints at ~12 Hz whatever the token rate. Logits (kept for race comparisons) never cross the
boundary: the engine compares them itself and sends only the numbers.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

FLUSH_INTERVAL_S = 1 / 12


@dataclass(frozen=True)
class RunRequest:
    run_id: int
    prompt: str
    strategy: str = "kv"
    backend: str = "sdpa"
    max_new_tokens: int = 50
    sampling: dict = field(default_factory=dict)    # SamplingConfig fields
    attention_rows: bool = True
    fast: str = ""                                  # fast-path options, e.g. "c+int8"
    flash_tile: int = 64                            # keys per tile of the flash backend


# The fast-path options the app cycles through with `f` (FastPathConfig.from_spec words; "" is
# the plain model). Exact ones first: they change the speed, never the tokens.
FAST_CHOICES = ("", "c", "fuse+cols", "c+int8", "int8", "fp16")


@dataclass(frozen=True)
class RaceRequest:
    race_id: int
    run_ids: tuple[int, ...]                        # one per contestant, in order
    prompt: str
    combos: tuple[tuple[str, str, str], ...]        # (strategy, backend, fast-path options)
    max_new_tokens: int = 50
    sampling: dict = field(default_factory=dict)
    attention_rows: bool = True
    flash_tile: int = 64


def user_message(exc: BaseException) -> str:
    """One line for a notification, whatever went wrong."""
    name = type(exc).__name__
    text = (str(exc).strip().splitlines() or [""])[0]
    if "OutOfMemory" in name or "out of memory" in text.lower():
        return f"out of memory: {text or name} — try fewer tokens, a smaller dtype or another strategy"
    if name in ("ConfigError", "ModelLoadError", "CacheFullError", "FileNotFoundError"):
        return text or name
    return f"{name}: {text}" if text else name


class EngineLoop:
    """Serve requests one at a time. `send` puts one protocol tuple on the way to the app."""

    def __init__(self, send: Callable[[tuple], None], cancel, generate: Callable,
                 flush_interval: float = FLUSH_INTERVAL_S, freeze_gc: bool = True):
        self.send, self.cancel, self.generate = send, cancel, generate
        self.freeze_gc = freeze_gc
        self.flush_interval = flush_interval
        self.lm = None
        self.steps = None

    # ------------------------------------------------------------------ loading
    def load(self, load: Callable[..., Any]) -> bool:
        def progress(text: str, fraction: float) -> None:
            self.send(("progress", text, float(fraction)))
        try:
            self.lm = load(progress=progress)
        except BaseException as exc:      # noqa: BLE001 — the app must hear about anything
            self.send(("load_failed", user_message(exc)))
            return False
        # Loading allocates millions of objects; a later full collection walks them all and
        # freezes for ~200 ms. Freezing moves them out of the collector's sight for good.
        if self.freeze_gc:
            gc.collect()
            gc.freeze()
        self.send(("ready", self.info()))
        return True

    def info(self) -> dict:
        lm = self.lm
        cfg = lm.config
        from engine.attention import backend_names, get_backend
        device = lm.model.device
        reasons = {}
        for name in backend_names():
            try:
                get_backend(name, device)
                reasons[name] = None
            except Exception as exc:      # noqa: BLE001
                reasons[name] = user_message(exc)
        return dict(name=lm.name, device=str(device),
                    dtype=str(lm.model.dtype).removeprefix("torch."), backends=reasons,
                    n_layers=cfg.n_layers, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads,
                    head_dim=cfg.head_dim, max_seq_len=cfg.max_seq_len,
                    fast=self.fast_reasons())

    def fast_reasons(self) -> dict[str, str | None]:
        """For each of FAST_CHOICES: None if it can run on this model here, else why not."""
        from engine.config import FastPathConfig
        from engine.fast import check_c_step
        reasons = {}
        for spec in FAST_CHOICES:
            try:
                if FastPathConfig.from_spec(spec).kernel == "c":
                    check_c_step(self.lm.model, "kv")
                reasons[spec] = None
            except Exception as exc:      # noqa: BLE001
                reasons[spec] = user_message(exc)
        return reasons

    # ------------------------------------------------------------------ serving
    def serve(self, get: Callable[[], Any]) -> None:
        while True:
            cmd = get()
            if cmd is None:
                return
            kind, req = cmd
            if self.lm is None:
                ids = req.run_ids if kind == "race" else (req.run_id,)
                for rid in ids:
                    self.send(("error", rid, "no model is loaded"))
                continue
            if kind == "run":
                self.run_one(req.run_id, req.prompt, req.strategy, req.backend,
                             req.max_new_tokens, req.sampling, req.attention_rows,
                             fast=req.fast, flash_tile=req.flash_tile)
            elif kind == "race":
                self.race(req)

    def _config(self, strategy, backend, max_new_tokens, sampling, attention_rows, keep_logits,
                fast="", flash_tile=64):
        from engine.config import FastPathConfig, GenerationConfig, SamplingConfig
        return GenerationConfig(strategy=strategy, backend=backend, max_new_tokens=max_new_tokens,
                                sampling=SamplingConfig(**sampling), attention_rows=attention_rows,
                                keep_logits=keep_logits, fast=FastPathConfig.from_spec(fast),
                                flash_tile=flash_tile)

    def backend_options(self, cfg) -> dict:
        """The flash backend records its tile-by-tile softmax state only when asked (the
        attention pane animates it); other backends are built by `generate` itself."""
        if cfg.backend != "flash" or not cfg.attention_rows:
            return {}
        from engine.attention import get_backend
        return dict(backend=get_backend("flash", self.lm.model.device, tile=cfg.flash_tile,
                                        trace=True))

    def run_one(self, run_id, prompt, strategy, backend, max_new_tokens, sampling,
                attention_rows=True, keep_logits=False, fast="", flash_tile=64):
        """Run one request, sending batched events. Returns (Finished or None, [logits])."""
        from engine.events import Finished, Started, Token
        logits: list = []
        batch: list = []
        last = time.perf_counter()
        finished = None
        try:
            cfg = self._config(strategy, backend, max_new_tokens, sampling, attention_rows,
                               keep_logits, fast, flash_tile)
            extra = self.backend_options(cfg)
            for ev in self.generate(self.lm.model, self.lm.tokenizer, prompt, cfg,
                                    cancel=self.cancel, steps=self.steps, **extra):
                if isinstance(ev, Token) and ev.logits is not None:
                    logits.append(ev.logits)
                    ev = dataclasses.replace(ev, logits=None)
                batch.append(ev)
                now = time.perf_counter()
                if isinstance(ev, (Started, Finished)) or now - last >= self.flush_interval:
                    self.send(("events", run_id, batch))
                    batch, last = [], now
                if isinstance(ev, Finished):
                    finished = ev
        except BaseException as exc:      # noqa: BLE001
            if batch:
                self.send(("events", run_id, batch))
            message = user_message(exc)
            self.send(("error", run_id, message))
            return Finished(reason="error", tokens=(), text="", error=message), logits
        if batch:
            self.send(("events", run_id, batch))
        return finished, logits

    def race(self, req: RaceRequest) -> None:
        """Each contestant in turn on the same prompt; compare tokens and logits to the first."""
        import numpy as np
        rows: list[dict] = []
        ref_tokens, ref_logits = None, None
        cancelled = False
        sampling = dict(req.sampling)
        if sampling.get("temperature", 0.0) > 0 and sampling.get("seed") is None:
            sampling["seed"] = 0          # sampled races only compare with one shared seed
        for run_id, (strategy, backend, fast) in zip(req.run_ids, req.combos):
            if self.cancel.is_set():
                cancelled = True
                break
            fin, logits = self.run_one(run_id, req.prompt, strategy, backend,
                                       req.max_new_tokens, sampling, req.attention_rows,
                                       keep_logits=True, fast=fast, flash_tile=req.flash_tile)
            row = dict(strategy=strategy, backend=backend, fast=fast,
                       reason=fin.reason if fin else "error",
                       tokens=tuple(fin.tokens) if fin else (), text=fin.text if fin else "",
                       ttft_s=float("nan"), tpot_s=float("nan"), tokens_per_s=float("nan"),
                       peak_memory_bytes=0, kv_bytes=0, same_tokens=None, max_logit_delta=None,
                       error=fin.error if fin else "no result")
            m = getattr(fin, "metrics", None)
            if m is not None:
                row.update(ttft_s=m.ttft_s, tpot_s=m.tpot_s, tokens_per_s=m.decode_tokens_per_s,
                           peak_memory_bytes=m.peak_memory_bytes, kv_bytes=m.kv_bytes)
            if fin is not None and fin.reason == "cancelled":
                cancelled = True
            if row["error"] is None and not cancelled:
                if ref_tokens is None:
                    ref_tokens, ref_logits = row["tokens"], logits
                else:
                    row["same_tokens"] = row["tokens"] == ref_tokens
                    n = min(len(logits), len(ref_logits))
                    if n:
                        row["max_logit_delta"] = float(max(
                            np.abs(np.asarray(a, dtype=np.float32) -
                                   np.asarray(b, dtype=np.float32)).max()
                            for a, b in zip(logits[:n], ref_logits[:n])))
            rows.append(row)
            if cancelled:
                break
        self.send(("race", dict(race_id=req.race_id, prompt=req.prompt, rows=rows,
                                cancelled=cancelled)))


# ---------------------------------------------------------------------- the child process
def child_main(spec, device, dtype, commands, results, cancel, log_path: str | None) -> None:
    """Entry point of the spawned engine process."""
    # The child shares the terminal with the app: anything it prints (a warning, a stray
    # traceback) would scribble over the UI. Its stdout/stderr go to a log file instead.
    # Ctrl+C belongs to the app (Textual reads it as a key); the engine stops when told to.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    target = log_path or os.devnull
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    except OSError:
        fd = os.open(os.devnull, os.O_WRONLY)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = os.fdopen(1, "w", buffering=1)
    sys.stderr = os.fdopen(2, "w", buffering=1)

    def send(item: tuple) -> None:
        results.put(item)

    try:
        from engine.decoding import generate
        from engine.fast.threads import apply_threads, threads_beside
        from engine.loader import load_model
    except BaseException as exc:         # noqa: BLE001
        send(("load_failed", user_message(exc)))
        return
    # One core stays with the app: the engine's OpenMP barriers must not wait for a thread the
    # app's repaint has displaced (docs/ui.md measured what that costs).
    apply_threads(threads_beside(1))
    from engine.fast import STEPS
    loop = EngineLoop(send, cancel, generate)
    loop.steps = STEPS
    loop.load(lambda progress: load_model(spec, device, dtype, progress=progress))
    try:
        loop.serve(commands.get)
    except (KeyboardInterrupt, EOFError, OSError):
        pass

