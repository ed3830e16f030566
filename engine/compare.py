"""What "the same answer" means, defined once: identical tokens, and how far the logits moved.

    first difference   the first generated-token index at which two runs disagree; a run that
                       stops short of (or goes on past) a finished reference differs where the
                       shorter one ends. None: identical.
    max |Δ logits|     the largest absolute difference between the two runs' logits, over the
                       steps where both had seen the same tokens — up to and including the step
                       that first picks a different token. After it the runs continue from
                       different texts, and their logits would measure that, not the optimisation.
    forced             for a fork (a run with forced tokens, engine/stepping.py): the token forced
                       at the first difference — the runs differ there because someone chose
                       another token, not because the arithmetic did.

The race (engine/session.py), the bench (engine/bench/runs.py, its fast-path table too) and the
app's race lanes all call these functions; none has its own copy. Logits may be NumPy arrays or
CPU tensors (anything `numpy.asarray` reads), one per generated token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np


@dataclass(frozen=True, slots=True)
class Comparison:
    """Two runs compared: `identical` tokens, where they first differ, max |Δ logits|."""
    identical: bool
    first_difference: int | None
    max_logit_delta: float | None     # None when either run kept no logits
    forced: Any = None                # engine.events.Forked at first_difference, if any


def first_difference(tokens: Sequence[int], reference: Sequence[int], *, done: bool = True,
                     reference_done: bool = True) -> int | None:
    """The first index where `tokens` and `reference` disagree, or None if they agree so far.

    `done` / `reference_done`: whether each run has finished. A run may still catch up with an
    unfinished reference, so a length difference only counts once the shorter one has ended.
    """
    for i, (a, b) in enumerate(zip(tokens, reference)):
        if a != b:
            return i
    if reference_done and len(tokens) > len(reference):
        return len(reference)
    if done and reference_done and len(tokens) < len(reference):
        return len(tokens)
    return None


def max_logit_delta(logits: Sequence, reference: Sequence, steps: int | None = None
                    ) -> float | None:
    """max |a − b| over the first `steps` steps both runs have (all of them if None)."""
    pairs = list(zip(logits, reference))[:steps]
    if not pairs:
        return None
    return max(float(np.abs(np.asarray(a, dtype=np.float32) -
                            np.asarray(b, dtype=np.float32)).max()) for a, b in pairs)


def forced_at(index: int | None, forks: Sequence) -> Any:
    """The fork (anything with an .index: engine.events.Forked) at token `index`, or None."""
    return next((f for f in forks if f.index == index), None) if index is not None else None


def compare(tokens: Sequence[int], reference: Sequence[int], logits: Sequence | None = None,
            reference_logits: Sequence | None = None, forks: Sequence = ()) -> Comparison:
    """Two finished runs: same tokens? where do they first differ — and was a token forced
    there (`forks`: the run's Forked events)? max |Δ logits| while their inputs were the same?"""
    first = first_difference(tokens, reference)
    delta = None
    if logits is not None and reference_logits is not None:
        same_inputs = min(len(tokens), len(reference)) if first is None else first + 1
        delta = max_logit_delta(logits, reference_logits, same_inputs)
    return Comparison(identical=first is None, first_difference=first, max_logit_delta=delta,
                      forced=forced_at(first, forks))
