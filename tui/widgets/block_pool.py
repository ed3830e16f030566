"""The batching engine's block pool: who holds each KV block, what is shared, what is wasted.

    ██ ██ ×4 ×4 ██ █░ ██ ██ ██ █░ ·  ·  ○  ·
    ██ a request's block (its lane's colour) · ×4 shared by 4 · █░ last block, ░ unused
    48 blocks of 16 · 31 used · 3 shared · 57 slots unused in last blocks · 2 cached free

Drawn from the newest PoolSnapshot (engine/events.py) only: ref counts, owners, the cached set
and each running sequence's block table and wasted tail come from the engine.
"""

from __future__ import annotations

from rich.style import Style
from rich.text import Text
from textual.reactive import reactive
from textual.widget import Widget

from engine.events import PoolSnapshot

REQUEST_COLOURS = 12     # requests cycle through this many theme colours (6 hues, 2 strengths)
HUES = ("primary", "secondary", "accent", "success", "warning", "foreground")


def request_class(request: int) -> str:
    return f"pool--r{request % REQUEST_COLOURS}"


def request_css(widget: str) -> str:
    """The request colours as component classes of `widget` (the pool and the lanes agree)."""
    return "\n".join(f"{widget} > .pool--r{i} {{ color: ${hue}{' 55%' if i >= len(HUES) else ''}; }}"
                     for i, hue in enumerate(HUES * 2))


class BlockPool(Widget):
    """One cell per block of the pool, coloured by the request that holds it; shared blocks
    show how many sequences hold them; each sequence's last block shows its unused tail (the
    paged cache's only waste). Cells are three columns wide where the pool fits in three rows,
    else two. Its height follows the pool."""

    DEFAULT_CSS = "BlockPool { height: auto; background: $surface; padding: 0 1; }\n" + \
        request_css("BlockPool") + """
    BlockPool > .pool--free { color: $block-free; }
    BlockPool > .pool--label { color: $text-muted; }
    BlockPool > .pool--shared { text-style: bold reverse; }
    """

    COMPONENT_CLASSES = {*(f"pool--r{i}" for i in range(REQUEST_COLOURS)), "pool--free",
                         "pool--label", "pool--shared"}

    snapshot: reactive[PoolSnapshot | None] = reactive(None, layout=True)
    """The newest pool snapshot (None: no batch yet)."""

    def cell_width(self, width: int) -> int:
        s = self.snapshot
        if s is None:
            return 3
        return 3 if -(-s.blocks_total // max(width // 3, 1)) <= 3 else 2

    def _rows(self, width: int) -> int:
        s = self.snapshot
        if s is None:
            return 1
        per_row = max(width // self.cell_width(width), 1)
        return -(-s.blocks_total // per_row) + 2          # the grid, the legend, the figures

    def get_content_height(self, container, viewport, width: int) -> int:
        return self._rows(width)

    def render(self) -> Text:
        s = self.snapshot
        label = self.get_component_rich_style("pool--label")
        if s is None:
            return Text("the pool appears with the first step", label)
        width = max(self.content_region.width, 10)
        cell = self.cell_width(width)
        per_row = max(width // cell, 1)
        last = {seq.blocks[-1]: seq for seq in s.sequences if seq.blocks and seq.waste}
        cached = set(s.cached)
        out = Text(no_wrap=True, overflow="crop")
        free = self.get_component_rich_style("pool--free")
        shared = self.get_component_rich_style("pool--shared")
        gap = " " * (cell - 2)
        for b in range(s.blocks_total):
            if b and b % per_row == 0:
                out.append("\n")
            refs, owner = s.ref_counts[b], s.owners[b]
            colour = self.get_component_rich_style(request_class(owner)) if owner >= 0 else free
            if refs == 0:
                out.append(("○ " if b in cached else "· ") + gap, free)
            elif refs > 1:
                out.append(f"×{refs}"[-2:] if refs < 10 else "×+", colour + shared)
                out.append(gap)
            elif b in last:
                out.append("█", colour)
                out.append("░", colour)
                out.append(gap)
            else:
                out.append("██" + gap, colour)
        out.append("\n")
        self._legend(out, width, label)
        return out

    def _legend(self, out: Text, width: int, label: Style) -> None:
        s = self.snapshot
        colour = self.get_component_rich_style("pool--r0")
        shared = sum(1 for r in s.ref_counts if r > 1)
        waste = sum(seq.waste for seq in s.sequences)
        parts = [("██", colour), (" a request's block (colour = its lane)  ", label),
                 ("×2", colour + self.get_component_rich_style("pool--shared")),
                 (" shared by 2  ", label), ("█░", colour), (" last block, ░ unused  ", label),
                 ("○", label), (" free, in the prefix cache  ", label), ("·", label),
                 (" free", label)]
        line = Text()
        for text, style in parts:
            line.append(text, style)
        if line.cell_len > width:
            line = Text()
            for text, style in parts[2:]:
                line.append(text, style)
        line.truncate(width)
        out.append_text(line)
        out.append("\n")
        cached_free = sum(1 for b in s.cached if s.ref_counts[b] == 0)
        wide = width >= 100
        parts = [f"{s.blocks_total} blocks of {s.block_size}", f"{s.blocks_used} used",
                 f"{shared} shared",
                 f"{waste} slots unused in last blocks" if wide else f"{waste} slots unused",
                 f"{cached_free} free but cached" if wide else f"{cached_free} cached"]
        while len(parts) > 1 and len(" · ".join(parts)) > width:
            parts.pop()
        out.append(" · ".join(parts), label)
