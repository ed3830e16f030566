"""The Textual app: the settings, and the routing of engine events to the panes.

Data flows one way. The app reads a *source* (engine/source.py): live, the engine process
(tui/bridge.py), which takes the app's run and race requests; a recording (`replay`,
engine/player.py's Player), which the app steers instead; or a shared session on another
machine (`watch`, tui/share.py's WatchSource), which it only follows. Every source delivers
batches of engine envelopes (about 12 a second, whatever the token rate); the app hands each
run's events to the panes inside one `batch_update()`, so a batch is one repaint. The panes
(tui/widgets/) own their keys, state and drawing; the app never reaches inside them. The model
never runs in this process (tui/engine_process.py says why) and this process never imports
torch.
"""

from __future__ import annotations

import asyncio
import itertools
from functools import partial
from typing import Iterable

from textual import on
from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import Input

import themes
from engine.config import ConfigError
from engine.events import TYPE_NAMES, Envelope, Finished, RaceFinished, Ready, Started
from engine.requests import RunRequest
from engine.source import Source
from themes import ramps

from .commands import app_commands
from .follow import Follow, split
from .messages import EngineEvents
from .recorder import RecordSwitch
from .screens.help import HelpScreen
from .screens.main import MainScreen
from .screens.replay import ReplayScreen
from .screens.race import RaceScreen, exact_agree, verdict
from .screens.server import start_batch, to_server_screen
from .screens.settings import SettingsScreen
from .screens.step import StepScreen, to_step_screen
from .settings import (Settings, choices, fast_description, fork_race, next_choice,
                       race_started)
from .shots import save_screenshot

# Keys that ask the engine for something: a replay or a watched session has none to ask.
LIVE_ACTIONS = {"run", "stop", "cycle", "race", "settings", "record", "edit_prompt", "batch"}


class MiniLLMApp(App[int]):
    """Watch a small language model generate: tokens, KV cache, attention, latency."""

    CSS_PATH = "app.tcss"
    TITLE = "Mini LLM"
    ALLOW_IN_MAXIMIZED_VIEW = "Footer, StatusBar"

    # The footer shows the focused pane's keys first, then these in this order: help and quit
    # first, so that a narrow terminal never hides them (help lists every key).
    BINDINGS = [
        Binding("question_mark,f1", "help", "Help"),
        Binding("q", "quit", "Quit"),
        Binding("slash", "edit_prompt", "Prompt"),
        Binding("enter", "run", "Run"),
        Binding("x", "stop", "Stop"),
        Binding("R", "race", "Race"),
        Binding("B", "batch", "Server", show=False),
        Binding("o", "settings", "Sampling"),
        Binding("s", "cycle('strategy')", "Strategy"),
        Binding("b", "cycle('backend')", "Backend"),
        Binding("f", "cycle('fast')", "Fast"),
        Binding("n", "run(True)", "Step mode", show=False),
        Binding("t", "show_race", "Race table", show=False),
        Binding("r", "record", "Record", show=False),
        Binding("S", "screenshot", "Screenshot", show=False),
        Binding("T", "cycle_theme", "Theme", show=False),
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
        self.steerable = hasattr(source, "step")   # a recording: play, pause, step
        self.forced_depth = color_depth
        self.info: Ready | None = None             # the model, once the source says so
        self.ready_envelope: Envelope | None = None
        self.no_model: str | None = None           # why no model will come (a fatal failure)
        self.ids = itertools.count(1)              # run and race ids, as requests need them
        self.follow = Follow(follow_every_run=not source.live)
        self.recording = RecordSwitch(self.say, self.settings.record)
        self.share = None                          # tui/share.py's ShareServer with --share
        self._quiet = False                        # restoring a replay's state: no pop-ups

    def get_theme_variable_defaults(self) -> dict[str, str]:
        return dict(themes.VARIABLE_DEFAULTS)

    # ------------------------------------------------------------------ layout
    def get_default_screen(self) -> MainScreen:
        """The panes; steered with the replay keys when the source is a recording."""
        self.main = m = (ReplayScreen(self.source, self.settings.prompt) if self.steerable else
                         MainScreen(self.settings.prompt, read_only=not self.source.live))
        self.lanes, self.status = m.lanes, m.status
        return m

    def on_mount(self) -> None:
        for theme in themes.ALL:
            self.register_theme(theme)
        self.theme = themes.theme_name(self.settings.theme)

    @on(MainScreen.Ready)
    def start(self) -> None:
        """The panes are there: draw for this terminal, and start the source."""
        system = self.console.color_system
        self.main.attention.depth = self.forced_depth or ramps.depth_of(system)
        if system == "256" and not self.forced_depth:
            self.notify("256 colours, so heatmaps are grey; if the terminal has more "
                        "(COLORTERM is often lost over SSH): --truecolor", title="Colours",
                        timeout=10)
        self.status.show(self.settings)
        if hasattr(self.source, "url"):            # tui/share.py's WatchSource
            self.main.loading(f"connecting to {self.source.url}…")
            self.status.link = f"watching {self.source.url.removesuffix('/events')}"
        if self.settings.share:
            from .share import ShareServer
            self.share = ShareServer(self.settings.share, self.settings.to_json)
            self.run_worker(self.share.start(self.say, partial(setattr, self.status, "link")))
        loop = asyncio.get_running_loop()
        # The source calls from its own thread or from this one (a replay stepping on a key);
        # scheduling every post on the loop keeps the batches in the order of the calls.
        self.source.start(lambda envelopes, restart=False: loop.call_soon_threadsafe(
            self.post_message, EngineEvents(tuple(envelopes), restart)))

    async def on_unmount(self) -> None:
        self.source.stop()
        self.recording.stop(quiet=True)
        if self.share is not None:
            await self.share.stop()

    def say(self, text: str, **kw) -> None:
        """A notification — unless a replay is rebuilding its state after a step back."""
        if not self._quiet:
            self.notify(text, **{"timeout": 4, **kw})

    def check_action(self, action: str, parameters: tuple) -> bool | None:
        """Keys that ask the engine for something are hidden (and passed on to the focused
        pane) when the source takes no requests."""
        if action in LIVE_ACTIONS:
            return self.source.live
        return True

    # ------------------------------------------------------------------ engine events
    @on(EngineEvents)
    def draw(self, message: EngineEvents) -> None:
        if message.restart:
            self.reset_view()
        else:
            self.recording.write(message.envelopes)
        if self.share is not None:
            self.share.publish(message.envelopes, message.restart)
        self._quiet = message.restart
        try:
            with self.batch_update():
                self.route(message.envelopes)
            to_step_screen(self, message)
            to_server_screen(self, message)
        finally:
            self._quiet = False
        if self.steerable:
            self.main.show_position()

    def route(self, envelopes) -> None:
        """Each run's events go to the panes a batch at a time; the session's and races' own
        events to their handlers."""
        for run_id, item in split(envelopes):
            if run_id is not None:
                self.draw_run(run_id, item)
            else:       # loading, ready, failed, race_started, race_finished (a batch's: later)
                getattr(self, TYPE_NAMES[type(item.event)], lambda env: None)(item)

    def loading(self, env: Envelope) -> None:
        self.main.loading(env.event.text, env.event.fraction)
        self.status.model = "loading…"

    def ready(self, env: Envelope) -> None:
        self.info, self.ready_envelope, self.no_model = env.event, env, None
        self.main.loaded()
        self.status.show_model(env.event)
        if not self.source.live:
            return
        for text in self.settings.adopt(env.event):
            self.say(text, title="Settings", severity="error", timeout=8)
        self.status.show(self.settings)
        self.say(f"{env.event.model} ready on {env.event.device}", timeout=3)
        self.recording.ready(self.settings.to_json(), env)

    def failed(self, env: Envelope) -> None:
        self.say(env.event.message, title="Engine", severity="error", timeout=10)
        if env.event.fatal:
            self.no_model = env.event.message
            self.main.loading(env.event.message)
            self.status.model = "no model"
            self.follow.reset()

    def race_started(self, env: Envelope) -> None:
        """Drawn when the app asks for a race, and again (with the engine's warm-up) when the
        engine starts it, before any contestant's events."""
        race = env.event
        self.follow.begin_race(race)
        self.lanes.start([(c.run, c.label) for c in race.contestants], race.max_new_tokens,
                         race.prompt, race.warmup_tokens)
        self.main.show_lanes(True)
        if not self.source.live:
            self.main.prompt.value = race.prompt

    def race_finished(self, env: Envelope) -> None:
        race: RaceFinished = env.event
        self.lanes.finish(race)
        self.follow.end_race(race)
        self.status.identical, self.status.delta = exact_agree(race), race.max_delta
        if not self._quiet:
            self.say(verdict(race), title="Race finished", timeout=6,
                     severity="warning" if exact_agree(race) is False else "information")
            self.push_screen(RaceScreen(race, self.lanes.warmup))

    def draw_run(self, run_id: int, events: list) -> None:
        """One run's batch: to every pane, if it is the run being followed."""
        in_race = run_id in self.follow.race
        if not self.follow.take(run_id):
            return                         # a run we stopped following
        if in_race:
            self.lanes.feed(run_id, events)
        self.follow.see(run_id, events)
        self.main.feed(events)
        started = next((e for e in events if isinstance(e, Started)), None)
        if started is not None and not self.source.live and not in_race:
            self.settings.take_started(started)
            self.main.prompt.value = started.prompt
            self.status.show(self.settings)
        if isinstance(events[-1], Finished):
            self.finish(events[-1], in_race)

    def finish(self, ev: Finished, in_race: bool) -> None:
        """A single run ended (a race's verdict speaks for its contestants)."""
        if in_race:
            return
        self.follow.current = None
        if ev.reason == "error":
            self.say(ev.error or "the run failed", title="Engine", severity="error", timeout=10)
        elif ev.reason == "cancelled":
            self.say(f"stopped after {len(ev.tokens)} tokens", timeout=3)
        else:                              # the same greedy run as last time: same tokens?
            same = self.follow.same_as_before(self.settings.comparison_key, ev.tokens)
            if same is not None and self.settings.greedy:
                self.status.identical, self.status.delta = same, None

    def reset_view(self) -> None:
        """Forget everything drawn: a replay delivers the state again from its beginning."""
        if isinstance(self.screen, RaceScreen):
            self.pop_screen()
        self.main.clear()
        self.follow.reset()
        self.status.identical, self.status.delta = None, None

    # ------------------------------------------------------------------ requests
    def can_start(self) -> bool:
        if self.no_model:
            self.say(f"no model is loaded ({self.no_model}); restart the app, with --model if "
                     f"the path was wrong", severity="error")
            return False
        if self.follow.busy:
            self.say("a run is in progress: press x to stop it first", severity="warning")
            return False
        if not self.main.prompt.value.strip():
            self.say("the prompt is empty: type some text to continue", severity="warning")
            return False
        self.settings.prompt = self.main.prompt.value
        return True

    def submit(self, build):
        """Build a request (a ConfigError is said, not raised) and send it; None if refused."""
        if not self.can_start():
            return None
        try:
            request = build()
        except ConfigError as exc:
            self.say(str(exc), title="Settings", severity="error")
            return None
        self.source.submit(request)       # its events come through the loop, after this turn
        return request

    def action_run(self, step: bool = False) -> None:
        """`enter` runs the prompt; `n` runs it in step mode, on the step screen."""
        request = self.submit(lambda: RunRequest(self.settings.prompt, self.settings.config(),
                                                 next(self.ids), step=step))
        if request is not None:
            self.follow.current = request.run_id
            self.main.show_lanes(False)
            if step:
                self.push_screen(StepScreen(request.run_id, request))
            if self.info is None:
                self.say("the model is still loading; the run starts when it is ready")

    def action_race(self) -> None:
        self.start_race(lambda: self.settings.race(next(self.ids), self.ids, self.info))

    def on_step_screen_race_fork(self, message: StepScreen.RaceFork) -> None:
        """`R` on a finished fork: race it against the same request unforced."""
        self.start_race(lambda: fork_race(message.request, message.forces, self.ids))

    def start_race(self, build) -> None:
        race = self.submit(build)
        if race is not None:
            self.race_started(Envelope(race.race_id, 0.0, race_started(race)))
            self.say(f"racing {len(race.runs)} combinations, one after another")

    action_batch = start_batch     # `B`: many requests at once (tui/screens/server.py)

    def action_stop(self) -> None:
        if not self.follow.busy:
            self.say("nothing is running", timeout=2)
            return
        self.source.cancel()

    def set_option(self, name: str, value: str) -> None:
        """Strategy, backend or fast path for the next run (the keys, the palette)."""
        refused = self.settings.choose(name, value, choices(name, self.info))
        if refused:
            self.say(refused, severity="error")
            return
        self.status.show(self.settings)
        self.status.identical = None       # the badge compared other settings
        if name == "fast" and value:
            self.say(f"fast path: {fast_description(value)}")

    def action_cycle(self, name: str) -> None:
        """`s` `b` `f`: the next strategy, backend or fast path that can run here."""
        self.set_option(name, self.settings.next(name, choices(name, self.info)))

    def action_settings(self) -> None:
        self.push_screen(SettingsScreen(self.settings.sampling, self.settings.max_new_tokens),
                         self.take_sampling)

    def take_sampling(self, result: tuple[dict, int] | None) -> None:
        if result is not None:
            self.settings.sampling, self.settings.max_new_tokens = result
            self.status.show(self.settings)
            self.status.identical = None

    @on(Input.Changed, "#prompt")
    def prompt_changed(self) -> None:
        self.status.identical = None       # the badge was about another prompt

    @on(Input.Submitted, "#prompt")
    def prompt_submitted(self) -> None:
        self.main.action_focus_pane("tokens")
        self.action_run()

    def action_edit_prompt(self) -> None:
        self.main.prompt.edit()

    def action_record(self) -> None:
        """Start or stop writing what the engine sends to a recording (`replay` plays it)."""
        self.recording.toggle(self.settings.to_json(), self.ready_envelope)
        self.status.recording = self.recording.on

    # ------------------------------------------------------------------ views
    def action_show_race(self) -> None:
        if self.follow.last_race is None:
            self.say("no race yet: press R to race", timeout=3)
        else:
            self.push_screen(RaceScreen(self.follow.last_race, self.lanes.warmup))

    def action_cycle_theme(self) -> None:
        self.theme = next_choice([t.name for t in themes.ALL], self.theme)
        self.say(f"theme: {self.theme}", timeout=2)

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())

    def deliver_screenshot(self, filename: str | None = None, path: str | None = None,
                           time_format: str | None = None) -> str | None:
        """`S` and the palette's Screenshot: an SVG in the screenshots folder (--shots), its
        path in a notification; in a browser (`web`), a download."""
        if self.is_web:
            return super().deliver_screenshot(filename, path, time_format)
        return save_screenshot(self, self.settings.shots, self.say)

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        yield from app_commands(self)
