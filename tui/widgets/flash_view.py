"""The flash view: the online softmax of the flash backend, one key/value tile per frame.

`draw` turns a FlashTiles event (the running max m and running sum ℓ after each tile) and the
tile being shown into text: a strip of key tiles (consumed, current, still to come), bars of m
and ℓ after each consumed tile — where a tile brought a larger max, ℓ was rescaled by
exp(m_old − m_new) and its bar drops, drawn in the warning colour — and the arithmetic of the
current tile. The attention pane (tui/widgets/attention.py) owns the animation and calls this.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from rich.style import Style
from rich.text import Text

from engine.events import FlashTiles

BARS = " ▁▂▃▄▅▆▇█"


def draw(out: Text, f: FlashTiles, cur: int, playing: bool, width: int, rows: int, n_keys: int,
         style: Callable[[str], Style], blank: Style, full: bool) -> None:
    """The online softmax, one tile per frame: a strip of key tiles (consumed, current,
    still to come), bars of the running max m and sum ℓ after each consumed tile, and what
    this tile did to them. Compact: 8 lines; full: the bars as tall as the pane allows."""
    ms, ls = f.running_max, f.running_sum
    n = len(ms)                                  # cur == n: every tile consumed
    muted = style("attention--label")
    done_st, cur_st, todo_st = style("flash--done"), style("flash--current"), style("flash--todo")
    rescale_st, focus = style("flash--rescale"), style("attention--focus")
    where = (f"online softmax · layer {f.layer} head {f.head} · " if width >= 70
             else f"flash layer {f.layer} head {f.head} · ")
    out.append(f"{where}{n} tile{'s' * (n != 1)} × {f.tile_size} keys · ", muted)
    out.append(f"tile {cur} of {n}" if cur < n else f"all {n} done", focus)
    out.append(" ▶\n" if playing else " paused\n", muted)

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
        out.append(_cell("█" if i <= cur else "░", cw), st)
    hint = "  p pause · . step"
    if width - label_w - cw * len(shown) >= len(hint):
        out.append(hint, muted)
    out.append("\n")

    height = max(1, min(12 if rows > 30 else 6, (rows - 8) // 2 + 1)) if full else 1
    i = min(cur, n - 1)
    # m: from a little below its smallest value, so the first tile's bar is not empty.
    lo, hi = min(ms), max(ms)
    base = lo - 0.25 * (hi - lo) if hi > lo else lo - 1.0
    _bars(out, "m", [(v - base) / (hi - base) for v in ms], shown, cur, cw,
                     height, rose, done_st, rescale_st, muted, blank, f"{ms[i]:.3f}")
    top = max(ls) or 1.0
    _bars(out, "ℓ", [v / top for v in ls], shown, cur, cw, height, rose,
                     done_st, rescale_st, muted, blank, f"{ls[i]:.3f}")

    # What this tile did, with its numbers.
    if cur >= n:
        out.append(f"all {n} tiles: m = {ms[-1]:.3f}, ℓ = {ls[-1]:.3f}\n", focus)
        out.append("out = acc / ℓ = softmax·V; no row of scores was stored\n", muted)
    else:
        keys = _tile_keys(i, f.tile_size, n, n_keys)
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

def _tile_keys(i: int, size: int, n: int, n_keys: int) -> str:
    """'keys a–b' of tile i; the last tile ends at the newest position we know of."""
    hi = (i + 1) * size - 1
    if i == n - 1 and i * size < n_keys <= hi:
        hi = n_keys - 1
    return f"keys {i * size}–{hi}"

def _cell(ch: str, cw: int) -> str:
    return ch * (cw - 1) + " " if cw > 1 else ch

def _bars(out: Text, name: str, values: list[float], shown: range, cur: int, cw: int,
          height: int, rose: list[bool], done_st: Style, rescale_st: Style, muted: Style,
          blank: Style, value: str) -> None:
    """A bar per consumed tile, `height` rows tall in eighth blocks, and the current value
    on the bottom row; tiles where the max rose (ℓ rescaled) in the warning colour."""
    for r in range(height):
        bottom = r == height - 1
        out.append(f"{name:<5}" if bottom else " " * 5, muted)
        for i in shown:
            if i > cur:
                out.append(" " * cw, blank)
                continue
            eighths = max(1, round(values[i] * height * 8))
            fill = min(max(eighths - (height - 1 - r) * 8, 0), 8)
            out.append(_cell(BARS[fill], cw), rescale_st if rose[i] else done_st)
        if bottom:
            out.append(f" {value}", muted)
        out.append("\n")
