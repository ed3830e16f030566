"""engine/compare.py: the one definition of "identical" and of max |Δ logits|."""

from __future__ import annotations

import numpy as np
import torch

from engine.compare import compare, first_difference, max_logit_delta


def test_identical_runs():
    logits = [np.arange(4, dtype=np.float32) + i for i in range(3)]
    c = compare([1, 2, 3], [1, 2, 3], logits, [x + 1e-6 for x in logits])
    assert c.identical and c.first_difference is None
    assert 0 < c.max_logit_delta < 1e-5


def test_logits_count_only_while_the_inputs_were_the_same():
    ref = [np.zeros(4, dtype=np.float32) for _ in range(5)]
    out = [np.zeros(4, dtype=np.float32) for _ in range(5)]
    out[1][0] = 0.5          # step 1 picks another token (its input was still the same) …
    out[3][0] = 100.0        # … and later steps saw different texts: not the optimisation's doing
    c = compare([1, 9, 3, 4, 5], [1, 2, 3, 4, 5], out, ref)
    assert not c.identical and c.first_difference == 1
    assert c.max_logit_delta == 0.5


def test_a_run_that_stops_short_differs_where_it_ends():
    assert first_difference([1, 2], [1, 2, 3]) == 2
    assert first_difference([1, 2, 3, 4], [1, 2, 3]) == 3
    # still running: it may yet catch up
    assert first_difference([1, 2], [1, 2, 3], done=False) is None
    assert first_difference([1, 2, 3, 4], [1, 2, 3], reference_done=False, done=False) is None


def test_tensors_and_arrays_alike_and_no_logits_no_delta():
    a = [torch.tensor([1.0, 2.0]), torch.tensor([0.0, 0.0])]
    b = [np.array([1.0, 2.5], dtype=np.float32), np.array([0.0, -1.0], dtype=np.float32)]
    assert max_logit_delta(a, b) == 1.0
    assert max_logit_delta(a, b, steps=1) == 0.5
    assert compare([1], [1]).max_logit_delta is None
    assert compare([1], [1], [], []).max_logit_delta is None
