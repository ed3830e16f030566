"""Step mode: the run stops before each token; see why the next one is what it is, or choose it.

    step mode · token 4 of 50 · kv/sdpa · T=0.8 top-k 5
    the text so far, the picked candidate after it
    ◆ the sampler's choice … / the fork, how the run ended
    ╭─ Next token · 5 of 49,152 left in the draw ─╮╭─ Logit lens ───────────────╮
    │ 1◆ ' machine'  ██████████▌   42.1%  38.0%    ││ L20 ' the'    31.0%        │
    │ 2  ' data'     ███▏          12.0%   9.1%    ││ L21 ' machine' 40.2%       │
    │ 6  ' deep'     ▏             top-k   1.0%    ││ L29 ' machine' 42.1%       │
    ╰─────────────────────────────────────────────╯╰────── settles at L21 ─────╯

The screen renders the engine's step-mode events (StepPoint, LogitLens, Forked, and the run's
tokens) for one run, and sends StepCommands through the app's source. Its keys: n or space the
next token (the sampler's choice), N ten more, ↑ ↓ or a digit pick a candidate and enter takes
it (any other than the sampler's forces it: a fork), e runs to the end without stopping, x
stops, R (shown once a fork has finished) races it against the unforced run, escape leaves
step mode (the run goes on to its end). In a replay it follows the recording: the app's replay
keys step through it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, VerticalScroll
from textual.message import Message
from textual.screen import ModalScreen
from textual.widgets import Footer, Static

from engine.events import (Finished, Forked, LogitLens, Prefill, Started, StepPoint, Token,
                           run_label)
from engine.requests import RunRequest, StepCommand

from ..messages import EngineEvents
from .replay import steer_bindings
from ..widgets.step_candidates import StepCandidates
from ..widgets.step_lens import StepLens

STEP_ACTIONS = {"next", "to_end"}        # need a live run that has paused


def to_step_screen(app, message: EngineEvents) -> None:
    """The app hands every batch to the step screen (it keeps its own run's events); a replay
    or a watcher opens one when a step-mode run starts."""
    screen = next((s for s in app.screen_stack if isinstance(s, StepScreen)), None)
    runs = [e.run for e in message.envelopes if isinstance(e.event, Started) and e.event.step]
    if screen is None and runs and not app.source.live:
        app.push_screen(screen := StepScreen(runs[-1]))
    if screen is not None:
        screen.post_message(message)


def shaping(sampling) -> str:
    """The settings that shape the distribution, in the ladder's order ("greedy" when T = 0)."""
    if sampling is None:
        return ""
    parts = [] if sampling.repetition_penalty == 1.0 else [f"rep {sampling.repetition_penalty:g}"]
    if sampling.temperature == 0:
        return " ".join(parts + ["greedy"])
    parts.append(f"T={sampling.temperature:g}")
    for name, value in (("top-k", sampling.top_k), ("top-p", sampling.top_p),
                        ("min-p", sampling.min_p)):
        if value is not None:
            parts.append(f"{name} {value:g}")
    if sampling.seed is not None:
        parts.append(f"seed {sampling.seed}")
    return " ".join(parts)


class StepScreen(ModalScreen[None]):
    """One step-mode run, paused before each token (see the module docstring). Modal: the
    panes' keys below do nothing here (the app's replay keys, priority ones, still steer a
    replay)."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("n,space", "next(1)", "Next token"),
        Binding("N", "next(10)", "Next 10", show=False),
        Binding("e", "to_end", "To the end"),
        Binding("x", "app.stop", "Stop"),
        Binding("R", "race_fork", "Race the fork"),
        Binding("escape", "leave", "Leave"),
        Binding("question_mark,f1", "app.help", "Help", show=False),
        # A replay is steered from here too (only in a replay: check_action).
        *steer_bindings("token", show_speed=False),
    ]

    DEFAULT_CSS = """
    StepScreen { background: $background; }
    StepScreen #step-title { height: 1; background: $panel; color: $foreground; padding: 0 1;
                             text-style: bold; }
    StepScreen #step-text { height: 3; background: $surface; padding: 0 1; }
    StepScreen #step-status { height: 1; padding: 0 1; color: $text-muted; }
    StepScreen #step-status.-fork { color: $warning; text-style: bold; }
    StepScreen #step-body { height: 1fr; }
    StepScreen #candidates { width: 3fr; border: round $primary 50%;
                             border-title-color: $accent; border-title-style: bold; }
    StepScreen #candidates:focus { border: round $accent; }
    StepScreen #lens-box { width: 2fr; border: round $primary 50%; background: $surface;
                           border-title-color: $accent; border-title-style: bold;
                           border-subtitle-color: $success; }
    """

    AUTO_FOCUS = "#candidates"

    @dataclass
    class RaceFork(Message):
        """Race this finished fork (`request` with `forces`) against the unforced run."""
        request: RunRequest
        forces: tuple[tuple[int, int], ...]

    def __init__(self, run_id: int, request: RunRequest | None = None) -> None:
        super().__init__()
        self.run_id, self.request = run_id, request
        self._clear()

    def _clear(self) -> None:
        self.started: Started | None = None
        self.prompt = ""
        self.pieces: list[str] = []           # generated text, token by token
        self.forks: list[Forked] = []
        self.finished: Finished | None = None
        self.paused = False                   # a pause arrived and no command was sent since
        self.point: StepPoint | None = None

    def compose(self) -> ComposeResult:
        yield Static("Step mode — waiting for the engine…", id="step-title")
        yield Static("", id="step-text")
        yield Static("", id="step-status")
        with Horizontal(id="step-body"):
            yield StepCandidates(id="candidates")
            with VerticalScroll(id="lens-box"):
                yield StepLens(id="lens")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#candidates").border_title = "Next token"
        self.query_one("#lens-box").border_title = "Logit lens"
        self._show()

    # ------------------------------------------------------------------ events in
    def on_engine_events(self, message: EngineEvents) -> None:
        """The app routes every batch here; only this run's events count."""
        message.stop()
        if message.restart:                   # a replay went back: rebuild from its start
            self._clear()
            if not any(e.run == self.run_id and isinstance(e.event, Started)
                       for e in message.envelopes):
                self.dismiss()
                return
        candidates, lens = self.query_one(StepCandidates), self.query_one(StepLens)
        for env in message.envelopes:
            if env.run != self.run_id:
                continue
            ev = env.event
            if isinstance(ev, Started):
                self.started = ev
            elif isinstance(ev, Prefill):
                self.prompt = "".join(ev.prompt_pieces)
            elif isinstance(ev, StepPoint):
                self.point = candidates.point = ev
            elif isinstance(ev, LogitLens):
                if lens.lens is None:         # the last layers (the answer) in view at first
                    self.call_after_refresh(self.query_one("#lens-box").scroll_end,
                                            animate=False)
                lens.lens = ev
                self.paused = True
            elif isinstance(ev, Forked):
                self.forks.append(ev)
            elif isinstance(ev, Token):
                self.pieces.append(ev.text)
                self.paused = False
            elif isinstance(ev, Finished):
                self.finished, self.paused = ev, False
                self.pieces.append(ev.tail)
        self.query_one("#lens-box").border_subtitle = lens.summary()
        self._show()

    # ------------------------------------------------------------------ drawing
    def _show(self) -> None:
        started, point, fin = self.started, self.point, self.finished
        title = "Step mode"
        if started is not None:
            at = (f"token {len(self.pieces) + 1} of {started.max_new_tokens}" if fin is None
                  else f"{len(fin.tokens)} of {started.max_new_tokens} tokens")
            title += (f" · {at} · {run_label(started.strategy, started.backend, started.fast)}"
                      f" · {shaping(started.sampling)}")
        self.query_one("#step-title", Static).update(title)
        candidates = self.query_one(StepCandidates)
        candidates.live = self.paused and not self.app_replaying
        if point is not None:
            greedy = started is not None and started.sampling.temperature == 0
            candidates.border_title = "Next token · " + (
                "greedy: the top one" if greedy else
                f"{point.kept:,} of {point.vocab:,} left in the draw")
        self._show_text()
        self._show_status()
        self.refresh_bindings()

    @property
    def app_replaying(self) -> bool:
        """A recording or a watched session: its events only show, nothing is sent."""
        return not self.app.source.live

    def _show_text(self) -> None:
        box = self.query_one("#step-text", Static)
        width = max(box.content_region.width, 20)
        text = Text(no_wrap=False, overflow="fold")
        text.append(self.prompt, "italic dim")
        text.append("".join(self.pieces))
        point, candidates = self.point, self.query_one(StepCandidates)
        if point is not None and self.paused:
            picked = point.candidates[candidates.cursor]
            text.append(picked.text.replace("\n", "⏎"), "reverse")
        # only the tail fits: 3 lines of `width`
        if len(text) > 3 * width - 4:
            text = text[len(text) - (3 * width - 4):]
            text = Text("…").append_text(text)
        box.update(text)

    def _show_status(self) -> None:
        status = self.query_one("#step-status", Static)
        fin, fork = self.finished, self.forks[0] if self.forks else None
        line = ""
        if fork is not None:
            line = f"fork at token {fork.index}: {fork.describe()}"
            if len(self.forks) > 1:
                line += f" (+{len(self.forks) - 1} more)"
        if fin is not None:
            end = {"length": "token limit", "eos": "end of text (EOS)", "stop": "stop string",
                   "cancelled": "stopped", "error": f"failed: {fin.error}"}.get(fin.reason,
                                                                              fin.reason)
            line = (line + " · " if line else "") + f"done: {end}"
        elif not line and self.paused:
            line = "◆ the sampler's choice · ↑↓ or a digit picks another · enter takes it"
        status.update(line)
        status.set_class(fork is not None, "-fork")

    def on_step_candidates_highlighted(self, message: StepCandidates.Highlighted) -> None:
        self._show_text()

    def on_step_candidates_taken(self, message: StepCandidates.Taken) -> None:
        self._send(StepCommand(self.run_id, "force", token=message.token) if message.forced
                   else StepCommand(self.run_id, "next"))

    # ------------------------------------------------------------------ actions
    def check_action(self, action: str, parameters: tuple) -> bool | None:
        if action == "steer":                     # a recording, played below this screen
            return hasattr(self.app.main, "action_steer")
        if action in STEP_ACTIONS:
            return self.paused and not self.app_replaying
        if action == "race_fork":                 # shown once there is a finished fork
            return bool(self.forks and self.finished and self.request and
                        not self.app_replaying)
        return True

    def _send(self, command: StepCommand) -> None:
        if not self.paused or self.app_replaying:
            return
        self.paused = False
        self.app.source.send_step(command)
        self._show()

    def action_steer(self, verb: str) -> None:
        self.app.main.action_steer(verb)

    def action_next(self, count: int) -> None:
        self._send(StepCommand(self.run_id, "next", count=count))

    def action_to_end(self) -> None:
        self._send(StepCommand(self.run_id, "run"))

    def action_race_fork(self) -> None:
        self.app.post_message(self.RaceFork(self.request,
                                            tuple((f.index, f.token) for f in self.forks)))
        self.dismiss()

    def action_leave(self) -> None:
        """Back to the panes; a run still going finishes without stopping again."""
        if self.finished is None and not self.app_replaying:
            self.paused = True                 # whatever it is doing, "run" is its next command
            self._send(StepCommand(self.run_id, "run"))
        self.dismiss()
