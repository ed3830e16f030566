"""The memory/time measurement shows what it should: quadratic memory for naive prefill,
linear for the tiled backends, on the CPU's tensor accounting."""

from __future__ import annotations

from engine.attention import get_backend
from engine.bench.attention_curves import format_table, measure_backends, measure_call
from engine.units import format_bytes, format_seconds

SHAPE = dict(n_heads=2, n_kv=1, head_dim=32, repeat=1)


def peak(name: str, phase: str, length: int) -> int:
    return measure_call(get_backend(name, tile=32), phase, length, **SHAPE).peak_bytes


def test_naive_prefill_memory_is_quadratic_the_others_linear():
    naive = peak("naive", "prefill", 256) / peak("naive", "prefill", 128)
    assert naive > 3.2                            # ~4× for twice the length: the score matrix
    for name in ("sdpa", "flash"):
        ratio = peak(name, "prefill", 256) / peak(name, "prefill", 128)
        assert ratio < 2.5, name                  # ~2×: output and one tile row of scores


def test_peak_counts_the_output_and_frees():
    out_bytes = 2 * 128 * 32 * 4                  # (1, H, T, hd) float32
    cost = measure_call(get_backend("sdpa"), "prefill", 128, **SHAPE)
    assert cost.peak_bytes >= out_bytes and cost.method == "cpu" and cost.seconds > 0


def test_table_has_a_row_per_backend_and_phase():
    costs = measure_backends(["naive", "flash"], lengths=(64, 128), tile=32, **SHAPE)
    table = format_table(costs)
    assert len(costs) == 8
    assert table.count("\n") == 1 + 4 and "T=128" in table and "| flash | decode |" in table
    # each cell: time · peak extra memory, in engine/units.py's units
    naive = next(c for c in costs if (c.backend, c.phase, c.length) == ("naive", "prefill", 128))
    assert f"{format_seconds(naive.seconds)} · {format_bytes(naive.peak_bytes)}" in table
    assert "iB" in table and " kB" not in table and " MB" not in table
