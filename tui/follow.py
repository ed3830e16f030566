"""Which run the panes show: the app's one piece of bookkeeping about runs and races.

A live app follows the run or race it asked for; a replay or a watcher follows every run as it
comes. During a race the panes follow each contestant in turn (the lanes show them all), and
events of a run the app stopped following (a run stopped, then a new one started) are dropped.
"""

from __future__ import annotations

from engine.events import (STEP_EVENTS, AttentionRow, CacheSnapshot, Finished, FlashTiles,
                           Forked, Prefill, RaceFinished, RaceStarted, Started, Token)

RUN_EVENTS = (Started, Prefill, Token, CacheSnapshot, AttentionRow, FlashTiles, Finished,
              *STEP_EVENTS)


def split(envelopes):
    """A batch as (run id, [its events]) for consecutive events of one run, and (None,
    envelope) for each of the session's and races' own events, in order."""
    group: list = []
    for env in envelopes:
        if isinstance(env.event, RUN_EVENTS) and (not group or env.run == group[0].run):
            group.append(env)
            continue
        if group:
            yield group[0].run, [e.event for e in group]
            group = []
        if isinstance(env.event, RUN_EVENTS):
            group.append(env)
        else:
            yield None, env
    if group:
        yield group[0].run, [e.event for e in group]


class Follow:
    """current: the run id drawn now; race: run id → label of the race drawn now."""

    def __init__(self, follow_every_run: bool) -> None:
        self.every = follow_every_run
        self.current: int | None = None
        self.race: dict[int, str] = {}
        self.last_race: RaceFinished | None = None
        self.last_single: tuple | None = None      # (comparison key, tokens) of the last run
        self.forked: set[int] = set()              # step-mode runs with a forced token

    @property
    def busy(self) -> bool:
        return self.current is not None or bool(self.race)

    def begin_race(self, race: RaceStarted) -> None:
        self.race = {c.run: c.label for c in race.contestants}
        self.current = race.contestants[0].run

    def end_race(self, race: RaceFinished) -> None:
        self.current, self.race, self.last_race = None, {}, race

    def take(self, run_id: int) -> bool:
        """Should this run's events be drawn? (The race moves on to its next contestant; a
        replay or watcher moves on to every new run.)"""
        if self.every and not self.race:
            self.current = run_id
        elif run_id in self.race and (self.current is None or run_id > self.current):
            self.current = run_id
        return run_id == self.current

    def see(self, run_id: int, events: list) -> None:
        """Note a run that forks (a forced token): no baseline for "same tokens as before"."""
        if any(isinstance(e, Forked) for e in events):
            self.forked.add(run_id)

    def same_as_before(self, key: tuple, tokens: tuple) -> bool | None:
        """A finished single run: the same tokens as the last one with the same key (prompt,
        sampling, length)? None when there is nothing to compare with, or the run forked."""
        forked = self.current in self.forked
        before, self.last_single = self.last_single, None if forked else (key, tokens)
        self.current = None
        if forked:
            return None
        return before[1] == tokens if before is not None and before[0] == key else None

    def reset(self) -> None:
        self.__init__(self.every)
