"""The race results: one row per strategy/backend, and the identical-tokens verdict."""

from __future__ import annotations

import math

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import DataTable, Static

from engine.events import RaceFinished

from ..widgets.kv_cache import human_bytes


def _ms(x: float) -> str:
    return "—" if x is None or math.isnan(x) else f"{x * 1e3:.1f}"


def _num(x: float) -> str:
    return "—" if x is None or math.isnan(x) else f"{x:.1f}"


def verdict(race: RaceFinished) -> str:
    if race.identical is None:
        return "nothing to compare (fewer than two contestants finished)"
    delta = race.max_delta
    d = f"; max |Δ logits| = {delta:.3g}" if delta is not None else ""
    if race.identical:
        return f"✓ all contestants produced identical tokens{d}"
    differ = [r.label + (f" ({r.difference})" if r.forced is not None else "")
              for r in race.rows if r.same_tokens is False]      # a fork says where and why
    return f"✗ tokens differ from the first contestant: {', '.join(differ)}{d}"


class RaceScreen(ModalScreen[None]):
    """A comparison table of the last race."""

    BINDINGS = [("escape", "app.pop_screen", "Close"), ("t", "app.pop_screen", "Close")]

    DEFAULT_CSS = """
    RaceScreen { align: center middle; }
    RaceScreen > Vertical { width: 95%; max-width: 130; height: auto; max-height: 90%;
                            background: $surface; border: thick $primary; padding: 0 1; }
    RaceScreen DataTable { height: auto; max-height: 20; }
    RaceScreen #verdict { margin-top: 1; text-style: bold; }
    RaceScreen #verdict.-same { color: $success; }
    RaceScreen #verdict.-differ { color: $error; }
    """

    def __init__(self, race: RaceFinished) -> None:
        super().__init__()
        self.race = race

    def compose(self) -> ComposeResult:
        race = self.race
        with Vertical():
            stopped = " (stopped early)" if race.cancelled else ""
            yield Static(f"[b]Race[/b]{stopped}: {race.prompt[:60]!r} — escape closes")
            yield DataTable(zebra_stripes=True, cursor_type="row")
            classes = "" if race.identical is None else ("-same" if race.identical else "-differ")
            yield Static(verdict(race), id="verdict", classes=classes)

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        table.add_columns("strategy", "backend +fast", "result", "TTFT ms", "TPOT ms", "tok/s",
                          "KV bytes", "peak mem", "same tokens", "max|Δlogits|")
        for r in self.race.rows:
            same = "ref" if r.same_tokens is None and not r.error else (
                "—" if r.same_tokens is None else ("✓" if r.same_tokens else
                                                    f"✗ @{r.first_difference}"))
            delta = "—" if r.max_logit_delta is None else f"{r.max_logit_delta:.2e}"
            backend = r.backend + (f" +{r.fast}" if r.fast else "")
            table.add_row(r.strategy, backend, r.error or r.reason, _ms(r.ttft_s),
                          _ms(r.tpot_s), _num(r.tokens_per_s), human_bytes(r.kv_bytes),
                          human_bytes(r.peak_memory_bytes), same, delta)
