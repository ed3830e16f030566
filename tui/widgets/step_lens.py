"""Step mode's logit lens: what each layer would predict, first layer to last."""

from __future__ import annotations

from typing import ClassVar

from rich.text import Text
from textual.reactive import reactive
from textual.widget import Widget

from engine.events import LensLayer, LogitLens

from .step_candidates import percent, token_label


class StepLens(Widget):
    """One row per layer: the top prediction read from that layer's residual stream through
    the final norm and the LM head (more of them where there is room).

    Rows from the layer where the answer settles on are marked (the model "knows" from there);
    the last row is the model's own prediction. Beside a lossy fast path the exact model's row
    comes first and the lossy one's after it, and the first layer where they part is marked.
    The pane sits in a scrolling container: 30 layers do not fit 24 rows.
    """

    DEFAULT_CSS = """
    StepLens { height: auto; background: $surface; padding: 0 1; text-wrap: nowrap;
               text-overflow: ellipsis; }
    StepLens > .step-lens--header { color: $text-muted; text-style: italic; }
    StepLens > .step-lens--layer { color: $text-muted; }
    StepLens > .step-lens--settled { color: $success; text-style: bold; }
    StepLens > .step-lens--parts { color: $error; text-style: bold; }
    StepLens > .step-lens--muted { color: $text-muted; }
    """

    COMPONENT_CLASSES: ClassVar[set[str]] = {
        "step-lens--header", "step-lens--layer", "step-lens--settled", "step-lens--parts",
        "step-lens--muted"}

    lens: reactive[LogitLens | None] = reactive(None, layout=True)
    """The lens at the current pause (None: none yet)."""

    def render(self) -> Text:
        lens = self.lens
        style = self.get_component_rich_style
        if lens is None:
            return Text("the lens appears at the first pause", style=style("step-lens--muted"))
        width = max(self.content_region.width, 20)
        settles, parts = lens.settles_at, lens.parts_at
        final = lens.layers[-1].top if lens.layers else None
        tag = max(3, len(f"L{len(lens.layers) - 1}"))
        t = Text(no_wrap=True, overflow="ellipsis")
        # a token's label: as wide as fits (16 at most), each followed by its percentage — two
        # of them side by side beside a lossy path, without percentages where that is too wide
        numbers = True
        if lens.exact:
            column = (width - tag - 2 - 2 * 6 - 8) // 2
            if column < 6:
                numbers, column = False, (width - tag - 2 - 2) // 2
            column = max(4, min(16, column))
            t.append(f"{'':{tag}} {'exact':{column + 6 * numbers + 1}}{lens.fast or 'lossy'}\n",
                     style("step-lens--header"))
        else:
            column = max(6, min(16, width - tag - 1 - 6))
        for i, layer in enumerate(lens.layers):
            line = Text(no_wrap=True, overflow="ellipsis")
            line.append(f"L{layer.layer:<{tag - 1}} ", style("step-lens--layer"))
            if lens.exact:
                exact = lens.exact[i] if i < len(lens.exact) else None
                if exact is not None:
                    self._top(line, exact, column, None, numbers)
                line.append(" ")
                mine = style("step-lens--parts") if parts is not None and layer.layer >= parts \
                    and layer.top != (exact.top if exact else None) else None
                self._top(line, layer, column, mine, numbers)
                if layer.layer == parts:
                    line.append(" ✗ parts" if numbers else " ✗", style("step-lens--parts"))
            else:
                settled = settles is not None and layer.layer >= settles and layer.top == final
                self._top(line, layer, column, style("step-lens--settled") if settled else None)
                room = width - line.cell_len
                for tid, text, p in list(zip(layer.ids, layer.texts, layer.probs))[1:]:
                    piece = f"  {token_label(text, 10)}{percent(p)}"
                    if len(piece) > room:
                        break
                    line.append(piece, style("step-lens--muted"))
                    room -= len(piece)
            t.append_text(line)
            t.append("\n")
        t.rstrip()
        return t

    @staticmethod
    def _top(line: Text, layer: LensLayer, width: int, emphasis, numbers: bool = True) -> None:
        if not layer.ids:
            line.append(" " * (width + 6 * numbers))
            return
        line.append(token_label(layer.texts[0], width), emphasis)
        if numbers:
            line.append(percent(layer.probs[0]))

    def summary(self) -> str:
        """One line for the pane's subtitle: where the answer settles, where a lossy path
        parts from the exact one."""
        lens = self.lens
        if lens is None or not lens.layers:
            return ""
        if lens.exact:
            parts = lens.parts_at
            return (f"{lens.fast} parts at L{parts}" if parts is not None
                    else f"{lens.fast} agrees at every layer")
        return f"settles at L{lens.settles_at}"
