"""`python main.py bench`: the seed's experiment for every strategy × backend, the Hugging Face
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

from ..config import STRATEGIES, ConfigError
from .experiment import run_bench, write_json
from .settings import SEED_NEW_TOKENS, SEED_PROMPT, BenchSettings

EXIT_FAILED, EXIT_INTERRUPTED = 1, 130


def _names(text: str) -> tuple[str, ...]:
    return tuple(n.strip() for n in text.split(",") if n.strip())


def add_parser(subparsers) -> argparse.ArgumentParser:
    from ..cli import add_model_args
    p = subparsers.add_parser(
        "bench", help="measure every strategy × backend against Hugging Face transformers",
        description="The seed's experiment (prompt, 50 new tokens, greedy) for every strategy "
                    "and attention backend, with transformers generate() as the baseline in "
                    "the same run; optional length sweep; bandwidth view.")
    add_model_args(p)
    p.add_argument("--prompt", default=SEED_PROMPT)
    p.add_argument("--prompt-file", metavar="FILE", default=None,
                   help="read the prompt from FILE (e.g. engine/bench/long_prompt.txt, ~500 "
                        "tokens, for the long-context experiment with --max-new-tokens 200)")
    p.add_argument("--max-new-tokens", type=int, default=SEED_NEW_TOKENS)
    p.add_argument("--strategies", type=_names, default=STRATEGIES,
                   help=f"comma-separated (default: {','.join(STRATEGIES)})")
    p.add_argument("--backends", type=_names, default=None,
                   help="comma-separated (default: every backend that runs natively here)")
    p.add_argument("--repeat", type=int, default=3, help="timed repetitions (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed passes first (default 1)")
    p.add_argument("--sweep", action="store_true",
                   help="also measure per-step latency against position, as charts")
    p.add_argument("--sweep-max", type=int, default=None,
                   help="longest position swept (default: 384 on CPU, 4096 on CUDA)")
    p.add_argument("--no-baseline", action="store_true", help="skip transformers generate()")
    p.add_argument("--no-bandwidth", action="store_true", help="skip the bandwidth view")
    p.add_argument("--block-size", type=int, default=16, help="tokens per paged-cache block")
    p.add_argument("--fast", action="append", default=[], metavar="OPTS",
                   help="add a kv row with fast-path options joined by +, e.g. fuse+cols, "
                        "fuse+cols+int8, compile (repeatable; see docs/benchmarks.md)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice, one per core)")
    p.add_argument("--quick", action="store_true",
                   help="a reduced run (16 tokens, one repetition) that ends in well under a "
                        "minute on a 2-core CPU")
    p.add_argument("--json", metavar="FILE", default=None,
                   help="also write every figure, the machine and the settings to FILE")
    p.add_argument("--markdown", metavar="FILE", default=None,
                   help="also write the tables as Markdown (as in docs/benchmarks.md)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (without a terminal: no progress lines)")
    p.add_argument("--fast-table", action="store_true",
                   help="instead of every strategy × backend: kv/sdpa and each fast-path "
                        "variant (--fast; default: every one this model can run) beside "
                        "transformers, with the bytes per step, the bandwidth ceiling and the "
                        "setup time (docs/fast_path.md)")
    p.add_argument("--lockstep", action="store_true",
                   help="with --fast-table: also step the variants one token at a time in "
                        "turn (fair when the machine's load changes from second to second)")
    p.add_argument("--startup", action="store_true",
                   help="only time process start → first token and the peak memory of `run` "
                        "with the C step, float32 and GGUF blocks (--repeat fresh processes "
                        "each)")
    p.add_argument("--batch", metavar="SIZES", default=None,
                   help="instead of the standard experiment, measure continuous batching at "
                        "these batch sizes, e.g. 1,2,4,8,16: aggregate decode tok/s, TPOT, "
                        "identical tokens; and 8 requests sharing a 200-token system prompt "
                        "with and without prefix caching (docs/batching.md); with --fast, one "
                        "request alone is also timed with those fast paths")
    return p


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
                         lockstep=getattr(a, "lockstep", False))


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
    mode = "off" if args.no_progress else "bar" if sys.stderr.isatty() else "lines"
    with terminal.progress(mode) as (tick, set_total):
        doc = run_bench(settings, tick, set_total, loaded=loaded)
    terminal.render(doc)
    if args.json:
        write_json(doc, args.json)
        print(f"wrote {args.json}", file=sys.stderr)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown.markdown(doc))
        print(f"wrote {args.markdown}", file=sys.stderr)
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
        backend=(args.backends or ("sdpa",))[0], fast=tuple(args.fast))
    mode = "off" if args.no_progress else "bar" if sys.stderr.isatty() else "lines"
    with terminal.progress(mode) as (tick, set_total):
        doc = batching.bench_document(s, args.model, args.device, args.dtype, args.threads,
                                      tick, set_total, loaded)
    terminal.render_batch(doc)
    if args.json:
        write_json(doc, args.json)
        print(f"wrote {args.json}", file=sys.stderr)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown.batch_markdown(doc))
        print(f"wrote {args.markdown}", file=sys.stderr)
    return EXIT_INTERRUPTED if doc["interrupted"] else 0


__all__ = ["add_parser", "cmd_bench", "run_bench", "BenchSettings"]
