"""The Textual app: a prompt, four panes, a status bar, and keys for everything.

Data flows one way. The app reads a *source* (engine/source.py): live, the engine process
(tui/bridge.py), which takes the app's run and race requests; or a recording (`replay`,
engine/player.py's Player), which the app steers instead — play, pause, step a token forward
or back, speed. Either way the source delivers batches of engine envelopes (about 12 a second,
whatever the token rate), and the app routes each event to the panes inside `batch_update()`,
so a batch is one repaint. The model never runs in this process (tui/engine_process.py says why)
and this process never imports torch; nothing here waits on the engine. `r` (or --record)
writes what arrives to a recording.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from dataclasses import dataclass, field
from functools import partial, wraps
from typing import Iterable

from textual import events
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.css.query import NoMatches
from textual.containers import Container, Horizontal
from textual.screen import Screen
from textual.widgets import Footer, Input, Label, ProgressBar, Static

import themes
from engine.config import (FAST_CHOICES, ConfigError, FastPathConfig, GenerationConfig,
                           SamplingConfig)
from engine.events import (STEP_EVENTS, TYPE_NAMES, AttentionRow, CacheSnapshot, Contestant,
                           Envelope, Failed, Finished, FlashTiles, Forked, Prefill, RaceFinished,
                           RaceStarted, Ready, Started, Token, run_label)
from engine.player import Player
from engine.recording import Recorder, header
from engine.requests import RaceRequest, RunRequest
from engine.source import Source
from themes import ramps

from .messages import AttentionUpdated, CacheUpdated, EngineEvents
from .screens.help import HelpScreen
from .screens.race import RaceScreen, verdict
from .screens.settings import SettingsScreen
from .screens.step import StepScreen
from .widgets.attention import AttentionPane
from .widgets.kv_cache import KVCachePane
from .widgets.latency import LatencyPane
from .widgets.race_lanes import RaceLanes
from .widgets.status_bar import StatusBar
from .widgets.token_stream import TokenStream

STRATEGIES = ("naive", "kv", "paged")
DEFAULT_BACKENDS = ("naive", "sdpa", "flash", "triton")
MIN_WIDTH, MIN_HEIGHT, NARROW_WIDTH = 60, 18, 110
CHART_HZ = 4
RUN_EVENTS = (Started, Prefill, Token, CacheSnapshot, AttentionRow, FlashTiles, Finished,
              *STEP_EVENTS)
# Actions that ask the engine for something: a replay has no engine to ask.
LIVE_ACTIONS = {"edit_prompt", "run", "stop", "cycle_strategy", "cycle_backend", "cycle_fast",
                "race", "settings", "record", "step_mode"}


@dataclass
class Settings:
    """What the command line can set (engine/cli.py `add_ui_args`)."""
    model: str | None = None
    device: str = "auto"
    dtype: str = "float32"
    strategy: str = "kv"
    backend: str = "sdpa"
    prompt: str = "Deep learning is"
    max_new_tokens: int = 50
    theme: str = "dark"
    truecolor: bool = False
    sampling: dict = field(default_factory=lambda: dict(temperature=0.0))
    fast: str = ""                  # fast-path options ("c", "c+int8", …); "" = plain model
    flash_tile: int = 16            # keys per flash tile: small, so a short run shows several
    record: str | None = None       # write a recording here once the model is ready

    @classmethod
    def from_args(cls, args) -> "Settings":
        s = cls()
        for name in ("model", "device", "dtype", "strategy", "backend", "prompt",
                     "max_new_tokens", "theme", "truecolor", "fast", "flash_tile", "record"):
            if getattr(args, name, None) is not None:
                setattr(s, name, getattr(args, name))
        return s

    def config(self) -> GenerationConfig:
        """The engine's settings for the next run (the app always asks for attention rows)."""
        return GenerationConfig(strategy=self.strategy, backend=self.backend,
                                max_new_tokens=self.max_new_tokens,
                                sampling=SamplingConfig(**self.sampling),
                                fast=FastPathConfig.from_spec(self.fast),
                                flash_tile=self.flash_tile)

    def to_json(self) -> dict:
        """What a recording's header keeps of them."""
        return {"prompt": self.prompt, "config": self.config().to_dict()}

    def take(self, header: dict) -> None:
        """Adopt a recording header's settings (for a replay's status bar and prompt); a header
        that does not parse changes nothing — it is only what was shown at the start."""
        settings = header.get("settings") if isinstance(header, dict) else None
        if not isinstance(settings, dict):
            return
        try:
            cfg = GenerationConfig.from_dict(settings.get("config") or {})
        except ConfigError:
            return
        if isinstance(settings.get("prompt"), str):
            self.prompt = settings["prompt"]
        self.strategy, self.backend, self.fast = cfg.strategy, cfg.backend, cfg.fast.spec()
        self.max_new_tokens = cfg.max_new_tokens
        self.sampling = dataclasses.asdict(cfg.sampling)


FAST_TEXT = {
    "": "the plain PyTorch model (the reference)",
    "c": "the whole decode step in one C call — same tokens, faster",
    "fuse+cols": "fused Q/K/V and gate/up, weights stored (in, out) — same tokens",
    "c+int8": "C step on int8 weights — a quarter of the bytes; tokens may differ",
    "int8": "int8 weights (per-channel) — a quarter of the bytes; tokens may differ",
    "fp16": "16-bit weights, float32 arithmetic — half the bytes; tokens may differ",
}


def next_choice(choices, current):
    """The choice after `current`, wrapping round; the first one if `current` is not among them."""
    choices = list(choices)
    i = choices.index(current) if current in choices else -1
    return choices[(i + 1) % len(choices)]


def fast_description(spec: str) -> str:
    return FAST_TEXT.get(spec, spec)


def sampling_text(sampling: dict, max_new: int) -> str:
    t = sampling.get("temperature") or 0.0
    parts = ["greedy" if t == 0 else f"T={t:g}"]
    for key, short in (("top_k", "top-k"), ("top_p", "top-p"), ("min_p", "min-p"),
                       ("seed", "seed")):
        if sampling.get(key) is not None:
            parts.append(f"{short}={sampling[key]:g}")
    if sampling.get("repetition_penalty", 1.0) != 1.0:
        parts.append(f"rep={sampling['repetition_penalty']:g}")
    parts.append(f"max {max_new}")
    return " ".join(parts)


def closing_safe(handler):
    """Engine messages and timers can arrive while the app is closing, after its panes are
    gone; drawing them then is pointless, and must not end in a traceback."""
    @wraps(handler)
    def wrapper(self, *args):
        try:
            return handler(self, *args)
        except NoMatches:
            if not (self._exit or self._closing or not self.is_running):
                raise
    return wrapper


class MiniLLMApp(App[int]):
    """Watch a small language model generate: tokens, KV cache, attention, latency."""

    CSS_PATH = "app.tcss"
    TITLE = "Mini LLM"
    AUTO_FOCUS = "#tokens"

    BINDINGS = [
        Binding("slash", "edit_prompt", "Prompt"),
        Binding("enter", "run", "Run"),
        Binding("x", "stop", "Stop"),
        Binding("s", "cycle_strategy", "Strategy"),
        Binding("b", "cycle_backend", "Backend"),
        Binding("f", "cycle_fast", "Fast path"),
        Binding("R", "race", "Race"),
        Binding("n", "step_mode", "Step mode", show=False),
        Binding("r", "record", "Record", show=False),
        # A replay is steered instead (priority: the focused pane's scroll keys come second).
        Binding("space", "replay('toggle')", "Play/pause", priority=True),
        Binding("left", "replay('back')", "◀ token", priority=True),
        Binding("right", "replay('forward')", "token ▶", priority=True),
        Binding("minus", "replay('slower')", "Slower", priority=True),
        Binding("plus,equals_sign", "replay('faster')", "Faster", priority=True),
        Binding("home", "replay('start')", "Start", show=False, priority=True),
        Binding("end", "replay('end')", "End", show=False, priority=True),
        Binding("t", "show_race", "Race table", show=False),
        Binding("l", "toggle_lanes", "Race lanes", show=False),
        Binding("o", "settings", "Sampling"),
        Binding("left_square_bracket", "attention('layer', -1)", "Layer−", show=False),
        Binding("right_square_bracket", "attention('layer', 1)", "Layer+", show=False),
        Binding("left_curly_bracket", "attention('head', -1)", "Head−", show=False),
        Binding("right_curly_bracket", "attention('head', 1)", "Head+", show=False),
        Binding("m", "attention('mode', 0)", "Row/matrix/flash", show=False),
        Binding("p", "attention('play', 0)", "Flash play/pause", show=False),
        Binding("full_stop", "attention('step', 1)", "Flash step", show=False),
        Binding("k", "tokens('boundaries')", "Token shades", show=False),
        Binding("c", "tokens('latency')", "Latency colours", show=False),
        Binding("T", "cycle_theme", "Theme", show=False),
        Binding("C", "cycle_depth", "Colour depth", show=False),
        Binding("question_mark,f1", "help", "Help"),
        Binding("q", "quit", "Quit"),
    ]

    def __init__(self, settings: Settings | None = None, source: Source | None = None,
                 color_depth: str | None = None) -> None:
        super().__init__()
        self.settings = settings or Settings()
        if source is None:
            from .bridge import ProcessSource
            s = self.settings
            source = ProcessSource(s.model, s.device, s.dtype)
        self.source = source
        self.replaying = not source.live        # a recording: steer it, ask it nothing
        self.forced_depth = color_depth
        self.info: Ready | None = None          # the model, once the source says it is ready
        self.ready_envelope: Envelope | None = None
        self.run_counter = 0
        self.current_run: int | None = None     # the run whose events are drawn
        self.race_id: int | None = None         # the race being drawn
        self.race_runs: dict[int, str] = {}     # run_id → "strategy/backend" of a live race
        self.racing = False
        self.last_race: RaceFinished | None = None
        self.last_single: tuple | None = None   # (prompt, sampling, tokens) of the last run
        self.finished: list = []                # Finished events, newest last (tests read it)
        self.batches_drawn = self.events_drawn = 0
        self.engine_gone = False                # the engine process died: no more runs
        self.recorder = None                    # engine.recording.Recorder while recording
        self.record_armed: str | None = settings.record if settings else None
        self._quiet = False                     # restoring a replay's state: no pop-ups
        self.forked_runs: set[int] = set()      # step-mode runs with a forced token

    def get_theme_variable_defaults(self) -> dict[str, str]:
        return dict(themes.VARIABLE_DEFAULTS)

    # ------------------------------------------------------------------ layout
    def compose(self) -> ComposeResult:
        with Horizontal(id="prompt-row"):
            prompt = Input(self.settings.prompt, placeholder="Type a prompt, enter runs it",
                           id="prompt")
            prompt.can_focus = not self.replaying     # a replay shows the prompt it plays
            yield prompt
        with Horizontal(id="loading"):
            yield Label("starting the engine…", id="loading-text")
            yield ProgressBar(total=1.0, show_eta=False, id="load-progress")
        with Container(id="panes"):
            yield TokenStream(id="tokens")
            yield RaceLanes(id="lanes")       # in the token stream's place while racing
            yield AttentionPane(id="attention")
            yield KVCachePane(id="kv")
            yield LatencyPane(id="latency")
        yield Static(f"The window is too small.\nMake it at least {MIN_WIDTH}×{MIN_HEIGHT} "
                     f"(columns × rows).", id="too-small")
        yield StatusBar(id="status")
        yield Footer()

    def on_mount(self) -> None:
        for theme in themes.ALL:
            self.register_theme(theme)
        self.theme = themes.theme_name(self.settings.theme)
        titles = {"tokens": "Token stream", "lanes": "Race", "attention": "Attention",
                  "kv": "KV cache", "latency": "Latency"}
        for wid, title in titles.items():
            self.query_one(f"#{wid}").border_title = title
        depth = self.forced_depth or ramps.depth_of(self.console.color_system)
        self.query_one(AttentionPane).depth = depth
        self._update_status()
        self._apply_size(self.size.width, self.size.height)
        self.set_interval(1 / CHART_HZ, self._redraw_charts)
        if self.replaying:
            self.query_one("#loading-text", Label).update("reading the recording…")
            notice = getattr(getattr(self.source, "recording", None), "notice", None)
            if notice:
                self.notify(notice, title="Recording damaged", severity="warning", timeout=12)
        self._loop_for_events = asyncio.get_running_loop()
        self.source.start(self._deliver)

    def _deliver(self, envelopes, restart: bool = False) -> None:
        """The source's callback: one message per batch, in the order of the calls.

        Calls may come from the source's thread or from this one (a replay stepping when a key
        is pressed). post_message queues at once from this thread but only later from another,
        which could swap two batches; scheduling every post on the event loop keeps them in
        call order."""
        self._loop_for_events.call_soon_threadsafe(
            self.post_message, EngineEvents(tuple(envelopes), restart))

    def on_unmount(self) -> None:
        self.source.stop()
        self._stop_recording(quiet=True)

    def on_resize(self, event: events.Resize) -> None:
        self._apply_size(event.size.width, event.size.height)

    def _apply_size(self, width: int, height: int) -> None:
        self.set_class(width < MIN_WIDTH or height < MIN_HEIGHT, "-too-small")
        self.set_class(width < NARROW_WIDTH, "-narrow")

    def _update_status(self) -> None:
        bar = self.query_one(StatusBar)
        s = self.settings
        bar.strategy, bar.backend, bar.fast = s.strategy, s.backend, s.fast
        bar.sampling = sampling_text(s.sampling, s.max_new_tokens)

    @closing_safe
    def _redraw_charts(self) -> None:
        self.query_one(LatencyPane).redraw()

    def check_action(self, action: str, parameters: tuple) -> bool | None:
        """Live keys ask the engine for something; replay keys steer a recording. Each kind is
        hidden (and its key passed on) where it means nothing."""
        if action == "replay":
            return self.replaying
        if action in LIVE_ACTIONS:
            return not self.replaying
        return True

    def say(self, text: str, **kw) -> None:
        """A notification — unless a replay is rebuilding its state after a step back."""
        if not self._quiet:
            self.notify(text, **kw)

    # ------------------------------------------------------------------ engine events
    @closing_safe
    def on_engine_events(self, message: EngineEvents) -> None:
        if message.restart:
            self._reset_view()
        elif self.recorder is not None:
            self._record(message.envelopes)
        self._quiet = message.restart
        try:
            with self.batch_update():
                self._route(message.envelopes)
            self._to_step_screen(message)
        finally:
            self._quiet = False
        if self.replaying:
            self._show_replay_state()

    def _route(self, envelopes) -> None:
        """Runs' events go to the panes a batch at a time; the session's and races' own events
        to their handlers (_engine_ready, _engine_race_started, …)."""
        group: list = []
        run = None
        for env in envelopes:
            if isinstance(env.event, RUN_EVENTS):
                if group and env.run != run:
                    self._run_events(run, group)
                    group = []
                run = env.run
                group.append(env.event)
                continue
            if group:
                self._run_events(run, group)
                group = []
            getattr(self, f"_engine_{TYPE_NAMES[type(env.event)]}")(env)
        if group:
            self._run_events(run, group)

    def _engine_loading(self, env: Envelope) -> None:
        self.query_one("#loading-text", Label).update(env.event.text)
        self.query_one("#load-progress", ProgressBar).update(progress=env.event.fraction)
        self.query_one(StatusBar).model = "loading…"

    def _engine_ready(self, env: Envelope) -> None:
        self.info = info = env.event
        self.ready_envelope = env
        self.query_one("#loading").add_class("-done")
        bar = self.query_one(StatusBar)
        bar.model, bar.device, bar.dtype = info.model, info.device, info.dtype
        if self.replaying:
            return
        reason = info.backends.get(self.settings.backend, "unknown backend")
        if self.settings.backend not in info.backends or reason:
            self.notify(f"backend {self.settings.backend!r} is unavailable here: {reason}; "
                        f"using sdpa", title="Backend", severity="error", timeout=8)
            self.settings.backend = "sdpa"
            self._update_status()
        reason = self._fast_reasons().get(self.settings.fast, "not one of the app's choices")
        if reason:
            self.notify(f"fast path {self.settings.fast!r} is unavailable here: {reason}; "
                        f"using the plain model", title="Fast path", severity="error", timeout=8)
            self.settings.fast = ""
            self._update_status()
        self.notify(f"{info.model} ready on {info.device}", timeout=3)
        if self.record_armed:
            self._start_recording(self.record_armed)

    def _engine_failed(self, env: Envelope) -> None:
        ev: Failed = env.event
        self.say(ev.message, title="Engine", severity="error", timeout=10)
        if ev.fatal:
            self.query_one("#loading-text", Label).update(ev.message)
            self.query_one(StatusBar).model = "no model"
            if "process" in ev.message:
                self.engine_gone = True
                self.current_run, self.racing = None, False

    def _engine_race_started(self, env: Envelope) -> None:
        if self.racing and self.race_id == env.run:
            return                         # the app began drawing it when it asked for it
        self._begin_race(env.run, env.event)

    def _begin_race(self, race_id: int, race: RaceStarted) -> None:
        self.race_id, self.racing = race_id, True
        self.race_runs = {c.run: c.label for c in race.contestants}
        self.current_run = race.contestants[0].run if race.contestants else None
        self.query_one(RaceLanes).start(list(self.race_runs.items()), race.max_new_tokens,
                                        race.prompt)
        self.show_lanes(True)
        if self.replaying:
            self.query_one("#prompt", Input).value = race.prompt

    def _engine_race_finished(self, env: Envelope) -> None:
        race: RaceFinished = env.event
        self.query_one(RaceLanes).finish(race)
        self.racing = False
        self.current_run = None
        self.race_runs.clear()
        self.last_race = race
        bar = self.query_one(StatusBar)
        bar.identical, bar.delta = race.identical, race.max_delta
        if not self._quiet:
            self.notify(verdict(race), title="Race finished", timeout=6,
                        severity="information" if race.identical is not False else "warning")
            self.push_screen(RaceScreen(race))

    def _run_events(self, run_id: int, events: list) -> None:
        if self.replaying and not self.racing:
            self.current_run = run_id      # a replay follows every run it plays
        in_race = self.racing and run_id in self.race_runs
        if in_race and (self.current_run is None or run_id > self.current_run):
            self.current_run = run_id      # the race moved on to its next contestant
        if run_id != self.current_run:
            return                         # a run we stopped following
        if in_race:
            self.query_one(RaceLanes).feed(run_id, events)
        self._draw_events(events)

    def _draw_events(self, events: list) -> None:
        tokens = self.query_one(TokenStream)
        attention = self.query_one(AttentionPane)
        kv = self.query_one(KVCachePane)
        latency = self.query_one(LatencyPane)
        pieces, points, rows, snapshot, finished = [], [], [], None, None
        self.batches_drawn += 1
        self.events_drawn += len(events)
        for ev in events:
            if isinstance(ev, Token):
                pieces.append((ev.text, False, ev.latency_s))
                attention.pieces.append(ev.text)
                points.append((ev.position, ev.latency_s))
            elif isinstance(ev, CacheSnapshot):
                snapshot = ev.stats          # only the newest is drawn …
                if snapshot.kind == "none":  # … but naive's recomputation adds up
                    kv.recomputed_total += snapshot.recomputed_tokens
            elif isinstance(ev, AttentionRow):
                rows.append(ev)
            elif isinstance(ev, FlashTiles):
                attention.show_flash(ev)
            elif isinstance(ev, Prefill):
                tokens.set_prompt(ev.prompt_pieces)
                attention.reset(ev.prompt_pieces)
            elif isinstance(ev, Started):
                tokens.clear()
                kv.reset()
                attention.reset()
                latency.start_run(run_label(ev.strategy, ev.backend, ev.fast))
                if self.replaying and not self.racing:
                    self._show_replayed_settings(ev)
            elif isinstance(ev, Finished):
                finished = ev
        if pieces:
            tokens.append(pieces)
        if points:
            latency.add_points(points)
        if rows:
            attention.add_rows(rows)
            attention.post_message(AttentionUpdated(rows[-1].position))
        if snapshot is not None:
            kv.post_message(CacheUpdated(snapshot))
        if finished is not None:
            self._finish(finished)

    def _finish(self, ev: Finished) -> None:
        self.finished.append(ev)
        if ev.metrics is not None:
            self.query_one(LatencyPane).show_metrics(ev.metrics, ev.reason)
        if ev.tail:
            self.query_one(TokenStream).append([(ev.tail, False, 0.0)])
        if ev.reason == "error":
            self.say(ev.error or "the run failed", title="Engine", severity="error", timeout=10)
        if self.racing:
            return
        self.current_run = None
        if ev.reason == "cancelled":
            self.say(f"stopped after {len(ev.tokens)} tokens", timeout=3)
        elif ev.reason == "error":
            return
        s = self.settings
        key = (s.prompt, tuple(sorted(s.sampling.items())), s.max_new_tokens)
        if (ev.reason != "cancelled" and self.last_single is not None
                and self.last_single[0] == key and (s.sampling.get("temperature") or 0) == 0):
            bar = self.query_one(StatusBar)
            bar.identical, bar.delta = self.last_single[1] == ev.tokens, None
        if ev.reason != "cancelled":
            self.last_single = (key, ev.tokens)

    def _reset_view(self) -> None:
        """Forget everything drawn: a replay delivers the state again from its beginning."""
        if isinstance(self.screen, RaceScreen):
            self.pop_screen()
        self.query_one(TokenStream).clear()
        self.query_one(KVCachePane).reset()
        self.query_one(AttentionPane).reset()
        self.query_one(LatencyPane).reset()
        self.query_one(RaceLanes).clear()
        self.show_lanes(False)
        self.current_run, self.race_id, self.racing = None, None, False
        self.race_runs, self.last_race, self.last_single = {}, None, None
        self.finished = []
        bar = self.query_one(StatusBar)
        bar.identical, bar.delta = None, None

    # ------------------------------------------------------------------ replay
    def _show_replayed_settings(self, ev: Started) -> None:
        """A replayed single run shows its own settings, as the live app showed them."""
        s = self.settings
        s.strategy, s.backend, s.fast, s.prompt = ev.strategy, ev.backend, ev.fast, ev.prompt
        s.max_new_tokens, s.sampling = ev.max_new_tokens, dataclasses.asdict(ev.sampling)
        self.query_one("#prompt", Input).value = ev.prompt
        self._update_status()

    def _show_replay_state(self) -> None:
        st = self.source.state
        mark = "■" if st.at_end else ("▶" if st.playing else "⏸")
        short = f"{mark} {st.speed:g}× · {st.token}/{st.tokens}"
        self.query_one(StatusBar).replay = short if self.size.width < NARROW_WIDTH else (
            f"{mark} replay {st.speed:g}× · token {st.token}/{st.tokens} · "
            f"{st.seconds:.1f}/{st.duration:.1f} s")

    def action_replay(self, what: str) -> None:
        """Steer a replay: toggle, forward, back, faster, slower, start, end."""
        player = self.source
        {"toggle": player.toggle, "forward": lambda: player.step(1),
         "back": lambda: player.step(-1), "faster": lambda: player.faster(1),
         "slower": lambda: player.faster(-1), "start": player.to_start,
         "end": player.to_end}[what]()
        self._show_replay_state()

    # ------------------------------------------------------------------ step mode
    def action_step_mode(self) -> None:
        """Run the prompt in step mode: the run stops before each token (tui/screens/step.py)."""
        if not self._can_start():
            return
        prompt, config = self._prompt_text(), self._config()
        if prompt is None or config is None:
            return
        request = RunRequest(prompt, config, self._next_run_id(), step=True)
        self.current_run = request.run_id
        self.show_lanes(False)
        self._loading_note()
        self.push_screen(StepScreen(request.run_id, request))
        self.source.submit(request)

    def _to_step_screen(self, message: EngineEvents) -> None:
        """A step screen sees every batch (it keeps its own run's events); a replay opens one
        when a step-mode run starts. A fork is no baseline for the identical-tokens badge."""
        screen = next((s for s in self.screen_stack if isinstance(s, StepScreen)), None)
        if screen is None and self.replaying:
            runs = [e.run for e in message.envelopes if isinstance(e.event, Started)
                    and e.event.step]
            if runs:
                screen = StepScreen(runs[-1])
                self.push_screen(screen)
        if screen is not None:
            screen.post_message(message)
        for env in message.envelopes:
            if isinstance(env.event, Forked):
                self.forked_runs.add(env.run)
            elif isinstance(env.event, Finished) and env.run in self.forked_runs:
                self.last_single = None

    def on_step_screen_race_fork(self, message: StepScreen.RaceFork) -> None:
        """Race the step screen's fork against the same request unforced."""
        if not self._can_start():
            return
        race_id = self._next_run_id()
        plain = dataclasses.replace(message.request, step=False, run_id=self._next_run_id())
        runs = (plain, dataclasses.replace(plain, forces=message.forces,
                                           run_id=self._next_run_id()))
        self._begin_race(race_id, RaceStarted(
            prompt=plain.prompt, max_new_tokens=plain.config.max_new_tokens,
            contestants=tuple(Contestant(r.run_id, r.label) for r in runs)))
        self.source.submit(RaceRequest(race_id, runs))

    # ------------------------------------------------------------------ recording
    def action_record(self) -> None:
        """Start or stop writing what the engine sends to a recording (`replay` plays it)."""
        if self.recorder is not None or self.record_armed and self.info is None:
            self._stop_recording()
            return
        path = self.settings.record or time.strftime("minillm-%Y%m%d-%H%M%S.jsonl.gz")
        if self.info is None:
            self.record_armed = path
            self.notify(f"recording to {path} once the model is ready", timeout=4)
            return
        self._start_recording(path)

    def _start_recording(self, path: str) -> None:
        self.record_armed = None
        try:
            self.recorder = Recorder(path, header(self.settings.to_json(), self.info, "app"))
        except (OSError, ConfigError) as exc:
            self.notify(f"cannot record to {path}: {exc}", title="Record", severity="error")
            return
        self.recorder.write([self.ready_envelope])
        self.query_one(StatusBar).recording = True
        self.notify(f"recording to {path} (r stops)", timeout=4)

    def _record(self, envelopes) -> None:
        try:
            self.recorder.write(envelopes)
        except OSError as exc:
            self.notify(f"recording stopped: {exc}", title="Record", severity="error")
            self._stop_recording(quiet=True)

    def _stop_recording(self, quiet: bool = False) -> None:
        self.record_armed = None
        if self.recorder is None:
            return
        rec, self.recorder = self.recorder, None
        try:
            rec.close()
        except OSError:
            pass
        if not quiet:
            self.query_one(StatusBar).recording = False
            self.notify(f"recorded {rec.events} events to {rec.path}; "
                        f"`python main.py replay {rec.path}` plays them", timeout=6)

    # ------------------------------------------------------------------ actions
    @property
    def busy(self) -> bool:
        return self.current_run is not None or self.racing

    def _next_run_id(self) -> int:
        self.run_counter += 1
        return self.run_counter

    def _prompt_text(self) -> str | None:
        text = self.query_one("#prompt", Input).value
        if not text.strip():
            self.notify("the prompt is empty: type some text to continue", severity="warning")
            return None
        self.settings.prompt = text
        return text

    def _can_start(self) -> bool:
        if self.engine_gone:
            self.notify("the engine process has stopped; restart the app", severity="error")
            return False
        if self.busy:
            self.notify("a run is in progress: press x to stop it first", severity="warning")
            return False
        return True

    def _loading_note(self) -> None:
        if self.info is None:
            self.notify("the model is still loading; the run starts when it is ready",
                        timeout=4)

    def _config(self) -> GenerationConfig | None:
        try:
            return self.settings.config()
        except ConfigError as exc:
            self.notify(str(exc), title="Settings", severity="error")
            return None

    def action_run(self) -> None:
        if not self._can_start():
            return
        prompt = self._prompt_text()
        config = self._config()
        if prompt is None or config is None:
            return
        run_id = self._next_run_id()
        self.current_run = run_id
        self.show_lanes(False)
        self._loading_note()
        self.source.submit(RunRequest(prompt, config, run_id))

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id == "prompt" and not self.replaying:
            self.query_one(TokenStream).focus()
            self.action_run()

    def on_key(self, event: events.Key) -> None:
        if event.key == "escape" and isinstance(self.focused, Input):
            self.query_one(TokenStream).focus()
            event.stop()

    def action_edit_prompt(self) -> None:
        self.query_one("#prompt", Input).focus()

    def action_stop(self) -> None:
        if not self.busy:
            self.notify("nothing is running", timeout=2)
            return
        self.source.cancel()

    def race_combos(self) -> list[tuple[str, str, str]]:
        """Every strategy on sdpa, every other backend that can run here on kv, then kv with
        the exact fast-path options that can run here (same tokens, only faster) — and the
        fast-path option chosen with `f`, if it is another one (int8 shows its divergence)."""
        combos = [(s, "sdpa", "") for s in STRATEGIES]
        for name, reason in self._backends().items():
            if name != "sdpa" and reason is None:
                combos.append(("kv", name, ""))
        reasons = self._fast_reasons()
        for spec in dict.fromkeys(("c", "fuse+cols", self.settings.fast)):
            if spec and reasons.get(spec, "unknown") is None:
                combos.append(("kv", "sdpa", spec))
        return combos

    def action_race(self) -> None:
        if not self._can_start():
            return
        prompt = self._prompt_text()
        base = self._config()
        if prompt is None or base is None:
            return
        race_id = self._next_run_id()
        runs = tuple(RunRequest(prompt, dataclasses.replace(
                         base, strategy=s, backend=b, fast=FastPathConfig.from_spec(f)),
                         self._next_run_id())
                     for s, b, f in self.race_combos())
        labels = [run_label(*combo) for combo in self.race_combos()]
        self._begin_race(race_id, RaceStarted(
            prompt=prompt, max_new_tokens=base.max_new_tokens,
            contestants=tuple(Contestant(r.run_id, label) for r, label in zip(runs, labels))))
        self._loading_note()
        self.notify(f"racing {len(runs)} combinations: {', '.join(labels)}", timeout=4)
        self.source.submit(RaceRequest(race_id, runs))

    def _backends(self) -> dict[str, str | None]:
        if self.info is not None:
            return self.info.backends
        return {name: None for name in DEFAULT_BACKENDS}

    def _fast_reasons(self) -> dict[str, str | None]:
        """Fast-path choices → None if usable here, else why not (known once the model loads)."""
        if self.info is not None and self.info.fast:
            return self.info.fast
        return {spec: None for spec in FAST_CHOICES}

    def set_fast(self, spec: str) -> None:
        reason = self._fast_reasons().get(spec, "not one of the app's choices")
        if reason:
            self.notify(f"fast path {spec!r} is unavailable here: {reason}", title="Fast path",
                        severity="error")
            return
        self.settings.fast = spec
        self._update_status()
        if spec:
            self.notify(f"fast path: {fast_description(spec)}", timeout=4)

    def action_cycle_fast(self) -> None:
        """Next usable fast-path option (docs/fast_path.md); "" is the plain model."""
        reasons = self._fast_reasons()
        self.set_fast(next_choice([s for s in FAST_CHOICES if reasons.get(s) is None],
                                  self.settings.fast))

    def set_strategy(self, name: str) -> None:
        self.settings.strategy = name
        self._update_status()

    def set_backend(self, name: str) -> None:
        reason = self._backends().get(name, "unknown backend")
        if reason:
            self.notify(f"backend {name!r} is unavailable here: {reason}", title="Backend",
                        severity="error")
            return
        self.settings.backend = name
        self._update_status()

    def action_cycle_strategy(self) -> None:
        self.set_strategy(next_choice(STRATEGIES, self.settings.strategy))

    def action_cycle_backend(self) -> None:
        usable = [n for n, reason in self._backends().items() if reason is None]
        if usable:
            self.set_backend(next_choice(usable, self.settings.backend))

    def show_lanes(self, show: bool) -> None:
        """The race lanes in the token stream's place (show) or the token stream back."""
        if show == self.has_class("-lanes"):
            return
        self.set_class(show, "-lanes")
        focused = self.focused
        if focused is None or isinstance(focused, (TokenStream, RaceLanes)):
            self.query_one(RaceLanes if show else TokenStream).focus()

    def action_toggle_lanes(self) -> None:
        if not self.query_one(RaceLanes).lanes:
            self.notify("no race yet: press R to race", timeout=3)
            return
        self.show_lanes(not self.has_class("-lanes"))

    def action_show_race(self) -> None:
        if self.last_race is None:
            self.notify("no race yet: press R to race", timeout=3)
            return
        self.push_screen(RaceScreen(self.last_race))

    def action_settings(self) -> None:
        def done(result) -> None:
            if result is not None:
                self.settings.sampling, self.settings.max_new_tokens = result
                self._update_status()
        self.push_screen(SettingsScreen(self.settings.sampling, self.settings.max_new_tokens),
                         done)

    def action_attention(self, what: str, delta: int) -> None:
        pane = self.query_one(AttentionPane)
        if what == "mode":
            pane.action_toggle_mode()
        elif what == "play":
            pane.action_flash_play()
        elif what == "step":
            pane.action_flash_step()
        elif what == "layer":
            pane.action_layer(delta)
        else:
            pane.action_head(delta)

    def action_tokens(self, what: str) -> None:
        pane = self.query_one(TokenStream)
        if what == "latency":
            pane.action_toggle_latency()
        else:
            pane.action_toggle_boundaries()

    def action_cycle_theme(self) -> None:
        names = [t.name for t in themes.ALL]
        i = names.index(self.theme) if self.theme in names else -1
        self.theme = names[(i + 1) % len(names)]
        self.notify(f"theme: {self.theme}", timeout=2)

    def action_cycle_depth(self) -> None:
        pane = self.query_one(AttentionPane)
        order = ["truecolor", "256", "16"]
        pane.depth = order[(order.index(pane.depth) + 1) % 3]
        self.notify(f"heatmap drawn for {pane.depth} colours", timeout=2)

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        if self.replaying:                 # a recording takes no requests
            yield SystemCommand("Help", "What each pane shows and why it matters",
                                self.action_help)
            return
        yield SystemCommand("Run", "Generate from the prompt", self.action_run)
        yield SystemCommand("Stop", "Stop the current run or race", self.action_stop)
        yield SystemCommand("Race", "Same prompt through every strategy/backend",
                            self.action_race)
        for name in STRATEGIES:
            yield SystemCommand(f"Strategy: {name}", f"Decode with the {name} strategy",
                                partial(self.set_strategy, name))
        for name, reason in self._backends().items():
            yield SystemCommand(f"Backend: {name}",
                                reason or f"Attention computed by the {name} backend",
                                partial(self.set_backend, name))
        for spec in FAST_CHOICES:
            yield SystemCommand(f"Fast path: {spec or 'off'}", fast_description(spec),
                                partial(self.set_fast, spec))
        yield SystemCommand("Sampling settings", "Temperature, top-k/p, seed, max tokens",
                            self.action_settings)
        yield SystemCommand("Help", "What each pane shows and why it matters", self.action_help)


def force_truecolor(settings: Settings) -> bool:
    """--truecolor or MINILLM_TRUECOLOR=1: draw 24-bit colour whatever the terminal claims.

    Rich reads COLORTERM when the app's console is created; over SSH it is often not forwarded,
    and the app would fall back to 256 colours on a terminal that has millions.
    """
    if settings.truecolor or os.environ.get("MINILLM_TRUECOLOR", "") not in ("", "0"):
        os.environ["COLORTERM"] = "truecolor"
        return True
    return False


def settings_error(settings: Settings) -> str | None:
    """What is wrong with settings given on the command line, said plainly; None if nothing."""
    from engine.config import STRATEGIES as known
    if settings.strategy not in known:
        return f"unknown strategy {settings.strategy!r}; choose one of: {', '.join(known)}"
    if settings.flash_tile <= 0:
        return f"--flash-tile must be a positive number of keys, got {settings.flash_tile}"
    if settings.fast not in FAST_CHOICES:
        return (f"--fast {settings.fast!r} is not one of the app's fast-path choices: "
                f"{', '.join(repr(c) for c in FAST_CHOICES)} ('' = the plain model; the bench "
                f"takes any combination)")
    return None


def run_app(args) -> int:
    """Entry point for `python main.py` (engine/cli.py `cmd_ui`)."""
    settings = Settings.from_args(args)
    force_truecolor(settings)
    error = settings_error(settings)
    if error:
        print(f"error: {error}")
        return 2
    app = MiniLLMApp(settings)
    app.run()
    return 0


def run_replay(recording, args) -> int:
    """Entry point for `python main.py replay FILE` (engine/cli.py `cmd_replay`): the app on a
    recording — no engine process, no torch, no model."""
    settings = Settings(theme=args.theme, truecolor=args.truecolor)
    settings.take(recording.header)
    force_truecolor(settings)
    app = MiniLLMApp(settings, source=Player(recording, speed=args.speed,
                                             playing=not args.paused))
    app.run()
    return 0
