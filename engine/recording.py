"""Recordings: a session's events as JSON lines, written live and played back without a model.

    {"type": "header", "v": 1, "format": "minillm-recording", "time": …, "model": …, …}
    {"type": "ready", "v": 1, "run": 0, "t": 812.61, "model": …}          ← Envelope.to_json()
    {"type": "started", "v": 1, "run": 1, "t": 815.02, "strategy": "kv", …}
    …

The first line says what was recorded (schema version, model, device, dtype, settings, package
versions, wall-clock time); every other line is one envelope, exactly as `run --json` prints it
and as the app's engine process sends it. A name ending in `.gz` is gzip-compressed.

`read_recording` trusts nothing: a file that is not a recording, or of another schema version,
is a `RecordingError` (one line); a damaged stretch later on — a truncated last line, a line
that is not JSON or not an event, a line over `MAX_LINE` bytes, time running backwards, a run's
events out of order — ends the recording there, and `Recording.notice` says where and why, so
a replay can play everything before the damage. engine/player.py plays a recording. Neither
imports torch or NumPy.
"""

from __future__ import annotations

import datetime as _dt
import gzip
import io
import json
import os
import platform
import zlib
from dataclasses import dataclass, field
from importlib import metadata
from typing import IO, Iterable

from .events import (SCHEMA_VERSION, STEP_EVENTS, AttentionRow, BatchStarted, BatchSummary,
                     CacheSnapshot, Envelope, Failed, Finished, FlashTiles, Loading, Prefill,
                     RaceFinished, RaceStarted, Ready, Started, Token)

FORMAT = "minillm-recording"
MAX_LINE = 64 * 2**20        # one event line; the largest real one (an attention row) is < 1 MiB
MAX_EVENTS = 2_000_000       # ~ a 40 000-token race: more is a file we should not hold in memory
PACKAGES = ("minillm", "torch", "transformers", "textual", "numpy", "gguf")


class RecordingError(ValueError):
    """The file cannot be replayed at all; the message is one line for the user."""


# --------------------------------------------------------------------------- writing
def header(settings: dict | None = None, ready: Ready | None = None, command: str = "") -> dict:
    """The first line of a recording."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    versions["python"] = platform.python_version()
    return {"type": "header", "v": SCHEMA_VERSION, "format": FORMAT,
            "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": command, "model": ready.model if ready else None,
            "device": ready.device if ready else None, "dtype": ready.dtype if ready else None,
            "settings": settings or {}, "packages": versions, "platform": platform.platform()}


def open_text(path: str, mode: str) -> IO[str]:
    """A text file, gzip-compressed when the name ends in .gz."""
    if str(path).endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, mode + "b"), encoding="utf-8", newline="\n")
    return open(path, mode, encoding="utf-8", newline="\n")


class Recorder:
    """Writes a header, then envelopes, one JSON object per line, to `out` (a path or an open
    text stream such as sys.stdout). Plain files are flushed after every write, so a crash
    loses nothing already written; gzip ones at the end of each run (a partial gzip stream is
    still read up to where it stops).

    A recording starts clean: the rest of a run (or race) already under way when it began is
    left out, so that every run in the file has its beginning.
    """

    def __init__(self, out, header_line: dict):
        self.path = out if isinstance(out, (str, os.PathLike)) else None
        self.file = open_text(out, "w") if self.path is not None else out
        self.compressed = self.path is not None and str(self.path).endswith(".gz")
        self.events = 0
        self.runs: set[int] = set()          # runs and races whose start is in the file
        self._write_line(header_line)
        self.file.flush()

    def _write_line(self, d: dict) -> None:
        self.file.write(json.dumps(d, ensure_ascii=False, allow_nan=False,
                                   separators=(",", ":")) + "\n")

    def write(self, envelopes: Iterable[Envelope]) -> None:
        end_of_run = False
        for env in envelopes:
            if not self._keep(env):
                continue
            self._write_line(env.to_json())
            self.events += 1
            end_of_run |= isinstance(env.event, (Finished, RaceFinished, BatchSummary))
        if not self.compressed or end_of_run:
            self.file.flush()

    def _keep(self, env: Envelope) -> bool:
        ev = env.event
        if isinstance(ev, (Started, RaceStarted, BatchStarted)):
            self.runs.add(env.run)
            return True
        if isinstance(ev, (Loading, Ready, Failed)) or env.run in self.runs:
            return True
        # a run that failed before it started has nothing but its Finished
        return isinstance(ev, Finished) and ev.reason == "error" and not ev.tokens

    def close(self) -> None:
        if self.path is not None:
            self.file.close()
        else:
            self.file.flush()


# --------------------------------------------------------------------------- reading
@dataclass
class Recording:
    header: dict
    envelopes: list[Envelope] = field(default_factory=list)
    notice: str | None = None          # why the recording ends early, if it does
    path: str = ""


def read_recording(path: str, max_line: int = MAX_LINE, max_events: int = MAX_EVENTS
                   ) -> Recording:
    """Read and check a recording (see the module docstring for what is refused and what is
    played up to the damage)."""
    name = os.path.basename(str(path))
    try:
        f = open_text(path, "r")
    except FileNotFoundError:
        raise RecordingError(f"recording not found: {path}") from None
    except OSError as exc:
        raise RecordingError(f"cannot open {path}: {exc.strerror or exc}") from None
    with f:
        lines = _lines(f, max_line)
        try:
            first = next(lines)
        except StopIteration:
            raise RecordingError(f"{name} is empty: nothing to replay") from None
        except _Damage as d:
            raise RecordingError(
                f"{name} is not a minillm recording (its first line {d})") from None
        head = _header(first, name)
        rec = Recording(header=head, path=str(path))
        order = OrderCheck()
        number = 1
        try:
            for number, line in enumerate(lines, start=2):
                if len(rec.envelopes) >= max_events:
                    rec.notice = (f"{name} has more than {max_events} events; playing the first "
                                  f"{max_events}")
                    break
                try:
                    env = Envelope.from_json(json.loads(line))
                except json.JSONDecodeError:
                    rec.notice = _cut(name, number, "is not JSON", rec)
                    break
                except (ValueError, TypeError) as exc:
                    rec.notice = _cut(name, number, f"is not a valid event: {exc}", rec)
                    break
                problem = order.check(env)
                if problem:
                    rec.notice = _cut(name, number, f"is out of order: {problem}", rec)
                    break
                rec.envelopes.append(env)
        except _Damage as d:
            rec.notice = _cut(name, number + 1, str(d), rec)
    if not rec.envelopes:
        raise RecordingError(f"{name} holds no events to replay"
                             + (f" ({rec.notice})" if rec.notice else ""))
    return rec


class _Damage(Exception):
    pass


def _lines(f: IO[str], max_line: int):
    """Lines without their newline; _Damage for a truncated last line, a huge line, or a
    broken (e.g. truncated) gzip stream."""
    while True:
        try:
            line = f.readline(max_line + 1)
        except (EOFError, zlib.error, gzip.BadGzipFile, OSError) as exc:
            raise _Damage(f"is unreadable: the compressed data is damaged ({exc})") from None
        except UnicodeDecodeError:
            raise _Damage("is not UTF-8 text") from None
        if not line:
            return
        if not line.endswith("\n"):
            if len(line) > max_line:
                raise _Damage(f"is longer than {max_line // 2**20} MiB")
            raise _Damage("is cut off (the recording was interrupted mid-line)")
        if line.strip():
            yield line


def _header(line: str, name: str) -> dict:
    try:
        head = json.loads(line)
    except json.JSONDecodeError:
        head = None
    if not isinstance(head, dict) or head.get("format") != FORMAT or head.get("type") != "header":
        raise RecordingError(f"{name} is not a minillm recording (its first line is not a "
                             f"recording header)")
    if head.get("v") != SCHEMA_VERSION:
        raise RecordingError(f"{name} uses event schema version {head.get('v')!r}; this minillm "
                             f"reads version {SCHEMA_VERSION} — replay it with the version that "
                             f"recorded it ({(head.get('packages') or {}).get('minillm')})")
    return head


def _cut(name: str, number: int, what: str, rec: Recording) -> str:
    return f"{name}: line {number} {what}; playing the {len(rec.envelopes)} events before it"


class OrderCheck:
    """Events must come as a session emits them: time never goes backwards; a run begins with
    Started, its tokens count up from 0, nothing follows its Finished; a race's runs come
    between its RaceStarted and RaceFinished."""

    RUN_EVENTS = (Started, Prefill, Token, CacheSnapshot, AttentionRow, FlashTiles, Finished,
                  *STEP_EVENTS)

    def __init__(self) -> None:
        self.t = None
        self.runs: dict[int, int] = {}          # run id → next token index; -1 once finished
        self.races: set[int] = set()

    def check(self, env: Envelope) -> str | None:
        ev = env.event
        if self.t is not None and env.t < self.t - 1e-6:
            return f"time goes backwards ({env.t:.3f} s after {self.t:.3f} s)"
        self.t = env.t
        if isinstance(ev, RaceStarted):
            self.races.add(env.run)
        elif isinstance(ev, RaceFinished):
            if env.run not in self.races:
                return f"race {env.run} finishes without having started"
            self.races.discard(env.run)
        elif isinstance(ev, Started):
            if env.run in self.runs:
                return f"run {env.run} starts twice"
            self.runs[env.run] = 0
        elif isinstance(ev, self.RUN_EVENTS):
            state = self.runs.get(env.run)
            if isinstance(ev, Finished) and state is None:   # a run that failed before starting
                self.runs[env.run] = -1
                return None
            if state is None:
                return f"run {env.run} has a {type(ev).__name__} event before it started"
            if state == -1:
                return f"run {env.run} has a {type(ev).__name__} event after it finished"
            if isinstance(ev, (Token, *STEP_EVENTS)) and ev.index != state:
                return (f"run {env.run}: {type(ev).__name__} of token {ev.index} where token "
                        f"{state} was due")
            if isinstance(ev, Token):
                self.runs[env.run] = state + 1
            elif isinstance(ev, Finished):
                self.runs[env.run] = -1
        return None
