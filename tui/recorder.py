"""The app's record switch (`r`, `--record FILE`): what arrives from the engine, into a file.

Armed before the model is ready, it starts with the `ready` envelope (a recording must say
which model made it); each batch of envelopes is written as it arrives; a write that fails
stops the recording and says why. The file is engine/recording.py's format, which
`python main.py replay FILE` plays.
"""

from __future__ import annotations

import time
from typing import Callable

from engine.config import ConfigError
from engine.events import Envelope
from engine.recording import Recorder, header


class RecordSwitch:
    """Start, feed and stop one recording at a time. `say(text, severity)` tells the user."""

    def __init__(self, say: Callable[..., None], path: str | None = None) -> None:
        self.say = say
        self.path = path                       # --record FILE: every recording goes there
        self.armed: str | None = path          # start once the model is ready
        self.recorder: Recorder | None = None

    @property
    def on(self) -> bool:
        return self.recorder is not None

    def toggle(self, settings: dict, ready: Envelope | None) -> None:
        """`r`: stop if recording (or armed), else start — now, or once the model is ready."""
        if self.recorder is not None or (self.armed and ready is None):
            self.stop()
            return
        path = self.path or time.strftime("minillm-%Y%m%d-%H%M%S.jsonl.gz")
        if ready is None:
            self.armed = path
            self.say(f"recording to {path} once the model is ready")
            return
        self.start(path, settings, ready)

    def ready(self, settings: dict, ready: Envelope) -> None:
        """The model is ready: an armed recording starts now."""
        if self.armed:
            self.start(self.armed, settings, ready)

    def start(self, path: str, settings: dict, ready: Envelope) -> None:
        self.armed = None
        try:
            self.recorder = Recorder(path, header(settings, ready.event, "app"))
            self.recorder.write([ready])
        except (OSError, ConfigError) as exc:
            self.recorder = None
            self.say(f"cannot record to {path}: {exc}", severity="error")
            return
        self.say(f"recording to {path} (r stops)")

    def write(self, envelopes) -> None:
        if self.recorder is None:
            return
        try:
            self.recorder.write(envelopes)
        except OSError as exc:
            self.say(f"recording stopped: {exc}", severity="error")
            self.stop(quiet=True)

    def stop(self, quiet: bool = False) -> None:
        self.armed = None
        if self.recorder is None:
            return
        rec, self.recorder = self.recorder, None
        try:
            rec.close()
        except OSError:
            pass
        if not quiet:
            self.say(f"recorded {rec.events} events to {rec.path}; "
                     f"`python main.py replay {rec.path}` plays them")
