"""`python main.py bench`: the first version's experiment for every strategy × backend, the Hugging Face
baseline in the same run, a length sweep and a bandwidth view. See docs/benchmarks.md.

    settings.py     the flags as a validated dataclass
    runs.py         the standard experiment: rows, interleaved repetitions, the naive reference
    hf_baseline.py  transformers generate(), with and without its cache, timed the same way
    memory.py       peak memory per run (reset before each)
    bandwidth.py    copy bandwidth, bytes per step, matmul-only time, a profile of one step
    sweep.py        per-step latency against position for naive / kv / paged
    attention_curves.py  one attention call's time and peak memory against length, per backend
    fast_paths.py   `--fast-table`: every fast-path variant on kv/sdpa; --lockstep; --startup
    gpu_tables.py   scripts/gpu_check.py's tables on a lent GPU (whole model, fast path, batching)
    batching.py     `--batch`: continuous batching against batch size; prefix sharing
    experiment.py   runs the stages, collects one JSON-ready dictionary, writes the JSON file
    verdicts.py     the headline and the sweep's sentence (what a reader takes away)
    cells.py        the words and numbers in each table cell (engine/units.py's units)
    terminal.py     the progress bar, rich tables and plotext charts
    markdown.py     the same tables as Markdown (docs/benchmarks.md)
"""

from __future__ import annotations

import argparse
import sys

from ..config import ConfigError
from .experiment import run_bench, write_json
from .settings import BenchSettings

EXIT_FAILED, EXIT_INTERRUPTED = 1, 130


def settings_from_args(a: argparse.Namespace) -> BenchSettings:
    prompt = a.prompt
    if getattr(a, "prompt_file", None):
        try:
            prompt = open(a.prompt_file, encoding="utf-8").read()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read the prompt file {a.prompt_file}: "
                              f"{getattr(exc, 'strerror', None) or exc}") from None
    return BenchSettings(model=a.model, device=a.device, dtype=a.dtype, prompt=prompt,
                         max_new_tokens=a.max_new_tokens, strategies=a.strategies,
                         backends=a.backends, repeat=a.repeat, warmup=a.warmup,
                         baseline=not a.no_baseline, sweep=a.sweep, sweep_max=a.sweep_max,
                         bandwidth=not a.no_bandwidth, quick=a.quick, block_size=a.block_size,
                         threads=a.threads, fast=tuple(a.fast),
                         fast_table=getattr(a, "fast_table", False),
                         lockstep=bool(getattr(a, "lockstep", False)))


def cmd_bench(args: argparse.Namespace, loaded=None) -> int:
    from . import markdown, terminal
    if getattr(args, "batch", None):
        return cmd_batch_bench(args, loaded)
    if getattr(args, "startup", False):
        from .fast_paths import startup
        try:
            rows = startup(args.repeat)
        except (RuntimeError, OSError, ValueError) as exc:   # a run that died: one line
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_FAILED
        print(markdown.startup_markdown(rows), end="")
        return 0
    settings = settings_from_args(args)          # a bad flag fails here, before loading
    with terminal.progress(progress_mode(args)) as (tick, set_total):
        doc = run_bench(settings, tick, set_total, loaded=loaded)
    terminal.render(doc)
    write_outputs(doc, args, markdown.markdown)
    if doc["interrupted"]:
        return EXIT_INTERRUPTED
    rows = doc.get("rows") or []
    failed = [r for r in rows if r.get("error")]
    if rows and len(failed) == len(rows):       # nothing was measured: not a success
        print(f"error: every bench row failed (first: {failed[0]['label']}: "
              f"{failed[0]['error']})", file=sys.stderr)
        return EXIT_FAILED
    return 0


def cmd_batch_bench(args: argparse.Namespace, loaded=None) -> int:
    """`bench --batch SIZES` (engine/bench/batching.py)."""
    from . import batching, markdown, terminal
    s = batching.BatchBenchSettings(
        sizes=batching.parse_sizes(args.batch), block_size=args.block_size,
        max_new_tokens=min(args.max_new_tokens, 16) if args.quick else args.max_new_tokens,
        repeat=1 if args.quick else args.repeat, warmup=0 if args.quick else args.warmup,
        backend=(args.backends or ("sdpa",))[0], fast=tuple(args.fast),
        packed=not args.plain_weights, lockstep=args.lockstep is not False)
    with terminal.progress(progress_mode(args)) as (tick, set_total):
        doc = batching.bench_document(s, args.model, args.device, args.dtype, args.threads,
                                      tick, set_total, loaded)
    terminal.render_batch(doc)
    write_outputs(doc, args, markdown.batch_markdown)
    return EXIT_INTERRUPTED if doc["interrupted"] else 0


def progress_mode(args: argparse.Namespace) -> str:
    """A bar in a terminal, plain lines otherwise, nothing with --no-progress."""
    return "off" if args.no_progress else "bar" if sys.stderr.isatty() else "lines"


def write_outputs(doc: dict, args: argparse.Namespace, to_markdown) -> None:
    """--json and --markdown: the document as JSON, its tables as `to_markdown` writes them;
    each file named on stderr."""
    if args.json:
        write_json(doc, args.json)
        print(f"wrote {args.json}", file=sys.stderr)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(to_markdown(doc))
        print(f"wrote {args.markdown}", file=sys.stderr)


__all__ = ["cmd_bench", "run_bench", "BenchSettings"]
