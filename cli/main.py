"""`python main.py …`: parse, dispatch, and turn every way of failing into one line.

User mistakes (a bad flag value, a missing file, an unknown backend) end with one line on stderr
and exit status 2; Ctrl+C ends with status 130 and whatever was produced so far kept on screen.
Every other failure, expected or not, is one line too (`main` catches everything; --debug or
MINILLM_DEBUG=1 adds the traceback) and exit status 1.
"""

from __future__ import annotations

import os
import sys
import traceback

from engine.config import ConfigError
from engine.recording import RecordingError, read_recording

from .parser import build_parser
from .terminal import discard_stdout, print_traceback, reopen_closed_std_streams, say

EXIT_USAGE, EXIT_RUNTIME, EXIT_INTERRUPTED = 2, 1, 130


def main(argv: list[str] | None = None) -> int:
    """Parse, dispatch, and turn every way of failing into one line and an exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    # --debug may come anywhere (before a "--" that ends the options), for every sub-command.
    cut = argv.index("--") if "--" in argv else len(argv)
    debug = "--debug" in argv[:cut] or os.environ.get("MINILLM_DEBUG", "") not in ("", "0")
    argv = [a for a in argv[:cut] if a != "--debug"] + argv[cut:]
    reopen_closed_std_streams()
    try:
        return dispatch(argv)
    except KeyboardInterrupt:
        say("\ninterrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:             # `run … | head`: the reader left; nothing to say to it
        discard_stdout()
        return EXIT_RUNTIME
    except MemoryError:
        print_traceback(debug)
        say("error: out of memory: try a shorter prompt, fewer new tokens, a smaller dtype "
            "(--dtype bfloat16) or another device")
        return EXIT_RUNTIME
    except Exception as exc:            # noqa: BLE001 — the one catch-all, by design
        print_traceback(debug)
        say(f"error: {describe(exc, debug)}")
        return exit_code(exc)


def dispatch(argv: list[str]) -> int:
    parser = build_parser()
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["ui", *argv]           # no sub-command: the app
    args = parser.parse_args(argv)
    if args.command == "run":
        from .run import cmd_run
        return cmd_run(args)
    if args.command == "bench":
        from .bench import cmd_bench
        return cmd_bench(args)
    if args.command == "batch":
        from .batch import cmd_batch
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


# ----------------------------------------------------------------------------- the app
def cmd_ui(args) -> int:
    return cmd_app("ui", args)


def cmd_app(command: str, args) -> int:
    """The app (ui), following a shared session (watch), or served to browsers (web)."""
    try:
        from tui import launch
    except ImportError as exc:
        if not _missing_ui_package(exc):
            raise                       # a bug inside the app, not a missing package
        print(f"error: the app needs textual and plotext ({exc}); "
              f"`python main.py run PROMPT` works without them", file=sys.stderr)
        return EXIT_RUNTIME
    return {"ui": launch.run_app, "watch": launch.run_watch, "web": launch.run_web}[command](args)


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
        if not _missing_ui_package(exc):
            raise
        print(f"error: replay needs textual and plotext ({exc})", file=sys.stderr)
        return EXIT_RUNTIME
    return run_replay(recording, args)


def _missing_ui_package(exc: ImportError) -> bool:
    """True when the ImportError is an app dependency that is not installed."""
    return (exc.name or "").split(".")[0] in ("textual", "textual_plotext", "plotext", "rich")
