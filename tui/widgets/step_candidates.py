"""Step mode's next-token bars: the candidates as the sampling settings shape them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from rich.cells import cell_len
from rich.text import Text
from textual.binding import Binding, BindingType
from textual.message import Message
from textual.reactive import reactive
from textual.widget import Widget

from engine.events import StepPoint

EIGHTHS = " ▏▎▍▌▋▊▉"
VISIBLE = {"\n": "⏎", "\t": "⇥", "\r": "␍"}


def token_label(text: str, width: int) -> str:
    """A token as one short, visible label: quoted, line breaks and tabs as symbols, control
    characters escaped, cut to `width` cells with an ellipsis. A token that is only white space
    shows each space as ␣ (a quoted blank would be invisible); an empty one as ∅."""
    if text.strip() == "":
        shown = "".join(VISIBLE.get(ch, "␣") for ch in text) or "∅"
    else:
        shown = "".join(VISIBLE.get(ch, ch) if ch in "\n\t\r" else
                        (f"\\x{ord(ch):02x}" if ord(ch) < 32 or ord(ch) == 127 else ch)
                        for ch in text)
    shown = f"'{shown}'"
    if cell_len(shown) > width:
        out, used = "", 0
        for ch in shown:
            if used + cell_len(ch) > width - 1:
                break
            out, used = out + ch, used + cell_len(ch)
        shown = out + "…"
    return shown + " " * max(0, width - cell_len(shown))


def bar(fraction: float, width: int) -> str:
    """`fraction` of `width` cells, in eighths of a cell; anything above 0 shows at least ▏."""
    cells = max(0.0, min(1.0, fraction)) * width
    full, eighth = int(cells), int((cells - int(cells)) * 8)
    out = "█" * full + (EIGHTHS[eighth] if eighth and full < width else "")
    if fraction > 0 and not out:
        out = EIGHTHS[1]
    return out + " " * (width - len(out))


def percent(p: float) -> str:
    if p <= 0:
        return "    0%"
    return " <0.1%" if p < 0.001 else f"{p * 100:5.1f}%"


class StepCandidates(Widget, can_focus=True):
    """The candidates for the next token, one bar each, most likely first.

    Each bar is the probability after the repetition penalty and temperature; beside it, what
    the draw uses once top-k / top-p / min-p have cut (or the cut that removed the token, the
    row greyed and struck through) and what the model itself said. ◆ marks the sampler's choice;
    the cursor (↑ ↓, or the row's digit) picks a candidate, and enter takes it — the sampler's
    choice goes on as an unstepped run would, any other one forces it (a fork).
    """

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("up", "move(-1)", "Pick ↑", show=False),
        Binding("down", "move(1)", "Pick ↓", show=False),
        *(Binding(str((k + 1) % 10), f"pick({k})", f"Pick {k + 1}", show=False)
          for k in range(10)),
        Binding("enter", "take", "Take"),
    ]

    DEFAULT_CSS = """
    StepCandidates { background: $surface; padding: 0 1; height: 1fr; text-wrap: nowrap;
                     text-overflow: ellipsis; }
    StepCandidates > .step-candidates--model-bar { color: $secondary; }
    StepCandidates > .step-candidates--header { color: $text-muted; text-style: italic; }
    StepCandidates > .step-candidates--bar { color: $primary; }
    StepCandidates > .step-candidates--chosen { color: $success; text-style: bold; }
    StepCandidates > .step-candidates--cut { color: $text-muted; text-style: strike; }
    StepCandidates > .step-candidates--cut-bar { color: $block-free; }
    StepCandidates > .step-candidates--cursor { background: $accent 30%; }
    StepCandidates > .step-candidates--muted { color: $text-muted; }
    """

    COMPONENT_CLASSES: ClassVar[set[str]] = {
        "step-candidates--header", "step-candidates--bar", "step-candidates--chosen",
        "step-candidates--cut", "step-candidates--cut-bar", "step-candidates--cursor",
        "step-candidates--muted", "step-candidates--model-bar"}

    point: reactive[StepPoint | None] = reactive(None)
    """The pause being shown (None: no pause yet)."""
    cursor: reactive[int] = reactive(0)
    """The picked candidate's row; each new pause starts on the sampler's choice."""
    live: reactive[bool] = reactive(True)
    """Whether enter may take a candidate (not in a replay, not while the run is moving)."""

    @dataclass
    class Highlighted(Message):
        """The cursor moved to candidate `token` (its text, for a preview)."""
        token: int
        text: str

    @dataclass
    class Taken(Message):
        """Enter on a candidate: take `token` (`forced`: not the sampler's choice)."""
        token: int
        forced: bool

    def watch_point(self, point: StepPoint | None) -> None:
        if point is not None:
            ids = [c.id for c in point.candidates]
            self.cursor = ids.index(point.chosen) if point.chosen in ids else 0

    def watch_cursor(self, cursor: int) -> None:
        if self.point is not None and cursor < len(self.point.candidates):
            c = self.point.candidates[cursor]
            self.post_message(self.Highlighted(c.id, c.text))

    def watch_live(self) -> None:
        self.refresh_bindings()

    def render(self) -> Text:
        point = self.point
        if point is None:
            return Text("waiting for the first token…",
                        style=self.get_component_rich_style("step-candidates--muted"))
        style = self.get_component_rich_style
        width = max(self.content_region.width, 30)
        name = min(20, max(10, width * 2 // 7))
        numbers = 7 + 7                                   # " 42.1%" twice, with a space
        bar_w = max(4, width - 2 - 2 - name - 1 - numbers - 1)
        # Wide enough: the model's own bar beside the shaped one, so temperature shows.
        model_w = (bar_w - 1) // 2 if bar_w >= 40 else 0
        bar_w -= model_w + (1 if model_w else 0)
        t = Text(no_wrap=True, overflow="ellipsis")
        shaped = "after temperature" if bar_w >= 17 else "after temp."[:bar_w]
        model = f"{'model':{model_w}} " if model_w else ""
        t.append(f"{'':4}{'token':{name}} {model}{shaped:{bar_w}} {'draw':>6} {'model':>6}\n",
                 style("step-candidates--header"))
        for row, c in enumerate(point.candidates):
            digit = str((row + 1) % 10) if row < 10 else " "
            mark = "◆" if c.id == point.chosen else " "
            line = Text(no_wrap=True, overflow="ellipsis")
            line.append(f"{digit}{mark} ")
            cut = bool(c.cut)
            label_style = (style("step-candidates--cut") if cut else
                           style("step-candidates--chosen") if c.id == point.chosen else None)
            line.append(token_label(c.text, name), label_style)
            line.append(" ")
            if model_w:
                line.append(bar(c.model, model_w), style("step-candidates--model-bar"))
                line.append(" ")
            line.append(bar(c.tempered, bar_w),
                        style("step-candidates--cut-bar" if cut else "step-candidates--bar"))
            line.append(" ")
            line.append(f"{c.cut:>6}" if cut else percent(c.final),
                        style("step-candidates--muted") if cut else None)
            line.append(" ")
            line.append(percent(c.model), style("step-candidates--muted"))
            if row == self.cursor:
                line.stylize(style("step-candidates--cursor"))
            t.append_text(line)
            t.append("\n")
        t.rstrip()
        return t

    def check_action(self, action: str, parameters: tuple) -> bool | None:
        return self.live if action == "take" else True

    def action_move(self, delta: int) -> None:
        if self.point is not None:
            self.cursor = (self.cursor + delta) % len(self.point.candidates)

    def action_pick(self, row: int) -> None:
        if self.point is not None and row < len(self.point.candidates):
            self.cursor = row

    def action_take(self) -> None:
        if self.point is None or not self.live:
            return
        token = self.point.candidates[self.cursor].id
        self.post_message(self.Taken(token, forced=token != self.point.chosen))
