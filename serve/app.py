"""The HTTP side: aiohttp routes in OpenAI's shape, in front of the engine thread.

    GET  /health                 200 {"status": "ok"} while the engine thread runs, else 503
    GET  /metrics                Prometheus text (serve/metrics.py)
    GET  /v1/models              the one model served
    POST /v1/completions         a prompt (text or token ids) → its continuation
    POST /v1/chat/completions    messages → the model's chat template → the assistant's answer

A request's life: read the body (at most MAX_BODY bytes) → check every field (serve/schema.py)
→ the prompt's tokens (chat: through the template, serve/chat.py) → the engine's own length and
pool checks → a ticket to the engine thread (serve/worker.py) → events → OpenAI JSON
(serve/replies.py), streamed as server-sent events or sent whole. Every refusal is OpenAI's JSON
error shape with a 4xx status; a client that goes away (the connection closes) cancels its
request: the handler is cancelled (aiohttp's handler_cancellation) and the engine frees the
request's slot and KV blocks at the next step boundary.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import sys
import time
from dataclasses import dataclass, field

from aiohttp import web

from engine.config import ConfigError, GenerationConfig
from engine.decoding import check_lengths

from .chat import ChatTemplate
from .metrics import ServerMetrics
from .replies import Reply
from .schema import APIError, Parsed, bad_request, config_error, parse_chat, parse_completion
from .worker import EngineWorker

MAX_BODY = 4 << 20          # bytes of a request body: ~1 M tokens of text, far past any context
WHITESPACE = "the prompt is only whitespace: type some text to continue"   # as `run` says it


@dataclass
class ServerState:
    model_id: str
    tokenizer: object
    model: object                       # the Transformer (its config: the context length)
    engine: object                      # BatchEngine: check_request only (sizes, no state)
    worker: EngineWorker
    metrics: ServerMetrics
    defaults: GenerationConfig          # the server's flags: what a request does not set
    chat: ChatTemplate | None = None
    api_key: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))


STATE = web.AppKey("state", ServerState)


# ----------------------------------------------------------------------------- errors, auth
def json_error(err: APIError) -> web.Response:
    return web.json_response(err.body(), status=err.status)


@web.middleware
async def openai_errors(request: web.Request, handler):
    """Every refusal as OpenAI's JSON error; the API key checked for /v1/."""
    state = request.app[STATE]
    try:
        if state.api_key and request.path.startswith("/v1/"):
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {state.api_key}".encode()):
                raise APIError(401, "Incorrect API key provided: send the server's key as "
                                    "'Authorization: Bearer KEY'", code="invalid_api_key")
        return await handler(request)
    except APIError as err:
        return json_error(err)
    except web.HTTPException as exc:       # unknown route, wrong method, …
        if exc.status < 400:
            raise
        return json_error(APIError(exc.status, f"{exc.reason}: {request.method} {request.path}",
                                   code="not_found" if exc.status == 404 else None))
    except (asyncio.CancelledError, ConnectionResetError):
        raise                               # the client left: nothing to answer
    except Exception as exc:                # noqa: BLE001 — a bug: one line here, JSON there
        print(f"serve: internal error on {request.path}: {type(exc).__name__}: {exc}",
              file=sys.stderr, flush=True)
        return json_error(APIError(500, f"internal error: {type(exc).__name__}: {exc}",
                                   type="server_error"))


async def read_json(request: web.Request) -> dict:
    too_large = APIError(413, f"the request body is larger than {MAX_BODY >> 20} MiB",
                         code="request_too_large")
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise too_large
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise too_large from None
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:   # UnicodeDecodeError is a ValueError
        raise bad_request(f"the request body is not valid JSON ({str(exc)[:120]}); send a "
                          f"JSON object with Content-Type: application/json",
                          code="invalid_json") from None


# ----------------------------------------------------------------------------- small routes
async def health(request: web.Request) -> web.Response:
    worker = request.app[STATE].worker
    if worker.alive:
        return web.json_response({"status": "ok"})
    return web.json_response({"status": "error", "error": worker.error or "engine stopped"},
                             status=503)


async def metrics(request: web.Request) -> web.Response:
    text = request.app[STATE].metrics.text()
    return web.Response(text=text, content_type="text/plain", charset="utf-8",
                        headers={"X-Prometheus-Format": "0.0.4"})


async def models(request: web.Request) -> web.Response:
    s = request.app[STATE]
    return web.json_response({"object": "list", "data": [
        {"id": s.model_id, "object": "model", "created": s.created, "owned_by": "minillm",
         "max_model_len": s.model.cfg.max_seq_len}]})


# ----------------------------------------------------------------------------- generation
def prompt_ids(state: ServerState, kind: str, parsed: Parsed) -> list[int]:
    tok = state.tokenizer
    try:
        if kind == "chat":
            if state.chat is None:
                raise bad_request("this model has no chat template: use /v1/completions, or "
                                  "start serve with --chat-template FILE", "messages",
                                  "no_chat_template")
            text = state.chat.render(parsed.messages)
            ids = tok.encode(text)
            bos = tok.bos_token_id
            if tok.add_bos and len(ids) > 1 and ids[0] == ids[1] == bos:
                ids = ids[1:]                  # the template wrote BOS itself
            return ids
        if isinstance(parsed.prompt, str):
            if parsed.prompt and not parsed.prompt.strip():
                raise ConfigError(WHITESPACE)
            return tok.encode(parsed.prompt)
        vocab = state.model.cfg.vocab_size
        bad = next((t for t in parsed.prompt if not 0 <= t < vocab), None)
        if bad is not None:
            raise bad_request(f"token id {bad} is outside the vocabulary (0…{vocab - 1})",
                              "prompt")
        return list(parsed.prompt)
    except ConfigError as exc:
        raise config_error(exc, "messages" if kind == "chat" else "prompt") from None


def fit(state: ServerState, parsed: Parsed, ids: list[int]) -> GenerationConfig:
    """The request's config with its length settled: without max_tokens, the server's default
    or what the context leaves, whichever is less. Then the engine's own checks."""
    config = parsed.config
    param = "messages" if parsed.messages is not None else "prompt"
    try:
        if not parsed.max_tokens_given:
            room = state.model.cfg.max_seq_len - len(ids)
            config = dataclasses.replace(config,
                                         max_new_tokens=max(1, min(config.max_new_tokens, room)))
        check_lengths(state.model, len(ids), config.max_new_tokens)
        state.engine.check_request(ids, config)
    except ConfigError as exc:
        err = config_error(exc, param)
        if "exceeds the model's context" in err.message:
            err.code = "context_length_exceeded"
        raise err from None
    return config


async def completions(request: web.Request) -> web.StreamResponse:
    return await generate(request, "completion")


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await generate(request, "chat")


async def generate(request: web.Request, kind: str) -> web.StreamResponse:
    state = request.app[STATE]
    body = await read_json(request)
    parsed = (parse_chat if kind == "chat" else parse_completion)(body, state.defaults)
    if parsed.model is not None and parsed.model != state.model_id:
        raise APIError(404, f"The model `{parsed.model}` does not exist. This server serves "
                            f"`{state.model_id}` (GET /v1/models).", param="model",
                       code="model_not_found")
    ids = prompt_ids(state, kind, parsed)
    config = fit(state, parsed, ids)
    if not state.worker.alive:
        raise APIError(503, f"the engine stopped: {state.worker.error}", type="server_error")
    reply = Reply(kind, state.model_id, len(ids), config, state.tokenizer)
    ticket = state.worker.submit(ids, config)
    try:
        if parsed.stream:
            return await stream(request, parsed, reply, ticket)
        async for events in ticket:
            reply.take(events)
        if reply.reason == "error":
            raise APIError(500, reply.error or "the engine failed", type="server_error")
        return web.json_response(reply.whole())
    finally:
        state.worker.cancel(ticket)        # the client left, or an error: free it now


async def stream(request, parsed: Parsed, reply: Reply, ticket) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                       "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    await resp.prepare(request)

    async def send(obj) -> None:
        await resp.write(b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n")

    if reply.kind == "chat":              # OpenAI's first chunk: the role, no content yet
        await send(reply.chunk("", [], role=True, usage=parsed.continuous_usage))
    async for events in ticket:
        text, entries = reply.take(events)
        if reply.done:
            if reply.reason == "error":
                await send({"error": {"message": reply.error or "the engine failed",
                                      "type": "server_error", "param": None, "code": None}})
                break
            if text or entries:
                await send(reply.chunk(text, entries, usage=parsed.continuous_usage))
            await send(reply.chunk(None if reply.kind == "chat" else "", [], finish=True,
                                   usage=parsed.continuous_usage))
            if parsed.include_usage:
                await send(reply.usage_chunk())
        elif text or entries:
            await send(reply.chunk(text, entries, usage=parsed.continuous_usage))
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


def create_app(state: ServerState) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY, middlewares=[openai_errors])
    app[STATE] = state
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    return app
