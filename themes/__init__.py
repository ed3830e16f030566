"""The app's colours: three Textual `Theme` objects and the heatmap colour ramps.

Every colour the UI draws comes from here — widgets use `$theme-variables` in CSS, and the
heatmap asks `themes.ramps` for a colour per probability. `THEMES` maps the names the command
line accepts (`--theme dark|light|projector`) to the registered theme names.
"""

from __future__ import annotations

from textual.theme import Theme

DARK = Theme(
    name="minillm-dark",
    primary="#5fafff",
    secondary="#af87ff",
    accent="#ffaf5f",
    foreground="#d7dae0",
    background="#15171c",
    surface="#1d2027",
    panel="#262a33",
    success="#87d787",
    warning="#ffd75f",
    error="#ff6b6b",
    dark=True,
    variables={
        "token-even": "#d7dae0",      # alternating shades make token boundaries visible
        "token-odd": "#8fc7ff",
        "token-prompt": "#6c7380",
        "block-free": "#3a3f4b",
        "footer-key-foreground": "#ffaf5f",
    },
)

LIGHT = Theme(
    name="minillm-light",
    primary="#005fd7",
    secondary="#8700af",
    accent="#af5f00",
    foreground="#1c1e24",
    background="#fafafa",
    surface="#eef0f3",
    panel="#dde1e7",
    success="#2e7d32",
    warning="#9a6700",
    error="#c62828",
    dark=False,
    variables={
        "token-even": "#1c1e24",
        "token-odd": "#005fd7",
        "token-prompt": "#8a8f99",
        "block-free": "#c5cad3",
        "footer-key-foreground": "#af5f00",
    },
)

# A projector washes out dark greys and thin colour differences: pure black, pure white,
# saturated primaries, and no meaning carried by a subtle shade alone.
PROJECTOR = Theme(
    name="minillm-projector",
    primary="#00d7ff",
    secondary="#ff5fff",
    accent="#ffff00",
    foreground="#ffffff",
    background="#000000",
    surface="#000000",
    panel="#1c1c1c",
    success="#00ff00",
    warning="#ffff00",
    error="#ff3030",
    dark=True,
    variables={
        "token-even": "#ffffff",
        "token-odd": "#ffff00",
        "token-prompt": "#a8a8a8",
        "block-free": "#585858",
        "border": "#ffffff",
        "footer-key-foreground": "#ffff00",
    },
)

ALL = (DARK, LIGHT, PROJECTOR)

# The custom variables every theme must define; values used for Textual's own themes
# (textual-dark etc. in the command palette), which know nothing of them.
VARIABLE_DEFAULTS = {"token-even": "#d7dae0", "token-odd": "#8fc7ff", "token-prompt": "#808080",
                     "block-free": "#606060"}
THEMES = {"dark": DARK.name, "light": LIGHT.name, "projector": PROJECTOR.name,
          "high-contrast": PROJECTOR.name, "contrast": PROJECTOR.name}


def theme_name(flag: str | None) -> str:
    """The registered name for a --theme value (a registered name is accepted as is)."""
    if not flag:
        return DARK.name
    if flag in THEMES:
        return THEMES[flag]
    return flag


__all__ = ["DARK", "LIGHT", "PROJECTOR", "ALL", "THEMES", "VARIABLE_DEFAULTS", "theme_name"]
