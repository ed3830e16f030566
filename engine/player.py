"""A recording as a source (engine/source.py): what `python main.py replay` steers.

    player = Player(read_recording("run.jsonl.gz"), speed=1.0)
    player.start(deliver)           # deliver(envelopes, restart) from its thread, ~12 a second
    player.toggle()                 # pause / play (at the end: play again from the start)
    player.step(+1) / step(-1)      # one token forward / back, paused
    player.faster(+1) / faster(-1)  # ×0.5, ×1, ×2, ×4
    player.to_start() / to_end()

Playing delivers every envelope whose recorded time has come (idle gaps between runs — someone
typing — shortened to MAX_GAP_S), scaled by the speed. Stepping stops at token boundaries: a
token and the events of its step. Going back delivers the recording from its start up to there
with restart=True, so a consumer that draws from scratch shows exactly that moment. No torch,
no NumPy.
"""

from __future__ import annotations

import bisect
import threading
import time
from dataclasses import dataclass
from typing import Sequence

from .events import (AttentionRow, CacheSnapshot, Envelope, Failed, Finished, FlashTiles, Loading,
                     LogitLens, PoolSnapshot, Ready, StepPoint, Token)
from .recording import Recording
from .source import Deliver


SESSION_EVENTS = (Loading, Ready, Failed)
SPEEDS = (0.5, 1.0, 2.0, 4.0)
MAX_GAP_S = 1.5        # idle time between runs (someone typing) is shortened to this
TICK_S = 1 / 12        # deliveries a second while playing, like the live engine's batches


def token_stops(envelopes: Sequence[Envelope]) -> list[int]:
    """Where stepping token by token stops: for each Token, the index just after the events
    that belong to its step (cache snapshot, attention row, flash tiles — and the run's
    Finished, if it is the last token). In a step-mode run the pause before the next token
    (its StepPoint and LogitLens) comes with it: a replay stops where the run stopped. A batch
    (many requests at once) steps a scheduler step at a time: up to its PoolSnapshot."""
    stops, n = [], len(envelopes)
    for i, env in enumerate(envelopes):
        if isinstance(env.event, PoolSnapshot):
            stops.append(i + 1)
        if isinstance(env.event, Token):
            j = i + 1
            while j < n and isinstance(envelopes[j].event, (CacheSnapshot, AttentionRow,
                                                            FlashTiles)):
                j += 1
            if j < n and isinstance(envelopes[j].event, Finished):
                j += 1
            while j < n and isinstance(envelopes[j].event, (StepPoint, LogitLens)) \
                    and envelopes[j].run == env.run:
                j += 1
            stops.append(j)
    return stops


@dataclass(frozen=True)
class PlayerState:
    playing: bool
    speed: float
    cursor: int            # envelopes delivered
    total: int
    token: int             # tokens delivered
    tokens: int            # tokens in the recording
    seconds: float         # playback time delivered so far (idle gaps shortened)
    duration: float

    @property
    def at_end(self) -> bool:
        return self.cursor >= self.total


class Player:
    """A recording as a Source (engine/source.py): not live, but it can be steered.

    Playing delivers, about 12 times a second, every envelope whose (gap-shortened) recorded
    time has come, scaled by `speed`. `step(±1)` pauses and moves to the next or previous
    token; going back delivers the whole state up to there with restart=True, so a consumer
    rebuilds exactly what it showed at that token. All deliveries happen under one lock, in
    order, from the player's thread or the caller's.
    """

    live = False

    def __init__(self, recording: Recording, speed: float = 1.0, playing: bool = True,
                 tick: float = TICK_S, max_gap: float = MAX_GAP_S):
        self.recording = recording
        self.envelopes = recording.envelopes
        self.times = playback_times(self.envelopes, max_gap)
        self.stops = token_stops(self.envelopes)
        self.speed, self.playing, self.tick = speed, playing, tick
        self.cursor = 0
        self.clock = 0.0                 # playback time reached
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._deliver: Deliver | None = None
        self._thread: threading.Thread | None = None
        self._last = time.monotonic()
        self._first = next((i for i, e in enumerate(self.envelopes)
                            if not isinstance(e.event, SESSION_EVENTS)), len(self.envelopes))

    # ------------------------------------------------------------------ Source
    def start(self, deliver: Deliver) -> None:
        self._deliver = deliver
        with self._lock:
            self._move(self._first)           # the model's Ready before anything else
            self._last = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="replay", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    # ------------------------------------------------------------------ controls
    @property
    def state(self) -> PlayerState:
        with self._lock:
            token = bisect.bisect_right(self.stops, self.cursor)
            return PlayerState(self.playing, self.speed, self.cursor, len(self.envelopes), token,
                               len(self.stops), self._time_at(self.cursor),
                               self.times[-1] if self.times else 0.0)

    def toggle(self) -> None:
        with self._lock:
            if not self.playing and self.cursor >= len(self.envelopes):
                self._move(self._first, restart=True)      # play again from the start
            self.playing = not self.playing
            self.clock = self._time_at(self.cursor)
            self._last = time.monotonic()
        self._wake.set()

    def set_speed(self, speed: float) -> None:
        with self._lock:
            self.speed = speed

    def faster(self, steps: int = 1) -> float:
        """The next speed in SPEEDS (steps < 0: slower); returns it."""
        with self._lock:
            i = min(range(len(SPEEDS)), key=lambda k: abs(SPEEDS[k] - self.speed))
            self.speed = SPEEDS[max(0, min(len(SPEEDS) - 1, i + steps))]
            return self.speed

    def step(self, n: int) -> None:
        """Pause, then move |n| tokens forward (n > 0) or back (n < 0)."""
        with self._lock:
            self.playing = False
            target = self.cursor
            for _ in range(abs(n)):
                if n > 0:
                    k = bisect.bisect_right(self.stops, target)
                    target = self.stops[k] if k < len(self.stops) else len(self.envelopes)
                else:
                    k = bisect.bisect_left(self.stops, target) - 1
                    target = self.stops[k] if k >= 0 else self._first
            self._move(target, restart=target < self.cursor)

    def to_start(self) -> None:
        with self._lock:
            self.playing = False
            self._move(self._first, restart=True)

    def to_end(self) -> None:
        with self._lock:
            self.playing = False
            self._move(len(self.envelopes))

    # ------------------------------------------------------------------ inside
    def _time_at(self, cursor: int) -> float:
        return self.times[cursor - 1] if cursor > 0 else 0.0

    def _move(self, target: int, restart: bool = False) -> None:
        """Deliver so that exactly envelopes[:target] have been delivered."""
        if restart:
            batch = self.envelopes[:target]
        elif target > self.cursor:
            batch = self.envelopes[self.cursor:target]
        else:
            return
        self.cursor = target
        self.clock = self._time_at(target)
        if self._deliver is not None:
            self._deliver(batch, restart)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.tick)
            self._wake.clear()
            if self._stop.is_set():
                return
            with self._lock:
                now = time.monotonic()
                if self.playing:
                    self.clock += (now - self._last) * self.speed
                    due = bisect.bisect_right(self.times, self.clock)
                    if due >= len(self.envelopes):
                        self.playing = False          # the end: stay there, paused
                    self._move(max(due, self.cursor))
                self._last = now


def playback_times(envelopes: Sequence[Envelope], max_gap: float = MAX_GAP_S) -> list[float]:
    """Each envelope's time from the first, with idle gaps longer than `max_gap` shortened."""
    times, t, prev = [], 0.0, None
    for env in envelopes:
        if prev is not None:
            t += min(max(env.t - prev, 0.0), max_gap)
        times.append(t)
        prev = env.t
    return times
