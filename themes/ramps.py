"""Colour ramps for heatmaps, chosen per terminal colour depth.

    truecolor  viridis (perceptually uniform, readable by most colour-blind viewers) or magma
    256        a grey ramp: xterm's 24 greys (232–255) are evenly spaced, so it stays faithful,
               whereas a viridis downsampled to the 6×6×6 cube bands badly
    16 / mono  shade characters ░▒▓█ in the theme's foreground: intensity by ink, not hue

`cell(value, depth)` returns (character, colour or None) for a value in [0, 1].
"""

from __future__ import annotations

from rich.color import Color

# 9 stops of each ramp, sampled from matplotlib's definitions (linear interpolation between).
VIRIDIS = ["#440154", "#472d7b", "#3b528b", "#2c728e", "#21918c",
           "#28ae80", "#5ec962", "#addc30", "#fde725"]
MAGMA = ["#000004", "#1c1044", "#4f127b", "#812581", "#b5367a",
         "#e55064", "#fb8761", "#fec287", "#fcfdbf"]
SHADES = " ░▒▓█"


def _hex(h: str) -> tuple[int, int, int]:
    return int(h[1:3], 16), int(h[3:5], 16), int(h[5:7], 16)


def _build(stops: list[str], n: int = 64) -> list[Color]:
    rgb = [_hex(s) for s in stops]
    out = []
    for i in range(n):
        x = i / (n - 1) * (len(rgb) - 1)
        lo = min(int(x), len(rgb) - 2)
        t = x - lo
        a, b = rgb[lo], rgb[lo + 1]
        out.append(Color.from_rgb(*(round(a[k] + (b[k] - a[k]) * t) for k in range(3))))
    return out


_TRUE = {"viridis": _build(VIRIDIS), "magma": _build(MAGMA)}
_GREY = [Color.from_ansi(232 + i) for i in range(24)]


def depth_of(color_system: str | None) -> str:
    """Normalise Rich's colour system names to 'truecolor' | '256' | '16'."""
    if color_system in ("truecolor", "256"):
        return color_system
    return "16"


def colour(value: float, depth: str, ramp: str = "viridis") -> Color:
    """The ramp's colour for value in [0, 1] (truecolor or 256 only)."""
    v = 0.0 if value != value else min(max(value, 0.0), 1.0)    # nan → 0
    if depth == "truecolor":
        table = _TRUE.get(ramp, _TRUE["viridis"])
    else:
        table = _GREY
    return table[round(v * (len(table) - 1))]


def shade(value: float) -> str:
    """A shade character for value in [0, 1] (16 colours or none)."""
    v = 0.0 if value != value else min(max(value, 0.0), 1.0)
    return SHADES[round(v * (len(SHADES) - 1))]
