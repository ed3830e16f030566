"""engine/units.py (one way to write bytes, times and rates) and engine/timing.py (the one timing
helper): their behaviour through their public functions. No timing thresholds: only what the
clock readings are made of."""

from __future__ import annotations

import math

import pytest

from engine import metrics
from engine.timing import StepClock, best_of, median_of, timed
from engine.units import (format_bandwidth, format_bytes, format_ms, format_number, format_rate,
                          format_seconds)


@pytest.mark.parametrize("n, text", [(0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"),
                                     (1536, "1.5 KiB"), (5 * 2**20, "5.0 MiB"),
                                     (538_100_000, "513.2 MiB"), (3 * 2**30, "3.0 GiB"),
                                     (-2048, "-2.0 KiB"), (None, "—"), (math.nan, "—")])
def test_bytes_are_binary(n, text):
    assert format_bytes(n) == text


def test_times_and_rates():
    assert format_seconds(2.345) == "2.35 s" and format_seconds(0.0123) == "12.3 ms"
    assert format_seconds(None) == format_seconds(math.nan) == "—"
    assert format_ms(0.0456, "{:.0f} ms") == "46 ms" and format_ms(math.nan) == "—"
    assert format_rate(12.34) == "12.3 tok/s" and format_number(1.234, "{:.2f}×") == "1.23×"
    assert format_bandwidth(14.5e9) == "13.5 GiB/s"


def test_timed_calls_count_the_call_and_nothing_after():
    calls = []
    assert timed(lambda: calls.append(1)) >= 0 and calls == [1]
    assert best_of(lambda: calls.append(2), 3) >= 0 and calls.count(2) == 3
    assert median_of(lambda: calls.append(3), 3, warmup=2) >= 0 and calls.count(3) == 5


def test_step_clock_gives_the_latencies_engine_metrics_reads():
    """transformers calls the clock once per token; its latencies are [TTFT, gaps…], and
    engine/metrics.py turns them into the same TPOT as for the engine's own runs."""
    clock = StepClock()
    t0 = clock.start()
    scores = object()
    for _ in range(4):
        assert clock(None, scores) is scores                 # changes nothing
    lat = clock.latencies()
    assert len(lat) == 4 and all(x >= 0 for x in lat)
    assert sum(lat) == pytest.approx(clock.times[-1] - t0)
    assert metrics.tpot_s(lat) == pytest.approx((clock.times[-1] - clock.times[0]) / 3)
    clock.start()
    assert clock.times == []                                 # a second run starts afresh


def test_metrics_one_definition():
    lat = [0.5, 0.1, 0.2, 0.3]
    m = metrics.run_metrics(10, 0.4, lat, peak_memory=7, kv_bytes=3)
    assert (m.ttft_s, m.tpot_s, m.total_s) == (0.5, pytest.approx(0.2), pytest.approx(1.1))
    assert m.decode_tokens_per_s == pytest.approx(5.0) and m.prefill_tokens_per_s == 25.0
    assert m.peak_memory_bytes == 7 and m.new_tokens == 4
    assert math.isnan(metrics.tpot_s([0.5])) and math.isnan(metrics.ttft_s([]))
    assert math.isnan(metrics.decode_tokens_per_s(math.nan))
