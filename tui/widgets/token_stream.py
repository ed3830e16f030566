"""The token stream pane: the prompt dimmed, generated tokens as they arrive, boundaries visible."""

from __future__ import annotations

from rich.cells import cell_len
from rich.segment import Segment
from rich.style import Style
from textual.binding import Binding
from textual.geometry import Size
from textual.reactive import reactive
from textual.scroll_view import ScrollView
from textual.strip import Strip

from engine.events import Finished, Prefill, Started, Token


class TokenStream(ScrollView, can_focus=True):
    """Text cut at token boundaries, drawn with the line API.

    Appending re-wraps only the last line, so a long run costs the same per frame as a short
    one (a `Static` holding the whole text slows down as it grows). Tokens alternate between
    two shades so their boundaries show; `latency_colours` colours each by its step time instead.
    The pane's subtitle says which colouring is on, with the latency colours' legend. The
    scrollbar's gutter is always reserved, so text never runs under it when it appears.
    """

    BINDINGS = [
        Binding("k", "toggle_boundaries", "Token shades"),
        Binding("c", "toggle_latency", "Latency colours"),
    ]

    DEFAULT_CSS = """
    TokenStream { background: $surface; padding: 0 1; scrollbar-gutter: stable; }
    TokenStream > .token-stream--prompt { color: $token-prompt; text-style: italic; }
    TokenStream > .token-stream--even { color: $token-even; }
    TokenStream > .token-stream--odd { color: $token-odd; }
    TokenStream > .token-stream--fast { color: $success; }
    TokenStream > .token-stream--mid { color: $warning; }
    TokenStream > .token-stream--slow { color: $error; text-style: bold; }
    """

    COMPONENT_CLASSES = {"token-stream--prompt", "token-stream--even", "token-stream--odd",
                         "token-stream--fast", "token-stream--mid", "token-stream--slow"}

    boundaries: reactive[bool] = reactive(True)
    """Alternate two shades so each token's extent is visible."""
    latency_colours: reactive[bool] = reactive(False)
    """Colour each generated token by its step latency (green fast → red slow)."""

    def __init__(self, *, name=None, id=None, classes=None) -> None:
        super().__init__(name=name, id=id, classes=classes)
        self._pieces: list[tuple[str, bool, float]] = []     # (text, is_prompt, latency_s)
        self._lines: list[list[tuple[str, int]]] = [[]]      # per line: (text, piece index)
        self._line_width = 0                                 # cells used on the last line
        self._wrap = 80
        self._lat_lo = self._lat_hi = 0.0

    # ------------------------------------------------------------------ data
    def feed(self, events) -> None:
        """A batch of one run's events; one repaint."""
        pieces = []
        for ev in events:
            if isinstance(ev, Started):
                pieces = []
                self.clear()
            elif isinstance(ev, Prefill):
                self.append(pieces)
                pieces = []
                self.set_prompt(ev.prompt_pieces)
            elif isinstance(ev, Token):
                pieces.append((ev.text, False, ev.latency_s))
            elif isinstance(ev, Finished) and ev.tail:
                pieces.append((ev.tail, False, 0.0))
        if pieces:
            self.append(pieces)

    @property
    def text(self) -> str:
        return "".join(p[0] for p in self._pieces)

    @property
    def generated_text(self) -> str:
        return "".join(p[0] for p in self._pieces if not p[1])

    def clear(self) -> None:
        self._pieces.clear()
        self._relayout()

    def set_prompt(self, pieces) -> None:
        self.clear()
        self.append([(p, True, 0.0) for p in pieces])

    def append(self, pieces: list[tuple[str, bool, float]]) -> None:
        """Add (text, is_prompt, latency) pieces; one call per batch, one repaint."""
        at_end = self.scroll_y >= self.max_scroll_y - 1
        for piece in pieces:
            self._pieces.append(piece)
            self._place(len(self._pieces) - 1)
        gen = [p[2] for p in self._pieces if not p[1]]
        if gen:
            s = sorted(gen)
            self._lat_lo, self._lat_hi = s[len(s) // 4], s[(3 * len(s)) // 4]
        self._resize()
        if at_end:
            self.scroll_end(animate=False, immediate=False)
        if self.latency_colours:
            self._show_colouring()
        self.refresh()

    # ------------------------------------------------------------------ layout
    def _place(self, index: int) -> None:
        text = self._pieces[index][0]
        for i, part in enumerate(text.split("\n")):
            if i:
                self._lines.append([])
                self._line_width = 0
            # Wrap at token boundaries: a token that fits on a fresh line is not cut in two.
            width = cell_len(part)
            if self._line_width and self._line_width + width > self._wrap >= width:
                self._lines.append([])
                self._line_width = 0
            while part:
                room = self._wrap - self._line_width
                if room <= 0:
                    self._lines.append([])
                    self._line_width, room = 0, self._wrap
                take, width = "", 0
                for ch in part:
                    w = cell_len(ch)
                    if width + w > room:
                        break
                    take, width = take + ch, width + w
                if not take:                       # a wide char on a 1-cell-left line
                    self._line_width = self._wrap
                    continue
                self._lines[-1].append((take, index))
                self._line_width += width
                part = part[len(take):]

    def _relayout(self) -> None:
        self._lines, self._line_width = [[]], 0
        for i in range(len(self._pieces)):
            self._place(i)
        self._resize()
        self.refresh()

    def _resize(self) -> None:
        self.virtual_size = Size(self._wrap, len(self._lines))

    def on_resize(self) -> None:
        wrap = max(self.scrollable_content_region.width, 10)
        if wrap != self._wrap:
            self._wrap = wrap
            self._relayout()

    # ------------------------------------------------------------------ drawing
    def _style(self, index: int) -> Style:
        text, is_prompt, latency = self._pieces[index]
        if is_prompt:
            return self.get_component_rich_style("token-stream--prompt")
        if self.latency_colours:
            if latency <= self._lat_lo:
                return self.get_component_rich_style("token-stream--fast")
            if latency >= self._lat_hi and self._lat_hi > self._lat_lo:
                return self.get_component_rich_style("token-stream--slow")
            return self.get_component_rich_style("token-stream--mid")
        if self.boundaries and index % 2:
            return self.get_component_rich_style("token-stream--odd")
        return self.get_component_rich_style("token-stream--even")

    def render_line(self, y: int) -> Strip:
        scroll_x, scroll_y = self.scroll_offset
        n = scroll_y + y
        width = self.scrollable_content_region.width
        base = self.rich_style
        if n >= len(self._lines):
            return Strip.blank(width, base)
        segments = [Segment(text, base + self._style(i)) for text, i in self._lines[n]]
        return Strip(segments).crop_extend(scroll_x, scroll_x + width, base)

    def watch_boundaries(self) -> None:
        self._show_colouring()

    def watch_latency_colours(self) -> None:
        self._show_colouring()

    def _show_colouring(self) -> None:
        """The subtitle: which colouring is on, and the latency colours' legend."""
        if self.latency_colours:
            lo, hi = self._lat_lo * 1e3, self._lat_hi * 1e3
            self.border_subtitle = (f"c: step latency [$success]fast ≤ {lo:.0f} ms[/] · "
                                    f"[$warning]between[/] · [$error]slow ≥ {hi:.0f} ms[/]")
        elif self.boundaries:
            self.border_subtitle = "k: [$token-even]one token,[/][$token-odd] the next[/]"
        else:
            self.border_subtitle = "k: token shades off"

    def action_toggle_boundaries(self) -> None:
        self.boundaries = not self.boundaries
        self.notify(f"token shades {'on' if self.boundaries else 'off'}", timeout=2)

    def action_toggle_latency(self) -> None:
        self.latency_colours = not self.latency_colours
        self.notify("tokens coloured by their step's latency" if self.latency_colours
                    else "latency colours off", timeout=2)
