"""`python main.py serve`: the engine behind an OpenAI-compatible HTTP API.

    python main.py serve                               the embedded model on 127.0.0.1:8000
    python main.py serve --model m.gguf --port 0       any free port (the line on stderr says
                                                       which: "serving … at http://…/v1")

Every flag is checked before the model loads; a mistake is one line and exit status 2 (a port
already in use too). The request fields a client leaves out take the flags' values
(--temperature, --top-p, --max-new-tokens, …); --temperature defaults to 1 as in OpenAI's API.
Ctrl+C (or SIGTERM) stops the server: requests in flight are cancelled, exit status 0.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import math
import os
import signal
import sys
from pathlib import Path

from engine.config import ConfigError, FastPathConfig

API_KEY_ENV = "MINILLM_API_KEY"
EMBEDDED_ID = "SmolLM2-135M-Instruct"
DEFAULT_POOL_TOKENS = 1024     # per batch slot, when --num-blocks is not given


def add_parser(subparsers) -> argparse.ArgumentParser:
    from cli.flags import add_generation_args, add_model_args
    p = subparsers.add_parser(
        "serve", help="an OpenAI-compatible HTTP server on the engine (continuous batching)",
        description="Serve the model over OpenAI's HTTP API: /v1/completions, "
                    "/v1/chat/completions, /v1/models, /metrics (Prometheus), /health. "
                    "Requests are batched continuously on the paged KV pool. docs/serve.md "
                    "lists the fields and the metrics.")
    n = p.add_argument_group("network")
    n.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 "
                        "opens it to the network)")
    n.add_argument("--port", type=int, default=8000, help="TCP port (0: any free port)")
    n.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on /v1/ (default: ${API_KEY_ENV} "
                        f"if set, else no key)")
    n.add_argument("--served-model-name", default=None, metavar="NAME",
                   help="the model id clients send (default: the model file's or folder's name)")
    n.add_argument("--chat-template", default=None, metavar="FILE",
                   help="a Jinja chat template to use instead of the model's own")
    add_model_args(p)
    # What a request leaves out takes these flags' values, said as serve means them.
    add_generation_args(p, helps={
        "temperature": "for requests that set none (default 1, as in OpenAI's API; 0 = greedy)",
        "max_new_tokens": "for requests without max_tokens (default 256, or what the context "
                          "leaves)",
        "strategy": "paged (the batching engine's KV pool; the only one)"})
    p.set_defaults(strategy="paged", temperature=1.0, max_new_tokens=256)
    s = p.add_argument_group("scheduler")
    s.add_argument("--max-batch", type=int, default=8, help="requests running at once")
    s.add_argument("--max-step-tokens", type=int, default=512,
                   help="tokens one forward may take: decode rows + prompt chunks")
    s.add_argument("--num-blocks", type=int, default=None,
                   help=f"KV blocks in the pool (default: {DEFAULT_POOL_TOKENS} tokens per batch "
                        f"slot, or the context if shorter)")
    s.add_argument("--no-prefix-caching", action="store_true",
                   help="do not share the blocks of identical prefixes")
    return p


def check_flags(a: argparse.Namespace):
    """Every flag, before anything loads. Returns (defaults, scheduler limits, api key)."""
    from cli.flags import generation_config
    from engine.scheduler import SchedulerConfig
    if a.strategy != "paged":
        raise ConfigError(f"serve batches requests on the paged KV pool (--strategy paged); "
                          f"--strategy {a.strategy} runs one request at a time: use `run` for it")
    defaults = generation_config(a, attention_rows=False)
    if defaults.fast != FastPathConfig(threads=defaults.fast.threads):
        raise ConfigError("serve runs the batching engine on the plain PyTorch model; fast-path "
                          f"options ({defaults.fast.spec()}) decode one sequence at a time "
                          f"(docs/batching.md: why the C step is not batched)")
    from engine.attention import backend_names
    if a.backend not in backend_names():
        raise ConfigError(f"unknown attention backend {a.backend!r}; choose one of: "
                          f"{', '.join(backend_names())}")
    if a.threads is not None and a.threads < 1:
        raise ConfigError(f"--threads must be ≥ 1, got {a.threads}")
    if not 0 <= a.port <= 65535:
        raise ConfigError(f"--port must be from 0 to 65535, got {a.port}")
    SchedulerConfig(max_batch=a.max_batch, max_step_tokens=a.max_step_tokens,
                    block_size=a.block_size, num_blocks=a.num_blocks or 1)    # validates
    key = a.api_key if a.api_key is not None else os.environ.get(API_KEY_ENV) or None
    return defaults, key


def loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def served_name(spec: str | None) -> str:
    if spec is None:
        return EMBEDDED_ID
    path = Path(spec).expanduser()
    if path.exists():
        return path.stem if path.is_file() else path.resolve().name
    return spec                                      # a hub id, as vLLM names it


def read_template(path: str | None, lm) -> str | None:
    from engine.files import UntrustedPath, read_regular
    from engine.loader.chat_template import LIMIT, chat_template
    if path is None:
        return chat_template(lm.source)
    try:
        return read_regular(path, LIMIT).decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"chat template not found: {path}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 text: save the template as UTF-8") from None
    except (UntrustedPath, OSError) as exc:
        raise ConfigError(f"cannot read the chat template {path}: {exc}") from None


def cmd_serve(a: argparse.Namespace) -> int:
    from cli.terminal import progress_printer
    from engine.batch import BatchEngine
    from engine.loader import load_model
    from engine.scheduler import SchedulerConfig

    from .app import ServerState
    from .chat import ChatTemplate
    from .metrics import ServerMetrics
    from .worker import EngineWorker

    defaults, key = check_flags(a)
    if a.chat_template is not None and not Path(a.chat_template).is_file():
        raise ConfigError(f"chat template not found: {a.chat_template}")
    if a.threads:
        import torch
        torch.set_num_threads(a.threads)
    lm = load_model(a.model, a.device, a.dtype, progress=progress_printer(sys.stderr.isatty()))
    tok = lm.tokenizer
    template = read_template(a.chat_template, lm)

    def token_text(i):
        return tok.backend.id_to_token(i) or "" if i is not None else ""

    chat = ChatTemplate(template, token_text(tok.bos_token_id),
                        token_text(tok.eos_token_ids[0] if tok.eos_token_ids else None)) \
        if template else None
    context = lm.config.max_seq_len
    blocks = a.num_blocks or a.max_batch * math.ceil(min(context, DEFAULT_POOL_TOKENS)
                                                     / a.block_size)
    cfg = SchedulerConfig(max_batch=a.max_batch, max_step_tokens=a.max_step_tokens,
                          block_size=a.block_size, num_blocks=blocks,
                          prefix_caching=not a.no_prefix_caching)
    engine = BatchEngine(lm.model, tok, cfg, backend=a.backend, snapshots=False,
                         model_name=lm.name)
    model_id = a.served_model_name or served_name(a.model)
    metrics = ServerMetrics(model_id)
    worker = EngineWorker(engine, metrics)
    state = ServerState(model_id=model_id, tokenizer=tok, model=lm.model, engine=engine,
                        worker=worker, metrics=metrics, defaults=defaults, chat=chat,
                        api_key=key)
    pool_mb = blocks * engine.runner.bytes_per_block / 2**20
    worker.start()
    try:
        asyncio.run(_serve(state, a.host, a.port,
                           f"{blocks} KV blocks of {a.block_size} tokens ({pool_mb:.0f} MiB), "
                           f"batch ≤ {a.max_batch}, chat template: "
                           f"{'yes' if chat else 'none (completions only)'}"))
    finally:
        worker.stop()
    return 0


async def _serve(state, host: str, port: int, about: str) -> None:
    from aiohttp import web

    from .app import create_app
    runner = web.AppRunner(create_app(state), handler_cancellation=True, access_log=None,
                           shutdown_timeout=1.0)
    await runner.setup()
    try:
        try:
            await web.TCPSite(runner, host, port).start()
        except OSError as exc:
            raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc} — pick "
                              f"another --port (0: any free one)") from None
        bound = runner.addresses[0][1] if runner.addresses else port
        shown = f"[{host}]" if ":" in host else host
        say = lambda line: print(line, file=sys.stderr, flush=True)   # noqa: E731
        if not loopback(host):
            say(f"WARNING: listening on {host}: anyone who can reach this machine can use the "
                f"model{'' if state.api_key else ' — and no --api-key is set'}. Use --host "
                f"127.0.0.1 to serve this machine only.")
        say(f"{state.model_id}: {about}")
        say(f"serving {state.model_id} at http://{shown}:{bound}/v1 (OpenAI-compatible; "
            f"/metrics, /health) — Ctrl+C stops")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        running = int(state.metrics.running.values[None] + state.metrics.waiting.values[None])
        say(f"stopping{f': cancelling {running} requests' if running else ''}")
    finally:
        await runner.cleanup()
