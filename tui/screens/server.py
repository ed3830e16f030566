"""The server view: many requests served at once by the batching engine, drawn as they go.

    Server · continuous batching on one paged KV pool · SmolLM2 · sdpa · 8 at once · 32 blocks
    16 requests · 4 waiting · 8 running · 4 done · batch 8 · step 61 · 1 preempted
    412.3 tok/s aggregate · 388 new tokens · prefix cache 702/1104 prompt tokens
    same memory, one contiguous reservation each: 4 of 16 fit · paged: up to 8 at once
    ╭─ KV block pool ───────────────────────────────────────────────────────────╮
    │ ×8 ×8 ×8 ██ ██ █░ ██ █░ ██ ██ █░ ...                                       │
    ╰────────────────────────────────────────────────────────────────────────────╯
    r7 preempted: 5 blocks freed, 98 tokens to recompute
    ╭─ Requests ────────────────────────────────────────────────────────────────╮
    │ ██ r0 ▶ ━━━━━───── 23/50  TTFT 410 ms  TPOT  88 ms │ … its text           │

`B` in the app starts a batch — the prompts of `--prompts FILE`, or the built-in ones
(engine/workload.py: 16 questions behind one system prompt) — with the app's sampling and
length, and shows this screen; `x` stops the batch, escape goes back to the panes (the batch
goes on; `B` shows it again while it runs, and starts a new one once it is over). A replay
or a watched session opens it when a batch begins, and the replay keys steer it here too.

Everything drawn comes from the batch's events (tui/server_view.py keeps them).
"""

from __future__ import annotations

from textual import events
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer, Static

from engine.workload import read_prompts
from engine.config import ConfigError
from engine.events import BatchStarted
from engine.requests import BatchRequest
from engine.workload import BUILTIN_PROMPTS

from ..server_view import BatchView
from ..widgets.block_pool import BlockPool
from ..widgets.request_lanes import RequestLanes
from ..widgets.server_stats import EventLog, ServerStats
from .replay import steer_bindings

NAME = "server"
# The app's batch: up to 8 requests at once, arriving about 4 a second, in a pool that would
# hold a contiguous reservation for only 2 of the longest — the paged pool runs 6 to 8 in it
# (the embedded model, 16 built-in prompts), and preempts when their answers outgrow it.
MAX_BATCH, ARRIVAL_RATE, RESERVE_FOR = 8, 4.0, 2
LOG_WIDE = 110          # from this width the log gets a pane of its own beside the pool


def batch_prompts(path: str | None) -> tuple[str, ...]:
    """The prompts of `--prompts FILE` (ConfigError with one line if it cannot be read), or
    the built-in set."""
    if path is None:
        return BUILTIN_PROMPTS
    return tuple(p for _, p in read_prompts(path))


def server_screen(app) -> "ServerScreen":
    if not app.is_screen_installed(NAME):
        app.install_screen(ServerScreen(), NAME)
    return app.get_screen(NAME)


def show(app) -> None:
    if app.screen is not server_screen(app):
        app.push_screen(NAME)


def start_batch(app) -> None:
    """`B`: a new batch with the app's settings, on the server screen; while one is running,
    show it."""
    screen = server_screen(app)
    if screen.view.batch_id is not None and not screen.view.over and \
            app.follow.current == screen.view.batch_id:
        show(app)
        return
    if app.no_model or app.follow.busy:
        app.say(f"no model is loaded ({app.no_model})" if app.no_model else
                "a run is in progress: press x to stop it first", severity="warning")
        return
    try:
        request = BatchRequest(batch_prompts(app.settings.prompts), app.settings.config(),
                               next(app.ids), max_batch=MAX_BATCH, reserve_for=RESERVE_FOR,
                               arrival_rate=ARRIVAL_RATE)
    except ConfigError as exc:
        app.say(str(exc), title="Prompts", severity="error")
        return
    screen.view.reset()
    screen.view.batch_id = request.batch_id
    app.follow.current = request.batch_id          # busy: `x` stops it, enter waits
    app.source.submit(request)
    show(app)
    screen.redraw()
    app.say(f"serving {len(request.prompts)} requests at once")


def to_server_screen(app, message) -> None:
    """The app hands every batch of envelopes here: the server view keeps its batch's events
    (a replay or a watcher opens it when a batch begins), and the app is free again when the
    batch ends."""
    started = any(isinstance(e.event, BatchStarted) for e in message.envelopes)
    if not started and not app.is_screen_installed(NAME):
        return
    screen = server_screen(app)
    view = screen.view
    if message.restart:
        view.reset()
    if view.feed(message.envelopes):
        screen.redraw()
        if view.over and app.follow.current == view.batch_id:
            app.follow.current = None
    if started and not app.source.live:
        show(app)
    elif message.restart and view.batch_id is None and app.screen is screen:
        app.pop_screen()                               # a replay went back before the batch


class ServerScreen(Screen):
    """The batch now served (see the module docstring)."""

    BINDINGS = [
        Binding("escape", "leave", "Back"),
        Binding("x", "app.stop", "Stop"),
        Binding("B", "app.batch", "New batch"),
        Binding("question_mark,f1", "app.help", "Help", show=False),
        # The app's keys for one prompt go back to the panes first: a run started from here
        # would go on out of sight.
        Binding("enter", "panes('run')", "Run", show=False),
        Binding("n", "panes('run(True)')", "Step mode", show=False),
        Binding("R", "panes('race')", "Race", show=False),
        Binding("slash", "panes('edit_prompt')", "Prompt", show=False),
        # A replay is steered from here too (only in a replay).
        *steer_bindings("step", show_speed=False),
    ]

    DEFAULT_CSS = """
    ServerScreen { background: $background; }
    ServerScreen #server-title { height: 1; background: $panel; color: $foreground;
                                 padding: 0 1; text-style: bold; }
    ServerScreen #server-middle { height: auto; }
    ServerScreen #server-pool { border: round $primary 50%; border-title-color: $accent;
                                border-title-style: bold; width: 1fr; }
    ServerScreen #server-log { display: none; border: round $primary 50%;
                               border-title-color: $accent; border-title-style: bold;
                               width: 48; height: 100%; }
    ServerScreen.-wide #server-log { display: block; }
    ServerScreen.-wide #server-latest { display: none; }
    ServerScreen #server-lanes-box { height: 1fr; border: round $primary 50%;
                                     border-title-color: $accent; border-title-style: bold;
                                     background: $surface; }
    ServerScreen #server-lanes-box:focus { border: round $accent; }
    """

    AUTO_FOCUS = "#server-lanes-box"

    def __init__(self) -> None:
        super().__init__()
        self.view = BatchView()

    def compose(self) -> ComposeResult:
        yield Static("Server view — waiting for the batch to start…", id="server-title")
        yield ServerStats(self.view, id="server-stats")
        with Horizontal(id="server-middle"):
            yield BlockPool(id="server-pool")
            yield EventLog(self.view, id="server-log")
        yield EventLog(self.view, id="server-latest")
        with VerticalScroll(id="server-lanes-box"):
            yield RequestLanes(self.view, id="server-lanes")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#server-pool").border_title = "KV block pool"
        self.query_one("#server-log").border_title = "Events"
        self.query_one("#server-lanes-box").border_title = "Requests"
        self.redraw()

    def on_resize(self, event: events.Resize) -> None:
        self.set_class(event.size.width >= LOG_WIDE, "-wide")
        self.redraw()

    # ------------------------------------------------------------------ drawing
    def redraw(self) -> None:
        """Every pane from the view (called for each fed batch: one repaint per batch)."""
        if not self.is_mounted:
            return
        v = self.view
        self.query_one("#server-title", Static).update(self._title())
        self.query_one(BlockPool).snapshot = v.pool
        for widget in (self.query_one(ServerStats), *self.query(EventLog)):
            widget.refresh()
        self.query_one(RequestLanes).refresh(layout=True)
        box = self.query_one("#server-lanes-box")
        hidden = len(v.requests) > box.size.height - 2
        box.border_subtitle = f"{len(v.requests)} requests · ↑↓ scroll" if hidden else ""

    def _title(self) -> str:
        s = self.view.started
        if s is None:
            return "Server view — waiting for the batch to start…"
        if self.size.width < LOG_WIDE:
            return f"Server · {s.model} · {s.max_batch} at once · {s.num_blocks} blocks"
        return (f"Server · continuous batching · {s.model} · {s.backend} · {s.max_batch} at once"
                f" · {s.num_blocks} blocks of {s.block_size}")

    # ------------------------------------------------------------------ actions
    def check_action(self, action: str, parameters: tuple) -> bool | None:
        if action == "steer":
            return hasattr(self.app.main, "action_steer")
        if action == "panes":                 # a replay or a watcher takes no requests
            return self.app.source.live
        return True

    def action_steer(self, verb: str) -> None:
        self.app.main.action_steer(verb)

    def action_panes(self, action: str) -> None:
        """Back to the panes, then the app's `action` there."""
        self.app.pop_screen()
        self.app.call_later(self.app.run_action, action)

    def action_leave(self) -> None:
        """Back to the panes; a batch still going goes on (B shows it again)."""
        self.app.pop_screen()
