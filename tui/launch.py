"""How the command line starts the app (cli/main.py): live, on a recording, on a shared
session, or served to browsers. Errors are one line on stderr and an exit status."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from .settings import Settings, force_truecolor

ROOT = Path(__file__).resolve().parents[1]


def _error(text: str) -> int:
    print(f"error: {text}", file=sys.stderr)
    return 2


def run_app(args) -> int:
    """`python main.py [ui]`: the app on the model, in an engine process."""
    from .app import MiniLLMApp
    settings = Settings.from_args(args)
    force_truecolor(settings)
    problem = settings.error()
    if problem is None and settings.share is not None:
        from .share import parse_address
        try:
            parse_address(settings.share)
        except ValueError as exc:
            problem = str(exc)
    if problem:
        return _error(problem)
    MiniLLMApp(settings).run()
    return 0


def run_replay(recording, args) -> int:
    """`python main.py replay FILE`: the app on a recording — no engine process, no torch."""
    from engine.player import Player

    from .app import MiniLLMApp
    settings = Settings(theme=args.theme, truecolor=args.truecolor, shots=args.shots)
    settings.take(recording.header)
    force_truecolor(settings)
    MiniLLMApp(settings, source=Player(recording, speed=args.speed,
                                       playing=not args.paused)).run()
    return 0


def run_watch(args) -> int:
    """`python main.py watch URL`: follow a session shared with --share, read-only."""
    from .app import MiniLLMApp
    from .share import WatchSource
    settings = Settings(theme=args.theme, truecolor=args.truecolor, shots=args.shots,
                        prompt="")
    force_truecolor(settings)
    MiniLLMApp(settings, source=WatchSource(args.url)).run()
    return 0


def web_command(app_args: list[str]) -> str:
    """The command textual-serve starts for each browser: this program's app, with its flags."""
    args = list(app_args)
    if args[:1] == ["--"]:
        args = args[1:]
    if not args or args[0] not in ("ui", "replay", "watch"):
        args = ["ui", *args]
    return shlex.join([sys.executable, str(ROOT / "main.py"), *args])


def run_web(args) -> int:
    """`python main.py web [--host H] [--port P] [APP ARGS…]`: the app in a browser (for a
    projector or remote attendees). Each browser tab starts its own app process."""
    try:
        from textual_serve.server import Server
    except ImportError as exc:
        return _error(f"`web` needs textual-serve ({exc}); pip install textual-serve")
    command = web_command(args.app_args)
    print(f"serving `{command}` on http://{args.host}:{args.port} (Ctrl+C stops)",
          file=sys.stderr)
    Server(command, host=args.host, port=args.port, title="Mini LLM",
           public_url=args.public_url).serve()
    return 0
