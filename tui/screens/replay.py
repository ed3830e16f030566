"""The main screen, steered: a recording (engine/player.py's Player) played like a video."""

from __future__ import annotations

from textual.binding import Binding

from ..widgets.status_bar import replay_text
from .main import NARROW_WIDTH, MainScreen


def steer_bindings(unit: str = "token", show_speed: bool = True) -> list[Binding]:
    """The keys that steer a recording (an `action_steer(verb)` of the screen), for the
    replay's panes and for every screen a replay can open over them (step mode, the server
    view). Priority: they win over the focused widget's own arrow keys; a screen's
    check_action can turn them off when nothing is being replayed. `unit`: what ← → move by."""
    return [
        Binding("space", "steer('toggle')", "Play/pause", priority=True),
        Binding("left", "steer('back')", f"◀ {unit}", priority=True),
        Binding("right", "steer('forward')", f"{unit} ▶", priority=True),
        Binding("minus", "steer('slower')", "Slower", show=show_speed, priority=True),
        Binding("plus,equals_sign", "steer('faster')", "Faster", show=show_speed,
                priority=True),
        Binding("home", "steer('start')", "Start", show=False, priority=True),
        Binding("end", "steer('end')", "End", show=False, priority=True),
    ]


class ReplayScreen(MainScreen):
    """The panes as the recording had them at the current token. `space` plays or pauses,
    `←` `→` step one token (back: the recording is delivered again up to there, so every pane
    shows that moment), `−` `+` change the speed, `home` `end` jump. Priority bindings: they
    win over the focused pane's own arrow keys; the pane keys (layer, head, view, zoom) still
    work on what has been played."""

    BINDINGS = steer_bindings()

    def __init__(self, player, prompt: str) -> None:
        super().__init__(prompt, read_only=True)
        self.player = player

    def on_mount(self) -> None:
        self.loading("reading the recording…")
        if self.player.recording.notice:
            self.notify(self.player.recording.notice, title="Recording damaged",
                        severity="warning", timeout=12)

    def action_steer(self, verb: str) -> None:
        """toggle, forward, back, faster, slower, start, end."""
        p = self.player
        {"toggle": p.toggle, "forward": lambda: p.step(1), "back": lambda: p.step(-1),
         "faster": lambda: p.faster(1), "slower": lambda: p.faster(-1), "start": p.to_start,
         "end": p.to_end}[verb]()
        self.show_position()

    def show_position(self) -> None:
        self.status.replay = replay_text(self.player.state, self.size.width < NARROW_WIDTH)
