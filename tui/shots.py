"""Where screenshots go: `--shots DIR`, else a private folder under the cache root.

Textual's own screenshot command writes to ~/Downloads, which a server usually does not have
(the palette's Screenshot then failed); the app saves to a folder it makes sure exists and
says the path in a notification, so it can be copied off the machine (`scp host:PATH .`).
"""

from __future__ import annotations

import time
from pathlib import Path

from engine.files import cache_root, private_dir


def shots_folder(chosen: str | None = None) -> Path:
    """The screenshots folder, created if needed: `chosen` as given (made 0700 if new), else
    <cache root>/screenshots, private like the rest of the cache (engine/files.py)."""
    if chosen:
        folder = Path(chosen).expanduser()
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        return folder
    root = cache_root()
    root.parent.mkdir(parents=True, exist_ok=True)
    return private_dir(root / "screenshots", root)


def save_screenshot(app, chosen: str | None, say) -> str | None:
    """Save `app`'s screen as SVG in the screenshots folder; say where (or why not)."""
    try:
        folder = shots_folder(chosen)
        saved = app.save_screenshot(time.strftime("minillm-%Y%m%d-%H%M%S.svg"), str(folder))
    except OSError as exc:
        say(f"screenshot not saved: {exc}", title="Screenshot", severity="error")
        return None
    say(f"saved {saved}", title="Screenshot", timeout=8)
    return saved
