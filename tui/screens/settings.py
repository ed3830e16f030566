"""Sampling settings and max tokens, checked by the engine's own config validation."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Grid, Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label

FIELDS = [("temperature", "temperature (0 = greedy)"), ("top_k", "top-k (empty = off)"),
          ("top_p", "top-p (empty = off)"), ("min_p", "min-p (empty = off)"),
          ("repetition_penalty", "repetition penalty (1 = off)"), ("seed", "seed (empty = random)"),
          ("max_new_tokens", "max new tokens")]
INTS = {"top_k", "seed", "max_new_tokens"}


def parse(values: dict[str, str]) -> tuple[dict, int]:
    """Text fields → (SamplingConfig kwargs, max_new_tokens). Raises ConfigError/ValueError."""
    from engine.config import ConfigError, SamplingConfig
    out: dict = {}
    for key, text in values.items():
        text = text.strip()
        if not text:
            if key in ("temperature",):
                out[key] = 0.0
            elif key == "repetition_penalty":
                out[key] = 1.0
            elif key == "max_new_tokens":
                raise ConfigError("max new tokens must be a number")
            else:
                out[key] = None
            continue
        try:
            out[key] = int(text) if key in INTS else float(text)
        except ValueError:
            kind = "a whole number" if key in INTS else "a number"
            raise ConfigError(f"{key.replace('_', ' ')} must be {kind}, got {text!r}") from None
    max_new = out.pop("max_new_tokens")
    if max_new <= 0:
        raise ConfigError(f"max new tokens must be ≥ 1, got {max_new}")
    SamplingConfig(**out)                 # the engine's checks, same messages as the CLI
    return out, max_new


class SettingsScreen(ModalScreen[tuple[dict, int] | None]):
    """Edit sampling and length; returns (sampling kwargs, max_new_tokens) or None.

    It opens with the first field focused (typing and enter work at once) and fits in an
    80×24 terminal: one line per field, Save and Cancel included.
    """

    AUTO_FOCUS = "#temperature"
    BINDINGS = [("escape", "cancel", "Cancel")]

    DEFAULT_CSS = """
    SettingsScreen { align: center middle; }
    SettingsScreen > Vertical { width: 64; max-width: 100%; height: auto; max-height: 100%;
                                background: $surface; border: thick $primary; padding: 0 1; }
    SettingsScreen Grid { grid-size: 2; grid-columns: 30 1fr; height: auto; grid-gutter: 1 1;
                          margin: 1 0; }
    SettingsScreen Horizontal { height: auto; align: right middle; }
    SettingsScreen Button { margin-left: 1; }
    """

    def __init__(self, sampling: dict, max_new_tokens: int) -> None:
        super().__init__()
        self.initial = dict(sampling, max_new_tokens=max_new_tokens)

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label("[b]Sampling and length[/b]  (enter saves, escape cancels)")
            with Grid():
                for key, text in FIELDS:
                    value = self.initial.get(key)
                    yield Label(text)
                    yield Input("" if value is None else str(value), id=key, compact=True)
            with Horizontal():
                yield Button("Save", variant="primary", id="save", compact=True)
                yield Button("Cancel", id="cancel", compact=True)

    def _save(self) -> None:
        from engine.config import ConfigError
        values = {key: self.query_one(f"#{key}", Input).value for key, _ in FIELDS}
        try:
            result = parse(values)
        except (ConfigError, ValueError) as exc:
            self.notify(str(exc), title="Invalid setting", severity="error")
            return
        self.dismiss(result)

    def on_input_submitted(self) -> None:
        self._save()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "save":
            self._save()
        else:
            self.dismiss(None)

    def action_cancel(self) -> None:
        self.dismiss(None)
