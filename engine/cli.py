"""The command line: argparse → config dataclasses → run / bench / replay / the app.

User mistakes (a bad flag value, a missing file, an unknown backend) end with one line on stderr
and exit status 2; Ctrl+C ends with status 130 and whatever was produced so far kept on screen.
Every other failure, expected or not, is one line too (`main` catches everything; --debug or
MINILLM_DEBUG=1 adds the traceback) and exit status 1.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import traceback

from .config import (DTYPES, FAST_WEIGHTS, KERNELS, LAYOUTS, STRATEGIES, ConfigError,
                     FastPathConfig, GenerationConfig, SamplingConfig)
from .player import SPEEDS
from .recording import Recorder, RecordingError, header, read_recording

EXIT_USAGE, EXIT_RUNTIME, EXIT_INTERRUPTED = 2, 1, 130
EXIT_CODES = """exit status:
  0    done
  1    the run failed: a damaged or inconsistent model file, out of memory, an unexpected
       error (one line; --debug or MINILLM_DEBUG=1 prints the traceback too)
  2    a usage error: a bad flag value, a model path that does not exist, an unsupported model
  130  interrupted (Ctrl+C); what was produced so far is kept"""


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
    g.add_argument("--weights", default="same",
                   help=f"one of: {', '.join(FAST_WEIGHTS)} (gguf: a GGUF model's own quantised "
                        f"blocks, memory-mapped — the float32 model's tokens at 4-bit traffic)")
    g.add_argument("--kernel", default="torch", choices=KERNELS,
                   help="torch: the PyTorch model steps; c: the whole decode step in C (CPU, "
                        "Llama/Qwen2, float32, --weights int8 or --weights gguf)")
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


def build_parser(with_bench: bool = True) -> argparse.ArgumentParser:
    """with_bench=False leaves out `bench`, whose flags come from a package that imports torch
    (a replay must start without it)."""
    parser = argparse.ArgumentParser(
        prog="minillm", description="A small, readable LLM inference engine with a terminal UI.",
        epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true",
                        help="print the full traceback of an error (anywhere on the command "
                             "line; or set MINILLM_DEBUG=1)")
    sub = parser.add_subparsers(dest="command")

    run = sub.add_parser("run", help="generate a completion and stream it to stdout")
    run.add_argument("prompt", help="the text to continue")
    add_model_args(run)
    add_generation_args(run)
    run.add_argument("--json", action="store_true",
                     help="print the run's events as JSON lines (docs/events.md): a header, "
                          "then every event — the same lines --record writes")
    run.add_argument("--record", default=None, metavar="FILE",
                     help="also write the events, with every layer's attention rows, to FILE "
                          "(.gz compresses); `replay FILE` plays it without the model")
    remote = run.add_argument_group("a remote server (docs/serve.md)")
    remote.add_argument("--endpoint", default=None, metavar="URL",
                        help="stream from an OpenAI-compatible server instead of a local model: "
                             "`serve`, vLLM, llama-server … (e.g. http://127.0.0.1:8000/v1; "
                             "API key from $MINILLM_API_KEY or $OPENAI_API_KEY)")
    remote.add_argument("--endpoint-model", default=None, metavar="NAME",
                        help="the server's model id (default: the one it lists)")

    if with_bench:
        try:
            from . import bench
            bench.add_parser(sub)
        except ImportError:
            pass
    from . import batch_cli          # (imports no torch: a replay still starts without it)
    batch_cli.add_parser(sub)
    from serve import cli as serve_cli   # the command line sits above engine/ and serve/
    serve_cli.add_parser(sub)

    replay = sub.add_parser("replay", help="play a recording in the app, without the model",
                            description="Open the app on a recording (run --record, or `r` in "
                                        "the app): space pauses, ← → step one token, − + "
                                        "change the speed, home/end jump. Needs neither torch "
                                        "nor the model.")
    replay.add_argument("file", help="a recording (.jsonl or .jsonl.gz)")
    replay.add_argument("--speed", type=float, default=1.0, choices=SPEEDS,
                        help="playback speed (default 1: the recorded pace)")
    replay.add_argument("--paused", action="store_true", help="start paused at the beginning")
    add_look_args(replay)

    watch = sub.add_parser("watch", help="follow a session shared with --share, read-only",
                           description="Open the app on a session another app shares with "
                                       "--share: every pane as the presenter's, and your own "
                                       "layer, head, view and zoom. Needs neither torch nor "
                                       "the model.")
    watch.add_argument("url", help="the sharer's address, e.g. http://127.0.0.1:8765")
    add_look_args(watch)

    web = sub.add_parser("web", help="serve the app to browsers (textual-serve)",
                         description="Serve the app on a web page: each browser tab runs its "
                                     "own app. Anything after the options is passed to the "
                                     "app: `web -- --theme projector`, `web -- replay FILE`, "
                                     "`web -- watch URL`.")
    web.add_argument("--host", default="localhost",
                     help="interface to listen on (default localhost: this machine only)")
    web.add_argument("--port", type=int, default=8000)
    web.add_argument("--public-url", default=None,
                     help="the address browsers use, when it differs (a proxy, a tunnel)")
    web.add_argument("app_args", nargs=argparse.REMAINDER, help="the app's own arguments")

    ui = sub.add_parser("ui", help="start the Textual app (the default)")
    add_ui_args(ui)
    for command in sub.choices.values():
        command.epilog = "exit status: 0 done, 1 failed, 2 usage error, 130 interrupted " \
                         "(minillm --help says more)"
    return parser


def add_look_args(p: argparse.ArgumentParser) -> None:
    """How the app looks and where its screenshots go (the app, replay, watch)."""
    p.add_argument("--theme", default="dark", help="dark, light or projector")
    p.add_argument("--truecolor", action="store_true",
                   help="force 24-bit colour (COLORTERM is often lost over SSH)")
    p.add_argument("--shots", default=None, metavar="DIR",
                   help="where `S` saves SVG screenshots (default: screenshots/ in the cache "
                        "folder, $MINILLM_CACHE or ~/.cache/minillm)")


def add_ui_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--strategy", default="kv", help=f"one of: {', '.join(STRATEGIES)}")
    p.add_argument("--backend", default="sdpa", help="attention backend")
    p.add_argument("--prompt", default="Deep learning is", help="initial prompt")
    p.add_argument("--max-new-tokens", type=int, default=50)
    add_look_args(p)
    p.add_argument("--share", nargs="?", const="127.0.0.1:8765", default=None,
                   metavar="HOST:PORT",
                   help="let others follow this session read-only with `watch URL` "
                        "(default 127.0.0.1:8765: this machine only; 0.0.0.0:PORT for every "
                        "network)")
    p.add_argument("--fast", default="", metavar="OPTS",
                   help="fast-path options for the runs, words joined by + as in the bench: "
                        "c, c+gguf, gguf, fuse+cols, c+int8, int8, fp16 (default: the plain "
                        "model; `f` cycles them in the app)")
    p.add_argument("--flash-tile", type=int, default=16, metavar="KEYS",
                   help="keys per tile of the flash backend in the app (default 16, so that a "
                        "short run shows several tiles; the bench and `run` use 64)")
    p.add_argument("--record", default=None, metavar="FILE",
                   help="record every run and race to FILE (.gz compresses) from the moment "
                        "the model is ready; `r` starts and stops recording in the app")
    p.add_argument("--endpoint", default=None, metavar="URL",
                   help="an OpenAI-compatible server (`serve`, vLLM, llama-server …) that joins "
                        "every race as a remote lane, e.g. http://127.0.0.1:8000/v1 (API key "
                        "from $MINILLM_API_KEY or $OPENAI_API_KEY; docs/serve.md)")
    p.add_argument("--endpoint-model", default=None, metavar="NAME",
                   help="the server's model id (default: the one it lists)")
    p.add_argument("--prompts", default=None, metavar="FILE",
                   help="the requests `B` serves at once in the server view, one prompt a line "
                        "(default: 16 built-in questions sharing one system prompt)")


def main(argv: list[str] | None = None) -> int:
    """Parse, dispatch, and turn every way of failing into one line and an exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    # --debug may come anywhere (before a "--" that ends the options), for every sub-command.
    cut = argv.index("--") if "--" in argv else len(argv)
    debug = "--debug" in argv[:cut] or os.environ.get("MINILLM_DEBUG", "") not in ("", "0")
    argv = [a for a in argv[:cut] if a != "--debug"] + argv[cut:]
    _reopen_closed_std_streams()
    try:
        return dispatch(argv)
    except KeyboardInterrupt:
        _say("\ninterrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:             # `run … | head`: the reader left; nothing to say to it
        _discard_stdout()
        return EXIT_RUNTIME
    except MemoryError:
        _debug_trace(debug)
        _say("error: out of memory: try a shorter prompt, fewer new tokens, a smaller dtype "
             "(--dtype bfloat16) or another device")
        return EXIT_RUNTIME
    except Exception as exc:            # noqa: BLE001 — the one catch-all, by design
        _debug_trace(debug)
        _say(f"error: {describe(exc, debug)}")
        return exit_code(exc)


def dispatch(argv: list[str]) -> int:
    parser = build_parser(with_bench=argv[:1] not in (["replay"], ["watch"], ["web"]))
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
    if args.command == "serve":
        from serve.cli import cmd_serve
        return cmd_serve(args)
    if args.command == "ui":
        return cmd_ui(args)
    if args.command == "replay":
        return cmd_replay(args)
    if args.command in ("watch", "web"):
        return cmd_app(args.command, args)
    parser.print_help()
    return EXIT_USAGE


def exit_code(exc: BaseException) -> int:
    """2 when the user must change the command (ConfigError, a missing file, ModelNotFound's
    `user_error`), 1 for everything that went wrong while running."""
    if isinstance(exc, (ConfigError, FileNotFoundError)) or getattr(exc, "user_error", False):
        return EXIT_USAGE
    return EXIT_RUNTIME


def describe(exc: BaseException, debug: bool = False) -> str:
    """One line. Errors raised for the user (ConfigError, ModelLoadError, a file that cannot be
    opened) say everything already; anything else also gets its type and where it happened."""
    message = user_message(exc)
    if isinstance(exc, (ConfigError, OSError)) or type(exc).__name__ in (
            "ModelLoadError", "ModelNotFound", "OutOfMemoryError", "RemoteError"):
        return message
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" ({os.path.relpath(frames[-1].filename)}:{frames[-1].lineno})" if frames else ""
    hint = "" if debug else "; --debug shows the traceback"
    return f"unexpected {type(exc).__name__}: {message}{where}{hint}"


def user_message(exc: BaseException) -> str:
    """One line, whatever the exception."""
    if type(exc).__name__ == "OutOfMemoryError":     # torch.cuda.OutOfMemoryError
        return ("CUDA out of memory: try a shorter prompt, fewer new tokens, --dtype bfloat16, "
                "or --device cpu")
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _say(line: str) -> None:
    try:
        print(line, file=sys.stderr, flush=True)
    except (OSError, ValueError, AttributeError):   # stderr closed too: nothing more to do
        pass


def _debug_trace(debug: bool) -> None:
    if debug:
        try:
            traceback.print_exc()
        except (OSError, ValueError, AttributeError):
            pass


def _discard_stdout() -> None:
    """After a broken pipe, point stdout at /dev/null so the interpreter's final flush of what
    is still buffered does not print an "Exception ignored" message."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


def _reopen_closed_std_streams() -> None:
    """Started with stdout (or stdin, stderr) closed (`cmd >&-`)? Put /dev/null there: else the
    next file opened would take descriptor 1 and anything printed would land in it."""
    for fd, name, mode in ((0, "stdin", "r"), (1, "stdout", "w"), (2, "stderr", "w")):
        try:
            os.fstat(fd)
        except OSError:
            if os.open(os.devnull, os.O_RDWR) != fd:     # takes the lowest free descriptor
                continue
            if getattr(sys, name) is None:
                setattr(sys, name, open(fd, mode, closefd=False))


def cmd_ui(args) -> int:
    return cmd_app("ui", args)


def cmd_app(command: str, args) -> int:
    """The app (ui), following a shared session (watch), or served to browsers (web)."""
    try:
        from tui import launch
    except ImportError as exc:
        print(f"error: the app needs textual and plotext ({exc}); "
              f"`python main.py run PROMPT` works without them", file=sys.stderr)
        return EXIT_RUNTIME
    return {"ui": launch.run_app, "watch": launch.run_watch, "web": launch.run_web}[command](args)


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
    """Stream the completion (or, with --json, the events) to stdout; --record writes the
    events to a file too. Both writers are engine.recording.Recorder: one format."""
    import time

    from .events import Envelope, Finished, Token
    from .requests import RunRequest
    from .session import Session

    # Validate flags before loading; a recording keeps every layer's attention rows.
    cfg = generation_config(args, attention_rows=bool(args.record))
    if args.endpoint or args.endpoint_model:
        ready, runs, label = remote_run(args, cfg)
    else:
        session = Session.load(args.model, args.device, args.dtype,
                               progress=_progress_printer(sys.stderr.isatty()),
                               weights="gguf" if cfg.fast.weights == "gguf" else "same")
        ready = session.ready(probe=False)
        runs = session.run(RunRequest(args.prompt, cfg), raise_errors=True)
        fast = cfg.fast.spec()
        label = f"{cfg.strategy}/{cfg.backend}{' +' + fast if fast else ''}"
    settings = {"prompt": args.prompt, "config": cfg.to_dict()}
    writers = []
    try:
        if args.record:
            writers.append(Recorder(args.record, header(settings, ready, "run")))
        if args.json:
            writers.append(Recorder(sys.stdout, header(settings, ready, "run")))
        first = Envelope(0, time.monotonic(), ready)
        for w in writers:
            w.write([first])
        out = sys.stdout
        for env in runs:
            for w in writers:
                w.write([env])
            ev = env.event
            if isinstance(ev, Finished) and ev.reason == "error":   # a remote run's end
                from .remote import RemoteError
                raise RemoteError(ev.error or "the server failed")
            if args.json:
                continue
            if isinstance(ev, Token):
                out.write(ev.text)
                out.flush()
            elif isinstance(ev, Finished):
                out.write(ev.tail + "\n")
                print(stats_line(ev, label), file=sys.stderr)
    except BaseException:
        for w in writers:                 # a run that never started leaves no recording
            w.close()
            if w.path is not None and w.events <= 1:
                os.remove(w.path)
        raise
    for w in writers:
        w.close()
    if args.record:
        print(f"recorded {writers[0].events} events to {args.record}; "
              f"`python main.py replay {args.record}` plays them", file=sys.stderr)
    return 0


def stats_line(ev, label: str) -> str:
    """The figures under a run's text; a remote run's server figures beside the client's."""
    m = ev.metrics
    if m is None:
        return f"[0 tokens · {label} · {ev.reason}]"
    line = (f"[{m.new_tokens} tokens · TTFT {m.ttft_s * 1e3:.0f} ms · TPOT {_fmt(m.tpot_s * 1e3)}"
            f" ms · {_fmt(m.decode_tokens_per_s)} tok/s · {label} · {ev.reason}]")
    s, t = ev.server_metrics, ev.server_timings
    if s is not None:
        line += (f"\n[server: TTFT {s.ttft_s * 1e3:.0f} ms · TPOT {_fmt(s.tpot_s * 1e3)} ms · "
                 f"{_fmt(s.decode_tokens_per_s)} tok/s — the client's TTFT is "
                 f"{(m.ttft_s - s.ttft_s) * 1e3:.0f} ms more: network and HTTP]")
    elif "predicted_ms" in t:
        line += (f"\n[server: prompt {t.get('prompt_n', 0):.0f} tokens in "
                 f"{t.get('prompt_ms', 0):.0f} ms · {t.get('predicted_n', 0):.0f} tokens in "
                 f"{t['predicted_ms']:.0f} ms]")
    return line


def remote_run(args, cfg: GenerationConfig):
    """`run --endpoint`: (Ready, the run's envelopes, its label) from a remote server."""
    import time

    from .config import FastPathConfig
    from .events import Envelope, Ready
    from .remote import Endpoint, stream_events
    from .requests import RunRequest
    if not args.endpoint:
        raise ConfigError("--endpoint-model needs --endpoint URL")
    local = [flag for flag, changed in (
        ("--model", args.model is not None), ("--device", args.device != "auto"),
        ("--dtype", args.dtype != "float32"), ("--strategy", args.strategy != "kv"),
        ("--backend", args.backend != "sdpa"), ("--block-size", args.block_size != 16),
        ("fast-path options", cfg.fast != FastPathConfig()), ("--record", bool(args.record)))
        if changed]
    if local:
        raise ConfigError(f"{', '.join(local)} choose how this machine runs a model; with "
                          f"--endpoint the server runs it (--endpoint-model picks its model)")
    endpoint = Endpoint.resolve(args.endpoint, args.endpoint_model)
    ready = Ready(model=endpoint.model, device=endpoint.base, dtype="", n_layers=0, n_heads=0,
                  n_kv_heads=0, head_dim=0, max_seq_len=0)
    runs = (Envelope(1, time.monotonic(), ev)
            for ev in stream_events(endpoint, RunRequest(args.prompt, cfg)))
    return ready, runs, f"remote {endpoint.model}"


def cmd_replay(args) -> int:
    """The app on a recording. Imports neither torch nor the model."""
    try:
        recording = read_recording(args.file)
    except RecordingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        from tui.launch import run_replay
    except ImportError as exc:
        print(f"error: replay needs textual and plotext ({exc})", file=sys.stderr)
        return EXIT_RUNTIME
    return run_replay(recording, args)


def _fmt(x: float) -> str:
    return "—" if math.isnan(x) else f"{x:.1f}"
