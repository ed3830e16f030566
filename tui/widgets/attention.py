"""The attention pane: where the newest token looked, per head, for one layer at a time."""

from __future__ import annotations

import numpy as np
from rich.color import Color
from rich.style import Style
from rich.text import Text
from textual.reactive import reactive
from textual.widget import Widget

from themes import ramps

from ..messages import AttentionUpdated


KEEP_ROWS = 160
FLASH_FPS = 6          # tiles a second: slow enough to follow one rescale with the eye
FLASH_HOLD = 6         # frames the finished state stays up before the next pass
BARS = " ▁▂▃▄▅▆▇█"


def label(piece: str, width: int) -> str:
    """A token, visible: spaces as ␣ and newlines as ⏎, cut or padded to `width` cells."""
    shown = piece.replace(" ", "␣").replace("\n", "⏎") or "∅"
    return shown[:width].ljust(width)


class AttentionPane(Widget, can_focus=True):
    """A heatmap of attention probabilities, each row normalised to its own maximum.

    row view     rows = heads, columns = positions: the newest token's attention over the text
    matrix view  one head: rows = positions as they were generated, building the causal matrix
    With truecolor it draws viridis; at 256 colours a grey ramp; at 16 colours shade characters.
    Half-block cells (▀) give two matrix rows per text row, so the pixels are square.

    flash view   (the flash backend; `m` cycles row → matrix → flash) the key axis as a strip of
                 tiles, consumed one by one on a timer, with the running max m and running sum
                 ℓ of the online softmax after each tile: when a tile brings a larger max, the sum
                 so far is rescaled by exp(m_old − m_new) and its bar drops. `p` pauses, `.`
                 steps. The row and matrix views show a compact copy under the heatmap.
    A FlashTiles event comes with every token; the animation keeps going while they arrive and
    each pass over the tiles draws the newest one (restarting on every event would never get
    past the first tile at ~12 batches a second).
    """

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

    def __init__(self, *, name=None, id=None, classes=None) -> None:
        super().__init__(name=name, id=id, classes=classes)
        self.rows: dict[int, np.ndarray] = {}       # position → (layers, heads, position + 1)
        self.pieces: list[str] = []                  # token texts by position, for labels
        self.flash = None                            # the last FlashTiles event
        self.flash_frame = 0                         # tile being consumed; n_tiles: all done
        self.flash_playing = True
        self._flash_timer = None
        self.n_layers, self.n_heads = 1, 1

    def on_mount(self) -> None:
        self._flash_timer = self.set_interval(1 / FLASH_FPS, self._flash_tick, pause=True)

    def reset(self, pieces=()) -> None:
        self.rows, self.pieces, self.flash = {}, list(pieces), None
        self.flash_frame = 0
        if self._flash_timer is not None:
            self._flash_timer.pause()
        self.refresh()

    def show_flash(self, event) -> None:
        """The newest FlashTiles event: the animation carries on with its data (from tile 0
        when it is the run's first)."""
        if not event.running_max:
            return
        if self.flash is None:
            self.flash_frame = 0
        self.flash = event
        self.flash_frame = min(self.flash_frame, len(event.running_max))
        if self.flash_playing and self._flash_timer is not None:
            self._flash_timer.resume()
        self.refresh()

    def _flash_tick(self) -> None:
        if self.flash is None:
            self._flash_timer.pause()
            return
        n = len(self.flash.running_max)
        self.flash_frame += 1
        if self.flash_frame >= n + FLASH_HOLD:
            self.flash_frame = 0
        self.refresh()

    def add_rows(self, rows) -> None:
        for row in rows:
            self.rows[row.position] = row.probs
        # Each row is (layers × heads × T): keeping every one would grow as T², ~270 MB at
        # 1000 tokens for the embedded model. The matrix view shows at most a screenful.
        for position in sorted(self.rows)[:-KEEP_ROWS]:
            del self.rows[position]
        for row in rows[-1:]:
            self.n_layers, self.n_heads = row.probs.shape[0], row.probs.shape[1]
        self.shown_layer = min(self.shown_layer, self.n_layers - 1)
        self.shown_head = min(self.shown_head, self.n_heads - 1)

    def on_attention_updated(self, message: AttentionUpdated) -> None:
        self.refresh()

    # ------------------------------------------------------------------ watchers
    def watch_shown_layer(self) -> None:
        self.refresh()

    def watch_shown_head(self) -> None:
        self.refresh()

    def watch_mode(self) -> None:
        self.refresh()

    def watch_depth(self) -> None:
        self.refresh()

    # ------------------------------------------------------------------ drawing
    def _cell_style(self, value: float, below: float | None = None) -> tuple[str, Style]:
        """One heatmap cell: the character and its style. `below`: the lower half-block value."""
        if self.depth == "16":
            return ramps.shade(value), self.get_component_rich_style("attention--ink")
        top = ramps.colour(value, self.depth)
        if below is None:
            return " ", Style(bgcolor=top)
        return "▀", Style(color=top, bgcolor=ramps.colour(below, self.depth))

    @property
    def view(self) -> str:
        """The view drawn: the flash view stays chosen across runs, but without tiles (another
        backend) the row view stands in."""
        return "row" if self.mode == "flash" and self.flash is None else self.mode

    def render(self) -> Text:
        muted = self.get_component_rich_style("attention--label")
        if not self.rows:
            return Text("no attention rows yet — run a prompt; keys [ ] layer, { } head, "
                        "m row/matrix", muted)
        width = max(self.size.width - 2, 12)
        newest = max(self.rows)
        out = Text()
        mode = self.view
        if mode == "flash":
            self._render_flash(out, width, self.size.height, muted, full=True)
            return out
        view = "row: heads × positions" if mode == "row" else f"matrix: head {self.shown_head}"
        out.append(f"layer {self.shown_layer}/{self.n_layers - 1} · {view} · {self.depth}\n", muted)
        if mode == "row":
            self._render_row(out, self.rows[newest][self.shown_layer], width, muted)
        else:
            self._render_matrix(out, width, muted)
        if self.flash is not None:
            room = self.size.height - len(out.plain.splitlines())
            if room >= 8:
                self._render_flash(out, width, room, muted, full=False)
            else:
                self._render_flash_hint(out, muted)
        return out

    def _render_row(self, out: Text, probs: np.ndarray, width: int, muted: Style) -> None:
        # probs: (heads, T). Show the last `cols` positions; one text row per head.
        probs = probs.astype(np.float32)
        cols = min(probs.shape[1], width - 4)
        start = probs.shape[1] - cols
        for h in range(probs.shape[0]):
            row = probs[h, start:]
            peak = float(row.max()) or 1.0
            out.append(f"h{h:<2} ", muted)
            for v in row:
                ch, st = self._cell_style(float(v) / peak)
                out.append(ch, st)
            out.append("\n")
        mean = probs.mean(axis=0)
        top = np.argsort(mean)[::-1][:4]
        out.append("most attended: ", muted)
        for j in top:
            piece = self.pieces[j] if j < len(self.pieces) else "?"
            out.append(label(piece, 10).rstrip(), self.get_component_rich_style("attention--focus"))
            out.append(f" {mean[j]:.2f}  ", muted)
        out.append("\n")

    def _render_matrix(self, out: Text, width: int, muted: Style) -> None:
        positions = sorted(self.rows)
        lab = 8
        cols = max(width - lab - 1, 4)
        max_rows = max(self.size.height - 3, 2)
        half = self.depth != "16"                 # two matrix rows per text row
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
                    out.append(" ", blank)
                elif half:
                    ch, st = self._cell_style(0.0 if np.isnan(a) else float(a),
                                              0.0 if np.isnan(b) else float(b))
                    out.append(ch, st)
                else:
                    ch, st = self._cell_style(float(a))
                    out.append(ch, st)
            out.append("\n")

    # ------------------------------------------------------------------ the flash view
    @property
    def flash_tile(self) -> int:
        """The tile being consumed in this frame (n_tiles once all are done)."""
        if self.flash is None:
            return 0
        return min(self.flash_frame, len(self.flash.running_max))

    def _render_flash_hint(self, out: Text, muted: Style) -> None:
        f = self.flash
        n = len(f.running_max)
        i = min(self.flash_tile, n - 1)
        out.append(f"flash: tile {i} of {n} · m {f.running_max[i]:.3g} · "
                   f"ℓ {f.running_sum[i]:.3g} · m twice: the tile animation\n", muted)

    def _render_flash(self, out: Text, width: int, rows: int, muted: Style, full: bool) -> None:
        """The online softmax, one tile per frame: a strip of key tiles (consumed, current,
        still to come), bars of the running max m and sum ℓ after each consumed tile, and what
        this tile did to them. Compact: 8 lines; full: the bars as tall as the pane allows."""
        f = self.flash
        ms, ls = f.running_max, f.running_sum
        n = len(ms)
        cur = self.flash_tile                        # == n: every tile consumed
        style = self.get_component_rich_style
        done_st, cur_st, todo_st = style("flash--done"), style("flash--current"), style("flash--todo")
        rescale_st, focus = style("flash--rescale"), style("attention--focus")
        where = (f"online softmax · layer {f.layer} head {f.head} · " if width >= 70
                 else f"flash L{f.layer} h{f.head} · ")
        out.append(f"{where}{n} tile{'s' * (n != 1)} × {f.tile_size} keys · ", muted)
        out.append(f"tile {cur} of {n}" if cur < n else f"all {n} done", focus)
        out.append(" ▶\n" if self.flash_playing else " paused\n", muted)

        # Tile columns: up to 4 cells each (the last one a gap); a window around the current
        # tile when they don't fit; room on the right for the values.
        label_w, value_w = 5, 9
        area = max(width - label_w - value_w, 4)
        cw = max(1, min(4, area // n))
        cap = max(area // cw, 1)
        first = max(0, min(cur - cap // 2, n - cap)) if n > cap else 0
        shown = range(first, min(first + cap, n))
        rose = [i > 0 and ms[i] > ms[i - 1] for i in range(n)]

        out.append("keys ", muted)
        for i in shown:
            st = done_st if i < cur else (cur_st if i == cur else todo_st)
            out.append(self._cell("█" if i <= cur else "░", cw), st)
        hint = "  p pause · . step"
        if width - label_w - cw * len(shown) >= len(hint):
            out.append(hint, muted)
        out.append("\n")

        height = max(1, min(6, (rows - 8) // 2 + 1)) if full else 1
        i = min(cur, n - 1)
        # m: from a little below its smallest value, so the first tile's bar is not empty.
        lo, hi = min(ms), max(ms)
        base = lo - 0.25 * (hi - lo) if hi > lo else lo - 1.0
        self._flash_bars(out, "m", [(v - base) / (hi - base) for v in ms], shown, cur, cw,
                         height, rose, done_st, rescale_st, muted, f"{ms[i]:.3f}")
        top = max(ls) or 1.0
        self._flash_bars(out, "ℓ", [v / top for v in ls], shown, cur, cw, height, rose,
                         done_st, rescale_st, muted, f"{ls[i]:.3f}")

        # What this tile did, with its numbers.
        if cur >= n:
            out.append(f"all {n} tiles: m = {ms[-1]:.3f}, ℓ = {ls[-1]:.3f}\n", focus)
            out.append("out = acc / ℓ = softmax·V; no row of scores was stored\n", muted)
        else:
            keys = self._tile_keys(i, f.tile_size, n)
            if i == 0:
                out.append(f"tile 0 ({keys}): m = {ms[0]:.3f}, its own max\n", focus)
                out.append(f"ℓ = Σ e^(s − m) = {ls[0]:.3f}\n", muted)
            elif rose[i]:
                own = ls[i] - float(np.exp(ms[i - 1] - ms[i])) * ls[i - 1]
                out.append(f"tile {i} ({keys}): new max, m {ms[i - 1]:.3f} → {ms[i]:.3f}\n",
                           rescale_st)
                out.append(f"ℓ = {ls[i - 1]:.3f}·e^({ms[i - 1]:.3f}−{ms[i]:.3f}) + {own:.3f} "
                           f"= {ls[i]:.3f}\n", muted)
            else:
                out.append(f"tile {i} ({keys}): max unchanged, m = {ms[i]:.3f}\n", focus)
                out.append(f"ℓ = {ls[i - 1]:.3f} + {ls[i] - ls[i - 1]:.3f} (this tile) "
                           f"= {ls[i]:.3f}\n", muted)
        rule = ("online softmax: m ← max(m, max s)", "ℓ ← ℓ·e^(m_old − m_new) + Σ e^(s − m_new)")
        if width >= len(rule[0]) + len(rule[1]) + 3:
            out.append(f"{rule[0]} · {rule[1]}\n", muted)
        else:
            out.append(f"{rule[0]}\n    {rule[1]}\n", muted)

    def _tile_keys(self, i: int, size: int, n: int) -> str:
        """'keys a–b' of tile i; the last tile ends at the newest position we know of."""
        hi = (i + 1) * size - 1
        if i == n - 1 and i * size < len(self.pieces) <= hi:
            hi = len(self.pieces) - 1
        return f"keys {i * size}–{hi}"

    @staticmethod
    def _cell(ch: str, cw: int) -> str:
        return ch * (cw - 1) + " " if cw > 1 else ch

    def _flash_bars(self, out: Text, name: str, values: list[float], shown: range, cur: int,
                    cw: int, height: int, rose: list[bool], done_st: Style, rescale_st: Style,
                    muted: Style, value: str) -> None:
        """A bar per consumed tile, `height` rows tall in eighth blocks, and the current value
        on the bottom row; tiles where the max rose (ℓ rescaled) in the warning colour."""
        blank = self.rich_style
        for r in range(height):
            bottom = r == height - 1
            out.append(f"{name:<5}" if bottom else " " * 5, muted)
            for i in shown:
                if i > cur:
                    out.append(" " * cw, blank)
                    continue
                eighths = max(1, round(values[i] * height * 8))
                fill = min(max(eighths - (height - 1 - r) * 8, 0), 8)
                out.append(self._cell(BARS[fill], cw), rescale_st if rose[i] else done_st)
            if bottom:
                out.append(f" {value}", muted)
            out.append("\n")

    # ------------------------------------------------------------------ actions
    def action_layer(self, delta: int) -> None:
        self.shown_layer = (self.shown_layer + delta) % max(self.n_layers, 1)

    def action_head(self, delta: int) -> None:
        self.shown_head = (self.shown_head + delta) % max(self.n_heads, 1)

    def action_toggle_mode(self) -> None:
        """row → matrix → flash (when a flash run sent its tiles) → row."""
        if self.view == "row":
            self.mode = "matrix"
        elif self.mode == "matrix" and self.flash is not None:
            self.mode = "flash"
        else:
            self.mode = "row"

    def action_flash_play(self) -> None:
        """Pause or resume the flash animation."""
        self.flash_playing = not self.flash_playing
        if self._flash_timer is not None:
            if self.flash_playing and self.flash is not None:
                self._flash_timer.resume()
            else:
                self._flash_timer.pause()
        self.refresh()

    def action_flash_step(self) -> None:
        """Pause and move one tile on (after the last: the finished state, then tile 0)."""
        if self.flash is None:
            return
        if self.flash_playing:
            self.action_flash_play()
        self.flash_frame = (self.flash_tile + 1) % (len(self.flash.running_max) + 1)
        self.refresh()
