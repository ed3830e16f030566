"""Peak memory of one run, not of the whole process so far.

`engine.metrics.peak_memory_bytes` reports the process's high-water mark, which only ever grows:
after the first big run every later row would show the same number. The bench therefore resets
the mark before each run, and reports the mark the run reached (`absolute_bytes`: weights,
caches, activations, everything the process holds) and how far above its starting point that
was (`peak_bytes`):

    CUDA   torch.cuda.reset_peak_memory_stats(); max_memory_allocated (− allocated at start)
    Linux  write "5" to /proc/self/clear_refs (resets VmHWM to the current RSS); VmHWM (− VmRSS)
    other  the process's peak RSS, never reset (then both figures are that peak)

On a CPU "added" is often near zero: the allocator reuses memory an earlier row freed.
"""

from __future__ import annotations

import re

import torch

from ..metrics import peak_memory_bytes
from ..timing import sync


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
        return int(m.group(1)) * 1024 if m else None
    except OSError:
        return None


class PeakMemory:
    """with PeakMemory(device) as pm: …run… ; pm.absolute_bytes, pm.peak_bytes (added)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.start = 0
        self.reset = False
        self.peak_bytes = 0
        self.absolute_bytes = 0      # the high-water mark itself (process or CUDA allocator)

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start, self.reset = torch.cuda.memory_allocated(self.device), True
            return self
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.reset = True
        except OSError:
            self.reset = False
        self.start = _status_kib("VmRSS") or 0
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            sync(self.device)
            self.absolute_bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            hwm = _status_kib("VmHWM") if self.reset else None
            self.absolute_bytes = hwm if hwm is not None else peak_memory_bytes(self.device)
        self.peak_bytes = max(self.absolute_bytes - self.start, 0) if self.reset \
            else self.absolute_bytes
