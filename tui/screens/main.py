"""The main screen: the prompt, the panes, the status bar and the footer, laid out for the
terminal's size; which pane has the focus, which is zoomed, lanes or token stream."""

from __future__ import annotations

from textual import events
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Container, Horizontal
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Footer, Label, ProgressBar, Static

from ..widgets.attention import AttentionPane
from ..widgets.kv_cache import KVCachePane
from ..widgets.latency import LatencyPane
from ..widgets.prompt import PromptInput
from ..widgets.race_lanes import RaceLanes
from ..widgets.status_bar import StatusBar
from ..widgets.token_stream import TokenStream

MIN_WIDTH, MIN_HEIGHT, NARROW_WIDTH = 60, 18, 110
PANES = ("tokens", "lanes", "attention", "kv", "latency")


class MainScreen(Screen):
    """Wide (≥ 110 columns): two columns, text and attention on top, cache and latency below.
    Narrow: one pane per band in one scrolling column; Tab or 1–4 bring a pane into view with
    its keys. Below 60×18 a message asks for a larger window. A race shows its lanes in the
    token stream's place (`l` switches). `z` zooms the focused pane to the whole screen
    (Textual's maximize: the pane gets the room and draws larger cells)."""

    AUTO_FOCUS = "#tokens"
    BINDINGS = [
        Binding("z", "zoom", "Zoom"),
        Binding("1", "focus_pane('tokens')", "Text pane", show=False),
        Binding("2", "focus_pane('attention')", "Attention pane", show=False),
        Binding("3", "focus_pane('kv')", "KV pane", show=False),
        Binding("4", "focus_pane('latency')", "Latency pane", show=False),
        Binding("l", "toggle_lanes", "Race lanes", show=False),
        Binding("C", "cycle_depth", "Colour depth", show=False),
    ]

    class Ready(Message):
        """The screen and its panes are mounted: events can be drawn."""

    def __init__(self, prompt: str, read_only: bool) -> None:
        super().__init__()
        self.initial_prompt = prompt
        self.prompt = PromptInput(read_only=read_only, id="prompt")
        self.tokens, self.lanes = TokenStream(id="tokens"), RaceLanes(id="lanes")
        self.attention, self.kv = AttentionPane(id="attention"), KVCachePane(id="kv")
        self.latency, self.status = LatencyPane(id="latency"), StatusBar(id="status")
        # Kept, not queried (as the panes are): engine events may still be drawn while the app
        # closes and its widgets are already gone.
        self.load_row = Horizontal(id="loading")
        self.load_text = Label("starting the engine…", id="loading-text")
        self.load_bar = ProgressBar(total=1.0, show_eta=False, id="load-progress")

    def compose(self) -> ComposeResult:
        with Horizontal(id="prompt-row"):
            yield self.prompt
        with self.load_row:
            yield self.load_text
            yield self.load_bar
        with Container(id="panes"):
            yield self.tokens
            yield self.lanes
            yield self.attention
            yield self.kv
            yield self.latency
        yield Static(f"The window is too small.\nMake it at least {MIN_WIDTH}×{MIN_HEIGHT} "
                     f"(columns × rows).", id="too-small")
        yield self.status
        yield Footer()

    def on_mount(self) -> None:
        self.prompt.value = self.initial_prompt
        for pane, title in ((self.tokens, "Token stream"), (self.lanes, "Race"),
                            (self.attention, "Attention"), (self.kv, "KV cache"),
                            (self.latency, "Latency")):
            pane.border_title = title
        self.on_resize(events.Resize(self.size, self.size))
        self.post_message(self.Ready())

    def on_resize(self, event: events.Resize) -> None:
        width, height = event.size
        self.set_class(width < MIN_WIDTH or height < MIN_HEIGHT, "-too-small")
        self.set_class(width < NARROW_WIDTH, "-narrow")
        footer = self.query_one(Footer)
        footer.compact = width < NARROW_WIDTH
        footer.show_command_palette = width >= NARROW_WIDTH     # `?` says ctrl+p

    def loading(self, text: str, fraction: float | None = None) -> None:
        """What the engine is doing before its model is ready."""
        self.load_text.update(text)
        if fraction is not None:
            self.load_bar.update(progress=fraction)

    def loaded(self) -> None:
        self.load_row.add_class("-done")

    def feed(self, events: list) -> None:
        """One run's batch of events to every pane that draws a run."""
        for pane in (self.tokens, self.attention, self.kv, self.latency):
            pane.feed(events)

    def clear(self) -> None:
        """Forget everything drawn (a replay delivers the state again from its beginning)."""
        for pane in (self.tokens, self.kv, self.attention, self.latency, self.lanes):
            pane.clear()
        self.show_lanes(False)

    def action_cycle_depth(self) -> None:
        """`C`: draw the heatmaps for truecolor, 256 or 16 colours (over SSH the terminal's
        depth is often misreported)."""
        depths = ["truecolor", "256", "16"]
        depth = self.attention.depth
        self.attention.depth = depths[(depths.index(depth) + 1) % 3 if depth in depths else 0]
        self.notify(f"heatmap drawn for {self.attention.depth} colours", timeout=2)

    def show_lanes(self, show: bool) -> None:
        """The race lanes in the token stream's place (show) or the token stream back."""
        if show != self.has_class("-lanes"):
            self.set_class(show, "-lanes")
            if self.focused is None or isinstance(self.focused, (TokenStream, RaceLanes)):
                (self.lanes if show else self.tokens).focus()

    def action_toggle_lanes(self) -> None:
        if not self.lanes.lanes:
            self.notify("no race yet: press R to race", timeout=3)
        else:
            self.show_lanes(not self.has_class("-lanes"))

    def action_focus_pane(self, name: str) -> None:
        """Focus a pane (1 text, 2 attention, 3 KV cache, 4 latency): its keys, in view."""
        if name == "tokens" and self.has_class("-lanes"):
            name = "lanes"
        self.query_one(f"#{name}").focus()

    def action_zoom(self) -> None:
        """The focused pane full-screen, with larger cells; again (or escape) to go back."""
        if self.maximized is not None:
            self.minimize()
        elif self.focused is not None and self.focused.id in PANES:
            self.maximize(self.focused)
        else:
            self.notify("zoom: focus a pane first (Tab, or 1–4)", timeout=3)
