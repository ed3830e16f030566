"""`serve`: the engine behind an OpenAI-compatible HTTP API (docs/serve.md).

One role per file, read in this order:

    cli.py       the `serve` command: flags, load the model, start the engine thread and HTTP
    app.py       aiohttp routes: /v1/completions, /v1/chat/completions, /v1/models, /metrics,
                 /health; body limit, API key, OpenAI-style errors, streaming (SSE)
    schema.py    request bodies → GenerationConfig, every field checked
    chat.py      messages → prompt through the model's chat template, in Jinja's sandbox
    worker.py    the engine thread: one BatchEngine, tickets in, each request's events out
    replies.py   a request's events → OpenAI's JSON (text, logprobs, usage, timings)
    metrics.py   Prometheus text under vLLM's metric names

engine/ never imports this package: the server is one more consumer of the engine's events.
"""
