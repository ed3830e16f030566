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
    For the flash backend, the running max and sum of the online softmax are shown per tile.
    """

    DEFAULT_CSS = """
    AttentionPane { background: $surface; padding: 0 1; height: 1fr; }
    AttentionPane > .attention--label { color: $text-muted; }
    AttentionPane > .attention--ink { color: $foreground; }
    AttentionPane > .attention--focus { color: $accent; text-style: bold; }
    """

    COMPONENT_CLASSES = {"attention--label", "attention--ink", "attention--focus"}

    shown_layer: reactive[int] = reactive(0)
    """Which layer's attention is drawn."""
    shown_head: reactive[int] = reactive(0)
    """Which head the matrix view shows (the row view shows all heads)."""
    mode: reactive[str] = reactive("row")
    """'row' (all heads, newest token) or 'matrix' (one head, all positions)."""
    depth: reactive[str] = reactive("truecolor")
    """Colour depth to draw for: 'truecolor', '256' or '16'."""

    def __init__(self, *, name=None, id=None, classes=None) -> None:
        super().__init__(name=name, id=id, classes=classes)
        self.rows: dict[int, np.ndarray] = {}       # position → (layers, heads, position + 1)
        self.pieces: list[str] = []                  # token texts by position, for labels
        self.flash = None                            # the last FlashTiles event
        self.n_layers, self.n_heads = 1, 1

    def reset(self, pieces=()) -> None:
        self.rows, self.pieces, self.flash = {}, list(pieces), None
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

    def render(self) -> Text:
        muted = self.get_component_rich_style("attention--label")
        if not self.rows:
            return Text("no attention rows yet — run a prompt; keys [ ] layer, { } head, "
                        "m row/matrix", muted)
        width = max(self.size.width - 2, 12)
        newest = max(self.rows)
        out = Text()
        view = "row: heads × positions" if self.mode == "row" else f"matrix: head {self.shown_head}"
        out.append(f"layer {self.shown_layer}/{self.n_layers - 1} · {view} · {self.depth}\n", muted)
        if self.mode == "row":
            self._render_row(out, self.rows[newest][self.shown_layer], width, muted)
        else:
            self._render_matrix(out, width, muted)
        if self.flash is not None:
            self._render_flash(out, muted)
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

    def _render_flash(self, out: Text, muted: Style) -> None:
        f = self.flash
        out.append(f"flash tiles (layer {f.layer}, head {f.head}, {f.tile_size} keys each): "
                   "running max m / running sum ℓ\n", muted)
        for i, (m, s) in enumerate(zip(f.running_max, f.running_sum)):
            if i >= 6:
                out.append(f"… {len(f.running_max) - 6} more tiles\n", muted)
                break
            out.append(f" tile {i}: m={m:7.3f}  ℓ={s:9.3f}\n")

    # ------------------------------------------------------------------ actions
    def action_layer(self, delta: int) -> None:
        self.shown_layer = (self.shown_layer + delta) % max(self.n_layers, 1)

    def action_head(self, delta: int) -> None:
        self.shown_head = (self.shown_head + delta) % max(self.n_heads, 1)

    def action_toggle_mode(self) -> None:
        self.mode = "matrix" if self.mode == "row" else "row"
