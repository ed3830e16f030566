"""The status bar: what is running, how, and whether the last compared runs agreed."""

from __future__ import annotations

from rich.text import Text
from textual.reactive import reactive
from textual.widget import Widget


class StatusBar(Widget):
    """One line: [replay position │] [● rec] model · device · dtype │ strategy/backend +fast path
    │ sampling │ identical-tokens badge."""

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
    identical: reactive[bool | None] = reactive(None)
    """Did the last compared runs produce identical tokens? None: nothing compared yet."""
    delta: reactive[float | None] = reactive(None)
    """max |Δ logits| between the last compared runs, when known."""
    replay: reactive[str] = reactive("")
    """Where a replay stands ("▶ replay 1× · token 12/50 · …"); empty when live."""
    recording: reactive[bool] = reactive(False)
    """The app is writing a recording."""

    def render(self) -> Text:
        key = self.get_component_rich_style("status--key")
        muted = self.get_component_rich_style("status--muted")
        t = Text(no_wrap=True, overflow="ellipsis")
        if self.replay:
            t.append(self.replay, key)
            t.append(" │ ")
        if self.recording:
            t.append("● rec ", self.get_component_rich_style("status--rec"))
        t.append(f"{self.model} · {self.device} · {self.dtype}", muted)
        t.append(" │ ")
        t.append(self.strategy, key)
        t.append("/")
        t.append(self.backend, key)
        if self.fast:
            t.append(" +")
            t.append(self.fast, key)
        t.append(f" │ {self.sampling} │ ")
        if self.identical is None:
            t.append(" no comparison yet ", muted)
        else:
            badge = " identical tokens ✓ " if self.identical else " tokens differ ✗ "
            if self.delta is not None:
                badge = badge.rstrip() + f" · max|Δlogits| {self.delta:.2g} "
            t.append(badge, self.get_component_rich_style(
                "status--same" if self.identical else "status--differ"))
        return t
