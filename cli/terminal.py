"""What the command line does with the terminal's streams: one-line messages on stderr, the
loading progress bar, and standard streams that are closed or whose reader left."""

from __future__ import annotations

import os
import sys
import traceback


def say(line: str) -> None:
    """A line on stderr, even when stderr is closed (then nothing)."""
    try:
        print(line, file=sys.stderr, flush=True)
    except (OSError, ValueError, AttributeError):   # stderr closed too: nothing more to do
        pass


def print_traceback(debug: bool) -> None:
    """The traceback of the exception being handled, with --debug or MINILLM_DEBUG=1."""
    if debug:
        try:
            traceback.print_exc()
        except (OSError, ValueError, AttributeError):
            pass


def discard_stdout() -> None:
    """After a broken pipe, point stdout at /dev/null so the interpreter's final flush of what
    is still buffered does not print an "Exception ignored" message."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


def reopen_closed_std_streams() -> None:
    """Started with stdout (or stdin, stderr) closed (`cmd >&-`)? Put /dev/null there: else the
    next file opened would take descriptor 1 and anything printed would land in it."""
    for fd, name, mode in ((0, "stdin", "r"), (1, "stdout", "w"), (2, "stderr", "w")):
        try:
            os.fstat(fd)
        except OSError:
            if os.open(os.devnull, os.O_RDWR) != fd:     # takes the lowest free descriptor
                continue
            if getattr(sys, name) is None:
                setattr(sys, name, open(fd, mode, closefd=False))


def progress_printer(enabled: bool):
    """A one-line progress display on stderr while the model converts or loads."""
    last = [""]

    def show(message: str, fraction: float) -> None:
        if not enabled:
            return
        bar = "█" * int(fraction * 20)
        line = f"\r{message:<32} [{bar:<20}] {fraction * 100:3.0f}%"
        if line != last[0]:
            sys.stderr.write(line)
            sys.stderr.flush()
            last[0] = line
        if fraction >= 1.0:
            sys.stderr.write("\r" + " " * len(line) + "\r")
            sys.stderr.flush()
    return show
