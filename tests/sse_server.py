"""A local OpenAI-style HTTP server for the remote-run tests: GET lists one model, POST records
the request body and hands the handler to `respond`, which answers (SSE events, an error…).
Real sockets, real HTTP: what engine/remote.py reads is what a server would send."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class SSEServer:
    def __init__(self, respond, model: str = "m"):
        server = self
        self.bodies: list[dict] = []

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                self.send(200, {"object": "list", "data": [{"id": model}]})

            def do_POST(self):
                server.bodies.append(json.loads(self.rfile.read(
                    int(self.headers["Content-Length"]))))
                respond(self)

            def send(self, code: int, body: dict):
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def start_stream(self):
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()

            def event(self, data):
                """One SSE event: a dict as JSON, a string as it is ("[DONE]")."""
                text = data if isinstance(data, str) else json.dumps(data)
                self.wfile.write(f"data: {text}\n\n".encode())
                self.wfile.flush()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @property
    def body(self) -> dict:
        """The last request's body."""
        return self.bodies[-1]

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


class Scripted(SSEServer):
    """An OpenAI-style /v1/completions that streams `tokens` ((id or None, text) pairs), one a
    chunk, with or without logprobs; `stall` holds the stream open after the first chunk."""

    def __init__(self, tokens, logprobs=True, ids=True, stall: threading.Event | None = None):
        def respond(h):
            h.start_stream()
            for k, (tid, text) in enumerate(tokens):
                lp = {"tokens": [text], "token_logprobs": [-0.1]}
                if ids:
                    lp["token_ids"] = [tid]
                h.event({"choices": [{"index": 0, "text": text, "finish_reason": None,
                                      "logprobs": lp if logprobs else None}]})
                if stall is not None and k == 0:
                    stall.wait(30)
                    return
            h.event({"choices": [{"index": 0, "text": "", "finish_reason": "length"}],
                     "timings": {"prompt_n": 2, "prompt_ms": 1.5,
                                 "predicted_n": len(tokens), "predicted_ms": 4.0}})
            h.event("[DONE]")
        super().__init__(respond, model="scripted")
