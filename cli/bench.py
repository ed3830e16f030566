"""`python main.py bench`: its flags. The measuring itself is engine/bench/ (docs/benchmarks.md).

The parser is built without importing engine/bench/ (which imports torch), so that every
command — the app's included — starts without torch; the bench is imported when it runs, and
a bench that cannot be imported is an error like any other, never a missing command.
"""

from __future__ import annotations

import argparse

from engine.config import STRATEGIES

from .flags import add_model_args


def _names(text: str) -> tuple[str, ...]:
    return tuple(n.strip() for n in text.split(",") if n.strip())


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "bench", help="measure every strategy × backend against Hugging Face transformers",
        description="The first version's experiment (prompt, 50 new tokens, greedy) for every "
                    "strategy and attention backend, with transformers generate() as the "
                    "baseline in the same run; optional length sweep; bandwidth view.")
    add_model_args(p)
    p.add_argument("--prompt", default=None,
                   help="the prompt (default: the first version's, \"Deep learning is\")")
    p.add_argument("--prompt-file", metavar="FILE", default=None,
                   help="read the prompt from FILE (e.g. engine/bench/long_prompt.txt, ~500 "
                        "tokens, for the long-context experiment with --max-new-tokens 200)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="tokens to generate (default: the first version's 50)")
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
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (without a terminal: no progress lines)")
    p.add_argument("--fast-table", action="store_true",
                   help="instead of every strategy × backend: kv/sdpa and each fast-path "
                        "variant (--fast; default: every one this model can run) beside "
                        "transformers, with the bytes per step, the bandwidth ceiling and the "
                        "setup time (docs/fast_path.md)")
    p.add_argument("--lockstep", action=argparse.BooleanOptionalAction, default=None,
                   help="with --fast-table: also step the variants one token at a time in "
                        "turn (default: off); with --batch: the batch sizes take turns, one "
                        "step each, each timed on its own clock (default: on; --no-lockstep "
                        "runs each size on its own, pass after pass). Fair when the machine's "
                        "load changes from second to second")
    p.add_argument("--startup", action="store_true",
                   help="only time process start → first token and the peak memory of `run` "
                        "with the C step, float32 and GGUF blocks (--repeat fresh processes "
                        "each)")
    p.add_argument("--plain-weights", action="store_true",
                   help="with --batch: the batch engine multiplies by the model's own weights "
                        "(F.linear) at every batch size, instead of its fused copy packed for "
                        "few-row products (docs/batching.md)")
    p.add_argument("--batch", metavar="SIZES", default=None,
                   help="instead of the standard experiment, measure continuous batching at "
                        "these batch sizes, e.g. 1,2,4,8,16: aggregate decode tok/s, TPOT, "
                        "identical tokens; and 8 requests sharing a 200-token system prompt "
                        "with and without prefix caching (docs/batching.md); with --fast, one "
                        "request alone is also timed with those fast paths")
    return p


def cmd_bench(args: argparse.Namespace) -> int:
    """Fill in the standard experiment's prompt and length (engine/bench/ defines them), then
    run the bench. No ImportError is caught here: a bench that cannot load is a failure."""
    from engine import bench
    standard = bench.BenchSettings()
    if args.prompt is None:
        args.prompt = standard.prompt
    if args.max_new_tokens is None:
        args.max_new_tokens = standard.max_new_tokens
    return bench.cmd_bench(args)
