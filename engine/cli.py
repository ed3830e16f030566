"""The command line: argparse → config dataclasses → run / bench / the app.

User mistakes (a bad flag value, a missing file, an unknown backend) end with one line on stderr
and exit status 2; Ctrl+C ends with status 130 and whatever was produced so far kept on screen.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

from .config import (DTYPES, FAST_WEIGHTS, KERNELS, LAYOUTS, STRATEGIES, ConfigError,
                     FastPathConfig, GenerationConfig, SamplingConfig)

EXIT_USAGE, EXIT_RUNTIME, EXIT_INTERRUPTED = 2, 1, 130


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Flags shared by run, bench and the app."""
    p.add_argument("--model", default=None,
                   help="a .gguf file, a Hugging Face folder, or a hub id "
                        "(default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda")
    p.add_argument("--dtype", default="float32", help=f"one of: {', '.join(DTYPES)}")


def add_generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--strategy", default="kv", help=f"one of: {', '.join(STRATEGIES)}")
    p.add_argument("--backend", default="sdpa", help="attention backend: naive, sdpa, flash, triton")
    p.add_argument("--max-new-tokens", type=int, default=50)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--min-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--block-size", type=int, default=16, help="tokens per paged-cache block")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    add_fast_args(p)


def add_fast_args(p: argparse.ArgumentParser) -> None:
    """Fast-path options (engine/fast/, docs/fast_path.md); the defaults change nothing."""
    g = p.add_argument_group("fast path")
    g.add_argument("--fuse", action="store_true", help="one matmul for Q/K/V and for gate/up")
    g.add_argument("--layout", default="rows", help=f"weight layout: {', '.join(LAYOUTS)}")
    g.add_argument("--weights", default="same", help=f"one of: {', '.join(FAST_WEIGHTS)}")
    g.add_argument("--kernel", default="torch", choices=KERNELS,
                   help="torch: the PyTorch model steps; c: the whole decode step in C (CPU, "
                        "Llama/Qwen2, float32 or --weights int8)")
    g.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    g.add_argument("--cuda-graphs", action="store_true", help="replay the decode step (CUDA)")
    g.add_argument("--threads", type=int, default=None, help="CPU threads (default: PyTorch's)")


def fast_config(a: argparse.Namespace) -> FastPathConfig:
    return FastPathConfig(fuse=getattr(a, "fuse", False), layout=getattr(a, "layout", "rows"),
                          weights=getattr(a, "weights", "same"),
                          compile=getattr(a, "compile", False),
                          cuda_graphs=getattr(a, "cuda_graphs", False),
                          threads=getattr(a, "threads", None),
                          kernel=getattr(a, "kernel", "torch"))


def generation_config(a: argparse.Namespace, **overrides) -> GenerationConfig:
    sampling = SamplingConfig(temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                              min_p=a.min_p, repetition_penalty=a.repetition_penalty, seed=a.seed)
    kw = dict(strategy=a.strategy, backend=a.backend, max_new_tokens=a.max_new_tokens,
              sampling=sampling, block_size=a.block_size, stop=tuple(a.stop), fast=fast_config(a))
    kw.update(overrides)
    return GenerationConfig(**kw)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="minillm", description="A small, readable LLM inference engine with a terminal UI.")
    sub = parser.add_subparsers(dest="command")

    run = sub.add_parser("run", help="generate a completion and stream it to stdout")
    run.add_argument("prompt", help="the text to continue")
    add_model_args(run)
    add_generation_args(run)
    run.add_argument("--json", action="store_true",
                     help="print one JSON object per line: each token, then a summary")

    try:
        from . import bench
        bench.add_parser(sub)
    except ImportError:
        pass
    from . import batch_cli
    batch_cli.add_parser(sub)

    ui = sub.add_parser("ui", help="start the Textual app (the default)")
    add_ui_args(ui)
    return parser


def add_ui_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--strategy", default="kv", help=f"one of: {', '.join(STRATEGIES)}")
    p.add_argument("--backend", default="sdpa", help="attention backend")
    p.add_argument("--prompt", default="Deep learning is", help="initial prompt")
    p.add_argument("--max-new-tokens", type=int, default=50)
    p.add_argument("--theme", default="dark", help="dark, light or projector")
    p.add_argument("--truecolor", action="store_true",
                   help="force 24-bit colour (COLORTERM is often lost over SSH)")
    p.add_argument("--fast", default="", metavar="OPTS",
                   help="fast-path options for the runs, words joined by + as in the bench: "
                        "c, fuse+cols, c+int8, int8, fp16 (default: the plain model; "
                        "`f` cycles them in the app)")
    p.add_argument("--flash-tile", type=int, default=16, metavar="KEYS",
                   help="keys per tile of the flash backend in the app (default 16, so that a "
                        "short run shows several tiles; the bench and `run` use 64)")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        parser = build_parser()
        if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
            argv = ["ui", *argv]           # no sub-command: the app
        args = parser.parse_args(argv)
        if args.command == "run":
            return cmd_run(args)
        if args.command == "bench":
            from . import bench
            return bench.cmd_bench(args)
        if args.command == "batch":
            from .batch_cli import cmd_batch
            return cmd_batch(args)
        if args.command == "ui":
            return cmd_ui(args)
        parser.print_help()
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except MemoryError:
        print("error: out of memory: try a shorter prompt, fewer new tokens, a smaller dtype "
              "(--dtype bfloat16) or another device", file=sys.stderr)
        return EXIT_RUNTIME
    except (ConfigError, OSError, ValueError, RuntimeError) as exc:
        print(f"error: {user_message(exc)}", file=sys.stderr)
        return EXIT_USAGE if isinstance(exc, (ConfigError, FileNotFoundError)) else EXIT_RUNTIME


def user_message(exc: BaseException) -> str:
    """One line, whatever the exception."""
    if type(exc).__name__ == "OutOfMemoryError":     # torch.cuda.OutOfMemoryError
        return ("CUDA out of memory: try a shorter prompt, fewer new tokens, --dtype bfloat16, "
                "or --device cpu")
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def cmd_ui(args) -> int:
    try:
        from tui.app import run_app
    except ImportError as exc:
        print(f"error: the app needs textual and plotext ({exc}); "
              f"`python main.py run PROMPT` works without them", file=sys.stderr)
        return EXIT_RUNTIME
    return run_app(args)


def _progress_printer(enabled: bool):
    """A one-line progress display on stderr while the model converts or loads."""
    last = [""]

    def show(message: str, fraction: float) -> None:
        if not enabled:
            return
        bar = "█" * int(fraction * 20)
        line = f"\r{message:<32} [{bar:<20}] {fraction * 100:3.0f}%"
        if line != last[0]:
            sys.stderr.write(line)
            sys.stderr.flush()
            last[0] = line
        if fraction >= 1.0:
            sys.stderr.write("\r" + " " * len(line) + "\r")
            sys.stderr.flush()
    return show


def cmd_run(args) -> int:
    from .decoding import generate
    from .events import Finished, Token
    from .loader import load_model

    cfg = generation_config(args, attention_rows=False)   # validate flags before loading
    lm = load_model(args.model, args.device, args.dtype,
                    progress=_progress_printer(sys.stderr.isatty()))
    out = sys.stdout
    for ev in generate(lm.model, lm.tokenizer, args.prompt, cfg):
        if isinstance(ev, Token):
            if args.json:
                out.write(json.dumps({"type": "token", "id": ev.id, "text": ev.text,
                                      "position": ev.position,
                                      "latency_ms": round(ev.latency_s * 1e3, 3)}) + "\n")
            else:
                out.write(ev.text)
            out.flush()
        elif isinstance(ev, Finished):
            m, fast = ev.metrics, cfg.fast.spec()
            if args.json:
                out.write(json.dumps({
                    "type": "summary", "reason": ev.reason, "tokens": list(ev.tokens),
                    "text": ev.text, "prompt_tokens": m.prompt_tokens,
                    "ttft_ms": _ms(m.ttft_s), "tpot_ms": _ms(m.tpot_s),
                    "tokens_per_s": _num(m.decode_tokens_per_s),
                    "prefill_tokens_per_s": _num(m.prefill_tokens_per_s),
                    "itl_p50_ms": _ms(m.itl_p50_s), "itl_p99_ms": _ms(m.itl_p99_s),
                    "peak_memory_bytes": m.peak_memory_bytes, "kv_bytes": m.kv_bytes,
                    "strategy": cfg.strategy, "backend": cfg.backend,
                    "fast": fast, "model": lm.name, "device": str(lm.model.device),
                    "dtype": args.dtype}) + "\n")
            else:
                out.write(ev.tail + "\n")
                print(f"[{m.new_tokens} tokens · TTFT {m.ttft_s * 1e3:.0f} ms · "
                      f"TPOT {_fmt(m.tpot_s * 1e3)} ms · {_fmt(m.decode_tokens_per_s)} tok/s · "
                      f"{cfg.strategy}/{cfg.backend}{' +' + fast if fast else ''} · "
                      f"{ev.reason}]", file=sys.stderr)
    return 0


def _num(x: float):
    return None if x is None or math.isnan(x) else round(x, 3)


def _ms(x: float):
    return None if x is None or math.isnan(x) else round(x * 1e3, 3)


def _fmt(x: float) -> str:
    return "—" if math.isnan(x) else f"{x:.1f}"
