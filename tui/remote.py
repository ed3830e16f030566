"""How the app shows a remote lane: a race contestant that ran on an OpenAI-compatible server
(`--endpoint`, engine/remote.py). The engine streams it and compares its tokens; this module only
words what came back — which panes a server cannot fill, and the server's own figures."""

from __future__ import annotations

import math

from engine.events import RaceRow, Started
from engine.remote import server_figures
from engine.requests import REMOTE


def remote_label(label: str) -> bool:
    """Is the lane named "remote/host:port" a server's?"""
    return label.startswith(REMOTE + "/")


def remote_server(started: Started) -> str:
    """The server a run streams from (its URL), or "" for a local run."""
    return started.device if started.strategy == REMOTE else ""


def not_exposed(server: str, what: str) -> str:
    """What a pane that needs the engine's insides says while a remote run is followed."""
    return (f"{server} is a remote server: it does not expose its {what} over the API — a "
            f"local lane shows it")


def row_note(row: RaceRow) -> str:
    """A remote contestant's line under the race table: its server's figures beside the
    client's, how its tokens were compared, and its error in full."""
    if row.error:
        return f"{row.label}: {row.error}"
    parts = [f"client: TTFT {row.ttft_s * 1e3:.0f} ms" if not math.isnan(row.ttft_s) else "",
             server_figures(row.server_metrics, row.server_timings),
             f"compared by {row.comparison}" if row.comparison and
             not row.comparison.startswith("not compared") else row.comparison]
    return f"{row.label}: " + " · ".join(p for p in parts if p)
