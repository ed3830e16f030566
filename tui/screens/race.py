"""The race results: one row per contestant, how much faster than naive, and the verdict."""

from __future__ import annotations


from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import DataTable, Static

from engine.config import ConfigError, FastPathConfig
from engine.events import RaceFinished, RaceRow
from engine.requests import REMOTE
from engine.units import format_bytes, format_ms, format_number

from ..remote import row_note
from ..widgets.latency import finish_text


def lossy(row: RaceRow) -> bool:
    """Is the contestant expected to differ (its fast path stores weights in fewer bits)?"""
    try:
        return FastPathConfig.from_spec(row.fast).lossy
    except ConfigError:
        return False


def remote(row: RaceRow) -> bool:
    """A contestant that ran on a server (--endpoint): its model, dtype and kernels are the
    server's, so a difference says something about the server, not about an optimisation."""
    return row.strategy == REMOTE


def compared(race: RaceFinished) -> list[RaceRow]:
    return [r for r in race.rows if r.same_tokens is not None]


def exact_agree(race: RaceFinished) -> bool | None:
    """Did every exact contestant produce the reference's tokens? (Lossy ones may differ.)
    None when nothing was compared."""
    rows = [r for r in compared(race) if not lossy(r) and not remote(r)]
    return all(r.same_tokens for r in rows) if rows else None


def verdict(race: RaceFinished) -> str:
    """The race in one sentence."""
    rows = compared(race)
    if not rows:
        if race.cancelled:
            return "stopped before a second contestant could be compared with the first"
        return "nothing to compare (fewer than two contestants finished)"
    delta = race.max_delta
    d = f"; max |Δ logits| = {delta:.3g}" if delta is not None else ""
    stopped = [r for r in rows if r.reason == "cancelled"]
    partial = "".join(f"; {r.label} stopped, compared on its {len(r.tokens)} tokens"
                      for r in stopped)
    servers = "".join(f"; {r.label} {r.difference} (the server's own model, dtype and "
                      f"kernels)" for r in rows if remote(r) and not r.same_tokens)
    partial += servers
    differ = [r for r in rows if not r.same_tokens and not remote(r)]
    forks = [r for r in differ if r.forced is not None]   # a forced token: says where and why
    unexpected = [r for r in differ if not lossy(r) and r.forced is None]
    if not differ and not servers:
        return f"✓ all {len(rows) + 1} contestants that ran produced identical tokens{partial}{d}"
    if not differ:
        return f"✓ every local contestant produced identical tokens{partial}{d}"
    if not unexpected:
        where = ", ".join(f"{r.label} {r.difference}" for r in differ)
        kind = "the forks and lossy ones" if forks else "the lossy ones"
        return (f"✓ every exact contestant produced identical tokens; {kind} differ, "
                f"as expected: {where}{partial}{d}")
    return (f"✗ tokens differ from the first contestant: "
            f"{', '.join(f'{r.label} from token {r.first_difference}' for r in unexpected)}"
            f"{partial}{d}")


def same_cell(row: RaceRow, reference: RaceRow | None) -> str:
    if row.error:
        return "—"
    if row is reference:
        return "ref"
    if row.same_tokens is None:
        return "not compared"
    part = f" (its {len(row.tokens)})" if row.reason == "cancelled" else ""
    if row.same_tokens:
        return "✓" + part
    return (f"≈ @{row.first_difference} expected" if lossy(row) else
            f"✗ @{row.first_difference}") + part


class RaceScreen(ModalScreen[None]):
    """A comparison table of the last race."""

    BINDINGS = [Binding("escape,t", "app.pop_screen", "Close")]

    DEFAULT_CSS = """
    RaceScreen { align: center middle; }
    RaceScreen > Vertical { width: 95%; max-width: 140; height: auto; max-height: 95%;
                            background: $surface; border: thick $primary; padding: 0 1; }
    RaceScreen DataTable { height: auto; max-height: 14; }
    RaceScreen .note { color: $text-muted; }
    RaceScreen #verdict { margin-top: 1; text-style: bold; }
    RaceScreen #verdict.-same { color: $success; }
    RaceScreen #verdict.-differ { color: $error; }
    """

    def __init__(self, race: RaceFinished, warmup: int = 0) -> None:
        super().__init__()
        self.race, self.warmup = race, warmup

    def compose(self) -> ComposeResult:
        race = self.race
        with Vertical():
            stopped = " (stopped early)" if race.cancelled else ""
            yield Static(f"[b]Race[/b]{stopped}: {race.prompt[:60]!r} — escape closes")
            yield DataTable(zebra_stripes=True, cursor_type="row")
            peak = max((r.peak_memory_bytes for r in race.rows), default=0)
            warm = (f"each contestant ran {self.warmup} tokens untimed first, so one-off costs "
                    f"are not in its TTFT · " if self.warmup else "")
            yield Static(f"{warm}× vs naive: decode tok/s over naive/sdpa's · ≈ expected: a "
                         f"lossy fast path (fewer bits per weight) · engine process peak "
                         f"memory {format_bytes(peak)}, a high-water mark over the session, "
                         f"not per contestant", classes="note")
            agree = exact_agree(race)
            classes = "" if agree is None else ("-same" if agree else "-differ")
            for row in filter(remote, race.rows):
                yield Static(row_note(row), classes="note remote")
            yield Static(verdict(race), id="verdict", classes=classes)

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        table.add_columns("strategy", "backend +fast", "result", "TTFT ms", "TPOT ms", "tok/s",
                          "× vs naive", "KV bytes", "same tokens", "max|Δlogits|")
        rows = self.race.rows
        reference = next((r for r in rows if not r.error and r.reason != "cancelled"), None)
        naive = next((r for r in rows if r.strategy == "naive" and not r.error
                      and r.tokens_per_s > 0), None)
        for r in rows:
            speedup = (f"{r.tokens_per_s / naive.tokens_per_s:.1f}×"
                       if naive is not None and r.tokens_per_s > 0 else "—")
            delta = "—" if r.max_logit_delta is None else f"{r.max_logit_delta:.2e}"
            backend = r.backend + (f" +{r.fast}" if r.fast else "")
            result = r.error if not r.error or len(r.error) <= 30 else r.error[:29] + "…"
            table.add_row(r.strategy, backend, result or finish_text(r.reason),
                          format_ms(r.ttft_s), format_ms(r.tpot_s), format_number(r.tokens_per_s),
                          speedup, "—" if remote(r) else format_bytes(r.kv_bytes),
                          same_cell(r, reference), delta)
        table.focus()
