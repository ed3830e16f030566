"""Where a consumer's events come from — one interface for every kind of source.

    source.start(deliver)     begin; the source calls deliver(envelopes, restart) with batches of
                              engine.events.Envelope, oldest first — from its own thread or from
                              the caller's (a replay stepping): the calls come in order, and a
                              consumer must keep that order
    source.stop()             end, and release what it holds (a process, a file, a socket)

`restart=True` means: forget what was delivered so far, the batch is the whole state from the
beginning (a replay stepping back, a viewer attaching to a session mid-stream).

A *live* source has a model behind it and also takes requests:

    source.submit(request)    an engine.requests.RunRequest, RaceRequest or BatchRequest
    source.send_step(command)      an engine.requests.StepCommand for a step-mode run that paused
    source.cancel()           stop the current request at its next token (a paused one at once)

Kinds: tui.bridge.ProcessSource (a session in a child process), tui.fake_engine.FakeSource
(synthetic events through the same transport, for tests), engine.player.Player (a recording,
with pause, step and speed), and later a session on another machine. Consumers never look
behind the interface: they render the envelopes they are given.
"""

from __future__ import annotations

from typing import Callable, Protocol, Sequence

from .events import Envelope

Deliver = Callable[[Sequence[Envelope], bool], None]


class Source(Protocol):
    live: bool                        # does it take requests?

    def start(self, deliver: Deliver) -> None: ...

    def stop(self) -> None: ...


class LiveSource(Source, Protocol):
    def submit(self, request) -> None: ...

    def send_step(self, command) -> None: ...

    def cancel(self) -> None: ...
