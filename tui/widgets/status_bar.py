"""The status bar: what is running, how, and whether the last compared runs agreed."""

from __future__ import annotations

from rich.text import Text
from textual.reactive import reactive
from textual.widget import Widget

from ..settings import sampling_text


class StatusBar(Widget):
    """One line: [replay position │] [● rec] [sharing │] model · device · dtype │
    strategy/backend +fast path [· races remote/host:port] │ sampling │ identical-tokens badge.

    When the line does not fit, the least useful parts go first (device and dtype, then the
    model's name, then the sampling); the strategy and the badge always stay, the badge in
    short (" ✓ same " / " ✗ differ ") on a narrow terminal.
    """

    DEFAULT_CSS = """
    StatusBar { height: 1; background: $panel; color: $foreground; padding: 0 1; }
    StatusBar > .status--key { color: $accent; text-style: bold; }
    StatusBar > .status--same { background: $success; color: $background; text-style: bold; }
    StatusBar > .status--differ { background: $error; color: $background; text-style: bold; }
    StatusBar > .status--muted { color: $text-muted; }
    StatusBar > .status--rec { color: $error; text-style: bold; }
    """

    COMPONENT_CLASSES = {"status--key", "status--same", "status--differ", "status--muted",
                         "status--rec"}

    model: reactive[str] = reactive("loading…")
    """Model name (or what is happening while it loads)."""
    device: reactive[str] = reactive("—")
    dtype: reactive[str] = reactive("—")
    strategy: reactive[str] = reactive("kv")
    backend: reactive[str] = reactive("sdpa")
    fast: reactive[str] = reactive("")
    """Fast-path options of the next run ("c+int8"); empty for the plain model."""
    sampling: reactive[str] = reactive("greedy")
    remote: reactive[str] = reactive("")
    """The server that joins each race (--endpoint), as its lane is named; "" for none."""
    identical: reactive[bool | None] = reactive(None)
    """Did the last compared runs produce identical tokens? None: nothing compared yet."""
    delta: reactive[float | None] = reactive(None)
    """max |Δ logits| between the last compared runs, when known."""
    replay: reactive[str] = reactive("")
    """Where a replay stands ("▶ replay 1× · token 12/50 · …"); empty when live."""
    recording: reactive[bool] = reactive(False)
    """The app is writing a recording."""
    link: reactive[str] = reactive("")
    """Sharing or watching a session ("shared on 127.0.0.1:8765 · 2 watching")."""

    def show(self, settings) -> None:
        """The next run's settings (tui/settings.py's Settings)."""
        self.strategy, self.backend, self.fast = settings.strategy, settings.backend, settings.fast
        self.sampling = sampling_text(settings.sampling, settings.max_new_tokens)
        self.remote = settings.remote_label

    def show_model(self, ready) -> None:
        """The loaded model (engine.events.Ready)."""
        self.model, self.device, self.dtype = ready.model, ready.device, ready.dtype

    def render(self) -> Text:
        width = self.content_region.width or self.size.width
        for level in range(5):
            line = self._line(level)
            if line.cell_len <= width:
                return line
        return line

    def _line(self, level: int) -> Text:
        """The bar at a level of detail: 0 everything … 4 the least that must stay."""
        key = self.get_component_rich_style("status--key")
        muted = self.get_component_rich_style("status--muted")
        t = Text(no_wrap=True, overflow="ellipsis")
        if self.replay:
            t.append(self.replay, key)
            t.append(" │ ")
        if self.recording:
            t.append("● rec ", self.get_component_rich_style("status--rec"))
        if self.link:
            t.append(self.link if level < 3 else self.link.split(" ·")[0], key)
            t.append(" │ ")
        if level == 0:
            t.append(f"{self.model} · {self.device} · {self.dtype}", muted)
            t.append(" │ ")
        elif level == 1:
            t.append(self.model, muted)
            t.append(" │ ")
        t.append(self.strategy, key)
        t.append("/")
        t.append(self.backend, key)
        if self.fast:
            t.append(" +")
            t.append(self.fast, key)
        if self.remote and level < 4:
            t.append(f" · races {self.remote}", muted)
        if level < 3:
            t.append(f" │ {self.sampling}")
        t.append(" │ ")
        t.append_text(self._badge(short=level >= 2))
        return t

    def _badge(self, short: bool) -> Text:
        if self.identical is None:
            return Text(" no comparison " if short else " no comparison yet ",
                        self.get_component_rich_style("status--muted"))
        if short:
            badge = " ✓ same " if self.identical else " ✗ differ "
        else:
            badge = " identical tokens ✓ " if self.identical else " tokens differ ✗ "
            if self.delta is not None:
                badge = badge.rstrip() + f" · max|Δlogits| {self.delta:.2g} "
        return Text(badge, self.get_component_rich_style(
            "status--same" if self.identical else "status--differ"))


def replay_text(state, short: bool) -> str:
    """Where a replay stands (engine/player.py's PlayerState), for the status bar."""
    mark = "■" if state.at_end else ("▶" if state.playing else "⏸")
    if short:
        return f"{mark} {state.speed:g}× · {state.token}/{state.tokens}"
    return (f"{mark} replay {state.speed:g}× · token {state.token}/{state.tokens} · "
            f"{state.seconds:.1f}/{state.duration:.1f} s")
