"""Bytes, times and rates, written one way in the app, the bench and the docs.

Memory is counted in binary units — KiB, MiB, GiB (1 KiB = 1024 bytes) — as the operating system
and the allocators count it, so a cache the app shows as 1.5 MiB is 1.5 MiB in the bench's tables
too. Bandwidths use the same units per second (GiB/s). Times are milliseconds below one second and
seconds above. A missing figure (None, or nan: "not measured", "fewer than two tokens") is "—".

No torch here: the app imports this module, and the app never imports torch.
"""

from __future__ import annotations

import math

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
MISSING = "—"
_BINARY = (("GiB", GiB), ("MiB", MiB), ("KiB", KiB))


def missing(x) -> bool:
    """No figure to show: None, or a float nan."""
    return x is None or (isinstance(x, float) and math.isnan(x))


def format_bytes(n) -> str:
    """123 B, 4.0 KiB, 1.5 MiB, 2.1 GiB (negative amounts keep their sign)."""
    if missing(n):
        return MISSING
    for unit, size in _BINARY:
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def format_bandwidth(bytes_per_s) -> str:
    """Bytes per second in the units memory is counted in: 12.3 GiB/s."""
    if missing(bytes_per_s):
        return MISSING
    return format_bytes(bytes_per_s) + "/s"


def format_seconds(x) -> str:
    """2.31 s from one second up, 12.3 ms below."""
    if missing(x):
        return MISSING
    return f"{x:.2f} s" if abs(x) >= 1 else f"{x * 1e3:.1f} ms"


def format_ms(x, fmt: str = "{:.1f}") -> str:
    """Seconds as a bare number of milliseconds (for a column or a lane headed "ms")."""
    return MISSING if missing(x) else fmt.format(x * 1e3)


def format_number(x, fmt: str = "{:.1f}") -> str:
    """A rate, ratio or count in `fmt`: tokens per second under a "tok/s" heading, "1.23×"."""
    return MISSING if missing(x) else fmt.format(x)


def format_rate(tokens_per_s, unit: str = "tok/s") -> str:
    """12.3 tok/s."""
    return MISSING if missing(tokens_per_s) else f"{tokens_per_s:.1f} {unit}"
