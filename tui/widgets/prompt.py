"""The prompt line: edited only on purpose, so the app's letter keys never land in it."""

from __future__ import annotations

from textual.binding import Binding
from textual.widgets import Input


class PromptInput(Input):
    """An Input that Tab skips: `/` (or a click) starts editing, `enter` runs the prompt,
    `escape` leaves it.

    In a plain Input reached with Tab, the app's keys become text — `o`, meant for the
    settings, replaced the selected prompt and `enter` ran it. Here Tab cycles the panes only,
    and the text is not selected on focus, so a stray key adds a letter instead of replacing
    everything.
    """

    BINDINGS = [Binding("escape", "leave", "Leave the prompt")]

    editing: bool = False
    """The user asked to edit (`/` or a click); Tab and focus_next skip it otherwise."""

    def __init__(self, *, read_only: bool = False, id: str | None = None) -> None:
        super().__init__(placeholder="Type a prompt, enter runs it", id=id,
                         select_on_focus=False)
        self.read_only = read_only           # a replay or a watched session shows its prompt

    def allow_focus(self) -> bool:
        return self.editing and not self.read_only

    def edit(self) -> None:
        """Start editing: focus the field, cursor at the end."""
        self.editing = True
        self.focus()
        self.cursor_position = len(self.value)

    def on_click(self) -> None:
        if not self.read_only:
            self.edit()

    def on_blur(self) -> None:
        self.editing = False

    def action_leave(self) -> None:
        self.editing = False
        self.screen.focus_next()
