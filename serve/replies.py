"""One request's answer, built from the engine's events into OpenAI's JSON.

`Reply` takes a request's events as they come (RequestArrived … RequestToken* …
RequestFinished) and keeps what the answer needs: the text, the token ids, the logprobs, and the
server-side `timings`. It also holds back text that might be the start of a stop string: OpenAI's
answer never contains the stop string, so while "###" is a stop, a generated "#" cannot be sent
until the next characters show it is not one.

    timings (llama-server's names; engine/metrics.py's definitions; milliseconds)
        prompt_n               prompt tokens computed (not found in the prefix cache)
        cache_n                prompt tokens found in the prefix cache
        prompt_ms              admission → first token: the prompt's forward (its chunks)
        prompt_per_token_ms    prompt_ms / prompt_n           prompt_per_second  its inverse
        predicted_n            tokens generated
        predicted_ms           first token → last token: the n − 1 decode steps
        predicted_per_token_ms predicted_ms / (n − 1) = TPOT  predicted_per_second  1 / TPOT
        queue_ms               arrival → admission (waiting for a batch slot and KV blocks)
        ttft_ms                arrival → first token (the server's TTFT, queueing included)
        token_ms               each token's latency: the first from arrival, then the gaps

llama-server counts its first token in predicted_*; here it belongs to the prompt's step (as in
engine/metrics.py, where TPOT is over the tokens after the first).
"""

from __future__ import annotations

import time
import uuid

from engine import events as be

FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length", "cancelled": "abort"}


class Reply:
    def __init__(self, kind: str, model: str, prompt_tokens: int, config, tokenizer):
        self.kind, self.model, self.config, self.tokenizer = kind, model, config, tokenizer
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.prompt_tokens = prompt_tokens
        self.text = ""                      # everything generated (stop string included)
        self.sent = 0                       # characters of it already handed out
        self.cut: int | None = None         # where a stop string begins
        self.hold = max((len(s) for s in config.stop), default=1) - 1
        self.tokens: list[int] = []
        self.entries: list[tuple] = []      # per token: (id, logprob, top) when asked
        self.latencies: list[float] = []
        self.arrival = self.admitted = self.first = self.last = None
        self.cached = 0
        self.reason: str | None = None
        self.error: str | None = None

    @property
    def done(self) -> bool:
        return self.reason is not None

    # ------------------------------------------------------------------ events in
    def take(self, events: list) -> tuple[str, list[tuple]]:
        """Absorb a batch of events; return the text that may be sent now and the logprob
        entries of the tokens in this batch."""
        entries = []
        for ev in events:
            if isinstance(ev, be.RequestArrived):
                self.arrival = ev.time_s
            elif isinstance(ev, be.RequestAdmitted):
                self.admitted, self.cached = ev.time_s, ev.cached_tokens
            elif isinstance(ev, be.RequestToken):
                self.tokens.append(ev.id)
                self.latencies.append(ev.latency_s)
                self.first = ev.time_s if self.first is None else self.first
                self.last = ev.time_s
                self.text += ev.text
                if self.config.logprobs is not None:
                    entries.append((ev.id, ev.logprob, ev.top_logprobs))
            elif isinstance(ev, be.RequestFinished):
                self.text += ev.tail
                self.reason, self.error = ev.reason, ev.error
        self.entries += entries
        return self._release(), entries

    def _release(self) -> str:
        """Text up to where a stop string begins, or could still begin."""
        if self.cut is None and self.config.stop:
            starts = [i for s in self.config.stop
                      if (i := self.text.find(s, max(0, self.sent - self.hold))) >= 0]
            self.cut = min(starts) if starts else None
        end = self.cut if self.cut is not None else (
            len(self.text) if self.done else len(self.text) - self.hold)
        if end <= self.sent:
            return ""
        piece, self.sent = self.text[self.sent:end], end
        return piece

    @property
    def answer(self) -> str:
        return self.text[:self.cut] if self.cut is not None else self.text

    @property
    def finish_reason(self) -> str:
        return FINISH_REASONS.get(self.reason, self.reason or "abort")

    # ------------------------------------------------------------------ JSON out
    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": len(self.tokens),
                "total_tokens": self.prompt_tokens + len(self.tokens),
                "prompt_tokens_details": {"cached_tokens": self.cached}}

    def timings(self) -> dict:
        ms = 1000.0
        n = len(self.tokens)
        prompt_n = self.prompt_tokens - self.cached
        t = {"prompt_n": prompt_n, "cache_n": self.cached, "predicted_n": n}
        if self.first is not None and self.admitted is not None:
            prompt_ms = (self.first - self.admitted) * ms
            t.update(prompt_ms=prompt_ms,
                     prompt_per_token_ms=prompt_ms / prompt_n if prompt_n else None,
                     prompt_per_second=prompt_n / prompt_ms * ms if prompt_ms > 0 else None)
        if n > 1:
            predicted_ms = (self.last - self.first) * ms
            t.update(predicted_ms=predicted_ms, predicted_per_token_ms=predicted_ms / (n - 1),
                     predicted_per_second=(n - 1) / predicted_ms * ms if predicted_ms > 0
                     else None)
        elif n:
            t.update(predicted_ms=0.0)
        if self.admitted is not None and self.arrival is not None:
            t["queue_ms"] = (self.admitted - self.arrival) * ms
        if self.first is not None and self.arrival is not None:
            t["ttft_ms"] = (self.first - self.arrival) * ms
        t["token_ms"] = [x * ms for x in self.latencies]
        return t

    def _piece(self, token: int) -> str:
        return self.tokenizer.backend.decode([token], skip_special_tokens=False)

    def logprobs(self, entries: list[tuple], offset: int = 0):
        """OpenAI's logprobs object for these tokens (None when not asked for)."""
        if self.config.logprobs is None:
            return None
        if self.kind == "chat":
            def one(tid, lp):
                s = self._piece(tid)
                return {"token": s, "logprob": lp, "bytes": list(s.encode()), "id": tid}
            return {"content": [dict(one(tid, lp), top_logprobs=[one(i, p) for i, p in top])
                                for tid, lp, top in entries]}
        pieces = [self._piece(tid) for tid, _, _ in entries]
        offsets, at = [], offset
        for p in pieces:
            offsets.append(at)
            at += len(p)
        return {"tokens": pieces, "token_logprobs": [lp for _, lp, _ in entries],
                "top_logprobs": [{self._piece(i): p for i, p in top} for _, _, top in entries],
                "text_offset": offsets, "token_ids": [tid for tid, _, _ in entries]}

    def chunk(self, text: str | None, entries: list[tuple], finish: bool = False,
              role: bool = False, usage: bool = False) -> dict:
        """One streamed chunk: new text (chat: a delta), its logprobs, the end."""
        choice: dict = {"index": 0}
        if self.kind == "chat":
            delta = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            choice["delta"] = delta
        else:
            choice["text"] = text or ""
        choice["logprobs"] = self.logprobs(entries) if entries else None
        choice["finish_reason"] = self.finish_reason if finish else None
        out = {"id": self.id, "object": self._object(chunk=True), "created": self.created,
               "model": self.model, "choices": [choice]}
        if usage:
            out["usage"] = self.usage()
        if finish:
            out["timings"] = self.timings()
        return out

    def usage_chunk(self) -> dict:
        return {"id": self.id, "object": self._object(chunk=True), "created": self.created,
                "model": self.model, "choices": [], "usage": self.usage()}

    def whole(self) -> dict:
        """The non-streamed response."""
        choice: dict = {"index": 0}
        if self.kind == "chat":
            choice["message"] = {"role": "assistant", "content": self.answer}
        else:
            choice["text"] = self.answer
        choice["logprobs"] = self.logprobs(self.entries)
        choice["finish_reason"] = self.finish_reason
        return {"id": self.id, "object": self._object(chunk=False), "created": self.created,
                "model": self.model, "choices": [choice], "usage": self.usage(),
                "timings": self.timings()}

    def _object(self, chunk: bool) -> str:
        if self.kind == "chat":
            return "chat.completion.chunk" if chunk else "chat.completion"
        return "text_completion"
