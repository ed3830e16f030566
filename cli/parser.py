"""The whole command line as one argparse parser: every command and its flags.

Building it imports neither torch nor Textual (a replay, `watch` and the app's own process start
without torch); each command's module is imported when that command runs.
"""

from __future__ import annotations

import argparse

from engine.player import SPEEDS

from . import batch, bench
from .flags import add_generation_args, add_look_args, add_model_args, add_ui_args

EXIT_CODES = """exit status:
  0    done
  1    the run failed: a damaged or inconsistent model file, out of memory, an unexpected
       error (one line; --debug or MINILLM_DEBUG=1 prints the traceback too)
  2    a usage error: a bad flag value, a model path that does not exist, an unsupported model
  130  interrupted (Ctrl+C); what was produced so far is kept"""


def build_parser() -> argparse.ArgumentParser:
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

    bench.add_parser(sub)
    batch.add_parser(sub)
    from serve import cli as serve_cli       # imports no torch either
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
