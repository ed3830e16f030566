"""The attention pane: where the newest token looked, per head, for one layer at a time."""

from __future__ import annotations

import numpy as np
from rich.style import Style
from rich.text import Text
from textual.binding import Binding
from textual.reactive import reactive
from textual.widget import Widget

from engine.events import AttentionRow, FlashTiles, Prefill, Started, Token
from themes import ramps

from ..remote import not_exposed, remote_server
from . import flash_view

KEEP_ROWS = 160
FLASH_FPS = 6          # tiles a second: slow enough to follow one rescale with the eye
FLASH_HOLD = 6         # frames the finished state stays up before the next pass


def label(piece: str, width: int) -> str:
    """A token, visible: spaces as ␣ and newlines as ⏎, cut or padded to `width` cells."""
    shown = piece.replace(" ", "␣").replace("\n", "⏎") or "∅"
    return shown[:width].ljust(width)


class AttentionPane(Widget, can_focus=True):
    """A heatmap of attention probabilities, each row scaled to its own maximum.

    row view     rows = heads, columns = positions: the newest token's attention over the text
    matrix view  one head: rows = positions as they were generated, building the causal matrix
    With truecolor it draws viridis; at 256 colours a grey ramp; at 16 colours shade characters;
    a colour scale under the heatmap says which is which. Half-block cells (▀) give two matrix
    rows per text row, so the pixels are square; zoomed (`z`), every cell is two columns wide.

    flash view   (the flash backend; `m` cycles row → matrix → flash) the key axis as a strip of
                 tiles, consumed one by one on a timer, with the running max m and running sum
                 ℓ of the online softmax after each tile (tui/widgets/flash_view.py). `p`
                 pauses, `.` steps. The engine traces one layer's tiles (FlashTiles.layer): the
                 row and matrix views of that layer show a compact copy under the heatmap.
    A FlashTiles event comes with every token; the animation keeps going while they arrive and
    each pass over the tiles draws the newest one (restarting on every event would never get
    past the first tile at ~12 batches a second).
    """

    BINDINGS = [
        Binding("left_square_bracket", "layer(-1)", "Layer", group=Binding.Group("Layer")),
        Binding("right_square_bracket", "layer(1)", "Layer", group=Binding.Group("Layer")),
        Binding("left_curly_bracket", "head(-1)", "Head", group=Binding.Group("Head")),
        Binding("right_curly_bracket", "head(1)", "Head", group=Binding.Group("Head")),
        Binding("m", "cycle_view", "View"),
        Binding("p", "flash_play", "Tiles ▶/⏸"),
        Binding("full_stop", "flash_step", "Tile step"),
    ]

    DEFAULT_CSS = """
    AttentionPane { background: $surface; padding: 0 1; height: 1fr; }
    AttentionPane > .attention--label { color: $text-muted; }
    AttentionPane > .attention--ink { color: $foreground; }
    AttentionPane > .attention--focus { color: $accent; text-style: bold; }
    AttentionPane > .flash--done { color: $primary; }
    AttentionPane > .flash--current { color: $accent; text-style: bold; }
    AttentionPane > .flash--todo { color: $block-free; }
    AttentionPane > .flash--rescale { color: $warning; text-style: bold; }
    """

    COMPONENT_CLASSES = {"attention--label", "attention--ink", "attention--focus",
                         "flash--done", "flash--current", "flash--todo", "flash--rescale"}

    shown_layer: reactive[int] = reactive(0)
    """Which layer's attention is drawn."""
    shown_head: reactive[int] = reactive(0)
    """Which head the matrix view shows (the row view shows all heads)."""
    mode: reactive[str] = reactive("row")
    """'row' (all heads, newest token), 'matrix' (one head, all positions) or 'flash'."""
    depth: reactive[str] = reactive("truecolor")
    """Colour depth to draw for: 'truecolor', '256' or '16'."""
    flash_playing: reactive[bool] = reactive(True)
    """The flash animation runs (False: paused on one tile)."""

    def __init__(self, *, name=None, id=None, classes=None) -> None:
        super().__init__(name=name, id=id, classes=classes)
        self.rows: dict[int, np.ndarray] = {}       # position → (layers, heads, position + 1)
        self.pieces: list[str] = []                  # token texts by position, for labels
        self.flash: FlashTiles | None = None         # the newest FlashTiles event
        self.flash_frame = 0                         # tile being consumed; n_tiles: all done
        self.n_layers, self.n_heads = 1, 1
        self._flash_timer = None
        self.remote = ""                             # the server a followed run streams from

    def on_mount(self) -> None:
        self._flash_timer = self.set_interval(1 / FLASH_FPS, self._flash_tick, pause=True)

    # ------------------------------------------------------------------ data
    def feed(self, events) -> None:
        """A batch of one run's events; one repaint."""
        rows = []
        for ev in events:
            if isinstance(ev, Started):
                self.clear()
                rows, self.remote = [], remote_server(ev)
            elif isinstance(ev, Prefill):
                self.pieces = list(ev.prompt_pieces)
            elif isinstance(ev, Token):
                self.pieces.append(ev.text)
            elif isinstance(ev, AttentionRow):
                rows.append(ev)
            elif isinstance(ev, FlashTiles) and ev.running_max:
                if self.flash is None:
                    self.flash_frame = 0             # a run's first tiles: from tile 0
                    self.call_later(self.refresh_bindings)
                self.flash = ev
                self.flash_frame = min(self.flash_frame, len(ev.running_max))
                if self.flash_playing:
                    self._flash_timer.resume()
        if rows:
            self._add_rows(rows)
        self.refresh()

    def clear(self) -> None:
        """No run drawn (a new run, or a replay starting over)."""
        if self.flash is not None:
            self.call_later(self.refresh_bindings)
        self.rows, self.pieces, self.flash, self.flash_frame = {}, [], None, 0
        self.remote = ""
        if self._flash_timer is not None:
            self._flash_timer.pause()
        self.refresh()

    def _add_rows(self, rows) -> None:
        for row in rows:
            self.rows[row.position] = row.probs
        # Each row is (layers × heads × T): keeping every one would grow as T², ~270 MB at
        # 1000 tokens for the embedded model. The matrix view shows at most a screenful.
        for position in sorted(self.rows)[:-KEEP_ROWS]:
            del self.rows[position]
        self.n_layers, self.n_heads = rows[-1].shape[0], rows[-1].shape[1]
        self.shown_layer = min(self.shown_layer, self.n_layers - 1)
        self.shown_head = min(self.shown_head, self.n_heads - 1)

    def _flash_tick(self) -> None:
        if self.flash is None:
            self._flash_timer.pause()
            return
        self.flash_frame += 1
        if self.flash_frame >= len(self.flash.running_max) + FLASH_HOLD:
            self.flash_frame = 0
        self.refresh()

    @property
    def view(self) -> str:
        """The view drawn: the flash view stays chosen across runs, but without tiles (another
        backend) the row view stands in."""
        return "row" if self.mode == "flash" and self.flash is None else self.mode

    @property
    def flash_tile(self) -> int:
        """The tile being consumed in this frame (n_tiles once all are done)."""
        if self.flash is None:
            return 0
        return min(self.flash_frame, len(self.flash.running_max))

    # ------------------------------------------------------------------ watchers
    def watch_flash_playing(self, playing: bool) -> None:
        if self._flash_timer is not None:
            if playing and self.flash is not None:
                self._flash_timer.resume()
            else:
                self._flash_timer.pause()

    # ------------------------------------------------------------------ drawing
    def _cell_style(self, value: float, below: float | None = None) -> tuple[str, Style]:
        """One heatmap cell: the character and its style. `below`: the lower half-block value."""
        if self.depth == "16":
            return ramps.shade(value), self.get_component_rich_style("attention--ink")
        top = ramps.colour(value, self.depth)
        if below is None:
            return " ", Style(bgcolor=top)
        return "▀", Style(color=top, bgcolor=ramps.colour(below, self.depth))

    def render(self) -> Text:
        muted = self.get_component_rich_style("attention--label")
        if self.remote:
            return Text(not_exposed(self.remote, "attention (nor flash tiles)"), muted)
        if not self.rows:
            return Text("no attention rows yet — run a prompt; then [ ] layer, { } head, "
                        "m row/matrix (keys work while this pane has the focus: Tab)", muted)
        width = max(self.size.width - 2, 12)
        out = Text()
        if self.view == "flash":
            flash_view.draw(out, self.flash, self.flash_tile, self.flash_playing, width,
                            self.size.height, len(self.pieces), self.get_component_rich_style,
                            self.rich_style, full=True)
            return out
        view = ("row view: one row per head" if self.view == "row"
                else f"matrix: head {self.shown_head} of 0–{self.n_heads - 1}")
        out.append(f"layer {self.shown_layer} of 0–{self.n_layers - 1} · {view}\n", muted)
        cw = 2 if self.is_maximized else 1
        if self.view == "row":
            self._render_row(out, self.rows[max(self.rows)][self.shown_layer], width, cw, muted)
        else:
            self._render_matrix(out, width, cw, muted)
        self._render_scale(out, muted)
        if self.flash is not None:
            self._render_flash_below(out, width, muted)
        return out

    def _render_scale(self, out: Text, muted: Style) -> None:
        """The colour scale: which colour is 0 and which is the row's maximum."""
        out.append("0 ", muted)
        for i in range(12):
            ch, st = self._cell_style(i / 11)
            out.append(ch, st)
        out.append(f" = each row's own max · {self.depth}\n", muted)

    def _render_flash_below(self, out: Text, width: int, muted: Style) -> None:
        f = self.flash
        if f.layer != self.shown_layer:
            out.append(f"flash tiles are traced in layer {f.layer} only: m m shows them\n",
                       muted)
            return
        room = self.size.height - len(out.plain.splitlines())
        if room >= 8:
            flash_view.draw(out, f, self.flash_tile, self.flash_playing, width, room,
                            len(self.pieces), self.get_component_rich_style, self.rich_style,
                            full=False)
        else:
            n = len(f.running_max)
            i = min(self.flash_tile, n - 1)
            out.append(f"flash: tile {i} of {n} · m {f.running_max[i]:.3g} · "
                       f"ℓ {f.running_sum[i]:.3g} · m m: the tile animation\n", muted)

    def _render_row(self, out: Text, probs: np.ndarray, width: int, cw: int,
                    muted: Style) -> None:
        # probs: (heads, T). Show the last `cols` positions; one text row per head.
        probs = probs.astype(np.float32)
        cols = min(probs.shape[1], (width - 4) // cw)
        start = probs.shape[1] - cols
        for h in range(probs.shape[0]):
            row = probs[h, start:]
            peak = float(row.max()) or 1.0
            out.append(f"h{h:<2} ", muted)
            for v in row:
                ch, st = self._cell_style(float(v) / peak)
                out.append(ch * cw, st)
            out.append("\n")
        mean = probs.mean(axis=0)
        top = np.argsort(mean)[::-1][:4]
        out.append("most attended: ", muted)
        for j in top:
            piece = self.pieces[j] if j < len(self.pieces) else "?"
            out.append(label(piece, 10).rstrip(), self.get_component_rich_style("attention--focus"))
            out.append(f" {mean[j]:.2f}  ", muted)
        out.append("\n")

    def _render_matrix(self, out: Text, width: int, cw: int, muted: Style) -> None:
        positions = sorted(self.rows)
        lab = 8
        cols = max((width - lab - 1) // cw, 4)
        max_rows = max(self.size.height - 4, 2)
        half = self.depth != "16" and cw == 1     # two matrix rows per text row
        n_show = max_rows * (2 if half else 1)
        positions = positions[-n_show:]
        first_col = max(positions[-1] + 1 - cols, 0)

        def values(pos: int) -> np.ndarray:
            row = self.rows[pos][self.shown_layer, self.shown_head].astype(np.float32)
            peak = float(row.max()) or 1.0
            full = np.full(positions[-1] + 1, np.nan, dtype=np.float32)
            full[: row.shape[0]] = row / peak
            return full[first_col:]

        step = 2 if half else 1
        blank = self.rich_style
        for i in range(0, len(positions), step):
            pos = positions[i]
            piece = self.pieces[pos] if pos < len(self.pieces) else "?"
            out.append(label(piece, lab) + " ", muted)
            top = values(pos)
            below = values(positions[i + 1]) if half and i + 1 < len(positions) else None
            for c in range(top.shape[0]):
                a = top[c]
                b = below[c] if below is not None else np.nan
                if np.isnan(a) and np.isnan(b):
                    out.append(" " * cw, blank)
                elif half:
                    ch, st = self._cell_style(0.0 if np.isnan(a) else float(a),
                                              0.0 if np.isnan(b) else float(b))
                    out.append(ch, st)
                else:
                    ch, st = self._cell_style(0.0 if np.isnan(a) else float(a))
                    out.append(ch * cw, st)
            out.append("\n")

    # ------------------------------------------------------------------ actions
    def check_action(self, action: str, parameters: tuple) -> bool | None:
        """The tile keys only mean something while there are tiles."""
        if action in ("flash_play", "flash_step"):
            return self.flash is not None
        return True

    def action_layer(self, delta: int) -> None:
        """The next or previous layer (wrapping round)."""
        self.shown_layer = (self.shown_layer + delta) % max(self.n_layers, 1)

    def action_head(self, delta: int) -> None:
        """The next or previous head of the matrix view (wrapping round)."""
        self.shown_head = (self.shown_head + delta) % max(self.n_heads, 1)

    def action_cycle_view(self) -> None:
        """row → matrix → flash (when a flash run sent its tiles: their layer) → row."""
        if self.view == "row":
            self.mode = "matrix"
        elif self.mode == "matrix" and self.flash is not None:
            self.mode = "flash"
            self.shown_layer = self.flash.layer
        else:
            self.mode = "row"

    def action_flash_play(self) -> None:
        """Pause or resume the flash animation."""
        self.flash_playing = not self.flash_playing

    def action_flash_step(self) -> None:
        """Pause and move one tile on (after the last: the finished state, then tile 0)."""
        if self.flash is None:
            return
        self.flash_playing = False
        self.flash_frame = (self.flash_tile + 1) % (len(self.flash.running_max) + 1)
        self.refresh()
