"""`python main.py batch --prompts FILE`: many requests served together by the batching engine
(engine/batch.py), from a file with one prompt a line.

    stdout   each request's prompt and completion as it finishes (with --json: one JSON object
             per event, the BatchSummary last)
    stderr   a live status line on a terminal, then the summary table

Every file the user names may be empty, huge, not UTF-8 or not a file at all: each ends with one
line that says what to do, before the model is loaded. Ctrl+C cancels what is still running and
reports everything that finished (exit status 130).
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import time

from engine.config import ConfigError, GenerationConfig
from engine.workload import BUILTIN_PROMPTS, arrival_times, read_prompts, request_config

from .flags import add_model_args, add_sampling_args, sampling_config

EXIT_USAGE, EXIT_INTERRUPTED = 2, 130
BATCH_RUN = 1                      # the run id of `batch --json`'s envelopes


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "batch", help="serve many prompts at once (continuous batching on the paged KV pool)",
        description="Continuous batching: every prompt of FILE is a request; requests share one "
                    "paged KV pool (with prefix caching) and one forward pass per step.")
    p.add_argument("--prompts", default=None, metavar="FILE",
                   help="a UTF-8 text file, one prompt a line (blank lines are skipped; - reads "
                        "standard input); default: 16 built-in questions sharing one system "
                        "prompt (engine/workload.py)")
    add_model_args(p)
    g = p.add_argument_group("generation (each request)")
    g.add_argument("--max-new-tokens", type=int, default=50)
    add_sampling_args(g, helps={"seed": "request i samples with seed SEED + i (its own "
                                        "generator)"})
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--backend", default="sdpa",
                   help="attention backend: sdpa (the PyTorch path), triton (CUDA), naive, flash")
    s = p.add_argument_group("scheduler")
    s.add_argument("--max-batch", type=int, default=8, help="requests running at once")
    s.add_argument("--max-step-tokens", type=int, default=512,
                   help="tokens one forward may take: decode rows + prompt chunks")
    s.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    s.add_argument("--num-blocks", type=int, default=None,
                   help="KV blocks in the pool (default: a contiguous reservation's worth for "
                        "--max-batch of the longest request)")
    s.add_argument("--no-prefix-caching", action="store_true",
                   help="do not share the blocks of identical prefixes")
    s.add_argument("--arrival-rate", type=float, default=None, metavar="PER_S",
                   help="requests arrive at random (Poisson) at this mean rate per second "
                        "(default: all at once)")
    s.add_argument("--arrival-seed", type=int, default=0)
    s.add_argument("--threads", type=int, default=None, help="CPU threads (default: PyTorch's)")
    s.add_argument("--plain-weights", action="store_true",
                   help="multiply by the model's own weights (F.linear) instead of a fused copy "
                        "packed for few-row products (float32 on the CPU: faster batches, "
                        "one more copy of the projections in memory; docs/batching.md)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object per line, in the recording format: a header, "
                        "then every event in its envelope, the summary last (`replay` plays "
                        "it)")
    return p


def request_configs(a: argparse.Namespace, n: int) -> list[GenerationConfig]:
    """One GenerationConfig per request (validated): the same flags, seed + i each
    (engine/workload.py, as the session's batches)."""
    base = GenerationConfig(max_new_tokens=a.max_new_tokens, sampling=sampling_config(a),
                            block_size=a.block_size, stop=tuple(a.stop), attention_rows=False)
    return [request_config(base, i) for i in range(n)]


# ----------------------------------------------------------------------------- the command
def cmd_batch(a: argparse.Namespace) -> int:
    from engine.attention import get_backend
    from engine.batch import BatchEngine, serve
    from engine.loader import load_model
    from engine.scheduler import SchedulerConfig

    prompts = (read_prompts(a.prompts) if a.prompts is not None else    # every user mistake
               list(enumerate(BUILTIN_PROMPTS, 1)))                        # fails before loading
    configs = request_configs(a, len(prompts))
    if a.arrival_rate is not None and not (a.arrival_rate > 0 and math.isfinite(a.arrival_rate)):
        raise ConfigError(f"--arrival-rate must be a positive number of requests per second, "
                          f"got {a.arrival_rate}")
    if a.threads is not None and a.threads < 1:
        raise ConfigError(f"--threads must be ≥ 1, got {a.threads}")
    SchedulerConfig(max_batch=a.max_batch, max_step_tokens=a.max_step_tokens,
                    block_size=a.block_size, num_blocks=a.num_blocks or 1)   # validates
    if a.threads:
        import torch
        torch.set_num_threads(a.threads)
    lm = load_model(a.model, a.device, a.dtype)
    backend = get_backend(a.backend, lm.model.device)
    ids = [lm.tokenizer.encode(p) for _, p in prompts]
    longest = max(len(i) for i in ids) + a.max_new_tokens
    blocks = a.num_blocks or a.max_batch * -(-longest // a.block_size)
    cfg = SchedulerConfig(max_batch=a.max_batch, max_step_tokens=a.max_step_tokens,
                          block_size=a.block_size, num_blocks=blocks,
                          prefix_caching=not a.no_prefix_caching)
    engine = BatchEngine(lm.model, lm.tokenizer, cfg, backend=backend, model_name=lm.name,
                         packed=not a.plain_weights)
    for (line, _), request_ids, gcfg in zip(prompts, ids, configs):
        try:
            engine.check_request(request_ids, gcfg)
        except ConfigError as exc:
            raise ConfigError(f"line {line}: {exc}") from None
    times = arrival_times(len(prompts), a.arrival_rate, a.arrival_seed)
    requests = [(t, p, c) for t, (_, p), c in zip(times, prompts, configs)]
    show = Display(sys.stdout, sys.stderr, [line for line, _ in prompts], a.json,
                   live=sys.stderr.isatty() and not a.json)
    if a.json:
        show.start(json_header(a, lm))
    interrupted = False
    try:
        for ev in serve(engine, requests):
            show(ev)
    except KeyboardInterrupt:
        interrupted = True
        engine.cancel_all()
        for ev in engine.drain():
            show(ev)
        show(engine.summary(interrupted=True))
    show.close()
    if not a.json:
        summary_table(engine, show.summary, [line for line, _ in prompts], sys.stderr)
    return EXIT_INTERRUPTED if interrupted else 0


def json_header(a: argparse.Namespace, lm) -> dict:
    """The first line of `batch --json`: a recording's header (engine/recording.py), so the
    output is a recording `replay` plays."""
    from engine.recording import header
    settings = {"batch": {k: getattr(a, k) for k in (
        "prompts", "max_new_tokens", "temperature", "seed", "backend", "max_batch",
        "max_step_tokens", "block_size", "num_blocks", "arrival_rate", "arrival_seed")}}
    settings["batch"]["prefix_caching"] = not a.no_prefix_caching
    head = header(settings, None, "batch")
    head.update(model=lm.name, device=str(lm.model.device),
                dtype=str(lm.model.dtype).removeprefix("torch."))
    return head


class Display:
    """Turns events into output: JSON lines (envelopes of batch 1, after a recording header),
    or completions on stdout and a status line."""

    def __init__(self, out, err, lines: list[int], as_json: bool, live: bool):
        self.out, self.err, self.lines, self.as_json, self.live = out, err, lines, as_json, live
        self.prompts: dict[int, str] = {}
        self.summary = None
        self.done = self.tokens = 0
        self.status = ""
        self._last_draw = 0.0
        self.recorder = None

    def start(self, header_line: dict) -> None:
        from engine.recording import Recorder
        self.recorder = Recorder(self.out, header_line)

    def __call__(self, ev) -> None:
        from engine import events as be
        if isinstance(ev, be.BatchSummary):
            self.summary = ev
        if self.as_json:
            self.recorder.write([be.Envelope(BATCH_RUN, time.monotonic(), ev)])
            return
        if isinstance(ev, be.RequestArrived):
            self.prompts[ev.request] = ev.prompt
        elif isinstance(ev, be.RequestToken):
            self.tokens += 1
        elif isinstance(ev, be.RequestFinished):
            self.done += 1
            self._clear()
            what = ev.error if ev.reason == "error" else f"{len(ev.tokens)} tokens, {ev.reason}"
            self.out.write(f"=== request {ev.request} (line {self.lines[ev.request]}): {what}\n"
                           f"{self.prompts.get(ev.request, '')}{ev.text}{ev.tail}\n\n")
            self.out.flush()
        elif isinstance(ev, be.PoolSnapshot) and self.live:
            shared = sum(1 for r in ev.ref_counts if r > 1)
            self.status = (f"step {ev.step} · running {ev.running} · waiting {ev.waiting} · "
                           f"done {self.done}/{len(self.lines)} · blocks {ev.blocks_used}/"
                           f"{ev.blocks_total} ({shared} shared) · {self.tokens} tokens · "
                           f"preempted {ev.preemptions}")
            now = time.monotonic()
            if now - self._last_draw > 0.1:           # ≤ 10 redraws a second
                self._last_draw = now
                width = shutil.get_terminal_size().columns - 1    # one row, or \r cannot
                self.err.write("\r\033[K" + self.status[:width])   # redraw it
                self.err.flush()

    def _clear(self) -> None:
        if self.live and self.status:
            self.err.write("\r\033[K")
            self.err.flush()

    def close(self) -> None:
        self._clear()


def summary_table(engine, s, lines: list[int], err) -> None:
    """The run's figures on stderr, then a row per request (the first 20)."""
    def ms(x):
        return "—" if x is None else (f"{x:.2f} s" if x >= 1 else f"{x * 1e3:.0f} ms")

    def num(x, fmt="{:.1f}"):
        return "—" if x is None else fmt.format(x)

    def pct(x):
        return "—" if x is None else f"{100 * x:.0f}%"

    if s is None:
        return
    head = f"{s.requests} requests · {s.finished} finished"
    if s.cancelled:
        head += f" · {s.cancelled} cancelled"
    if s.failed:
        head += f" · {s.failed} failed"
    ratio = s.peak_contiguous_blocks / s.peak_blocks_used if s.peak_blocks_used else None
    rows = [
        ("interrupted" if s.interrupted else "done",
         f"{head} · {s.new_tokens} new tokens in {ms(s.wall_s)} · {s.steps} steps"),
        ("throughput", f"{num(s.tokens_per_s)} tok/s overall · decode {num(s.decode_tokens_per_s)}"
                       f" tok/s"),
        ("TTFT", f"p50 {ms(s.ttft_p50_s)} · p99 {ms(s.ttft_p99_s)}  (from arrival)"),
        ("TPOT", f"p50 {ms(s.tpot_p50_s)} · p99 {ms(s.tpot_p99_s)}"),
        ("KV blocks", f"peak {s.peak_blocks_used} of {s.blocks_total} blocks of {s.block_size} "
                      f"tokens in use · a contiguous cache per request would have reserved "
                      f"{s.peak_contiguous_blocks}" + (f" ({ratio:.1f}×)" if ratio else "")),
        ("prefix cache", f"hit rate {pct(s.prefix_hit_rate)} · preemptions {s.preemptions}"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        err.write(f"{k:<{width}}  {v}\n")
    seqs = list(engine.sequences.values())
    err.write(f"\n{'req':>4} {'line':>5} {'prompt':>6} {'cached':>6} {'new':>4} {'TTFT':>8} "
              f"{'TPOT':>8} {'pre':>3}  end\n")
    for seq in seqs[:20]:
        m = engine.results.get(seq.id)
        err.write(f"{seq.id:>4} {lines[seq.id]:>5} {len(seq.prompt):>6} {seq.cached_tokens:>6} "
                  f"{len(seq.generated):>4} {ms(m.ttft_s if m else None):>8} "
                  f"{ms(m.tpot_s if m and m.new_tokens > 1 else None):>8} "
                  f"{seq.preemptions:>3}  {seq.finish_reason or '—'}\n")
    if len(seqs) > 20:
        err.write(f"… and {len(seqs) - 20} more (--json has every request)\n")
    err.flush()
