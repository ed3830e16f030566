"""A strict little parser of Prometheus' text format (0.0.4), for the /metrics tests.

parse(text) → {metric name: {"type", "help", "samples": {(sample name, labels tuple): value}}}
and raises AssertionError on anything malformed: a sample before its # TYPE, a bad name, label
or value, a histogram whose buckets are not cumulative or do not end at +Inf = _count.
"""

from __future__ import annotations

import math
import re

NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
SAMPLE = re.compile(rf"^({NAME})(\{{(.*)\}})? (\S+)$")
LABEL = re.compile(rf'\s*([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"\s*(,|$)')
TYPES = ("counter", "gauge", "histogram", "summary", "untyped")


def _labels(text: str) -> tuple:
    out, pos = [], 0
    while pos < len(text):
        m = LABEL.match(text, pos)
        assert m, f"bad labels: {text!r}"
        out.append((m.group(1), m.group(2)))
        pos = m.end()
    return tuple(out)


def parse(text: str) -> dict:
    metrics: dict = {}
    assert text.endswith("\n"), "the exposition must end with a newline"
    for line in text.splitlines():
        if not line:
            continue
        if line.startswith("# HELP "):
            name, _, help_ = line[7:].partition(" ")
            metrics.setdefault(name, {"samples": {}})["help"] = help_
            continue
        if line.startswith("# TYPE "):
            name, _, kind = line[7:].partition(" ")
            assert re.fullmatch(NAME, name) and kind in TYPES, line
            entry = metrics.setdefault(name, {"samples": {}})
            assert "type" not in entry, f"two TYPE lines for {name}"
            entry["type"] = kind
            continue
        assert not line.startswith("#"), line
        m = SAMPLE.match(line)
        assert m, f"bad sample line: {line!r}"
        sample, labels, value = m.group(1), _labels(m.group(3) or ""), float(m.group(4))
        base = re.sub(r"_(bucket|sum|count)$", "", sample)
        owner = sample if sample in metrics else base
        assert owner in metrics and "type" in metrics[owner], f"{sample} before its # TYPE"
        metrics[owner]["samples"][(sample, labels)] = value
    for name, entry in metrics.items():
        if entry.get("type") == "histogram":
            buckets = [(dict(k[1])["le"], v) for k, v in entry["samples"].items()
                       if k[0] == name + "_bucket"]
            assert buckets and buckets[-1][0] == "+Inf", f"{name}: no +Inf bucket"
            bounds = [float(le) for le, _ in buckets]
            counts = [v for _, v in buckets]
            assert bounds == sorted(bounds) and counts == sorted(counts), f"{name}: not cumulative"
            count = next(v for k, v in entry["samples"].items() if k[0] == name + "_count")
            assert count == counts[-1], f"{name}: +Inf bucket != _count"
        if entry.get("type") == "counter":
            assert all(v >= 0 and not math.isnan(v) for v in entry["samples"].values())
    return metrics


def value(metrics: dict, name: str, **labels) -> float:
    """The sum of `name`'s samples whose labels include `labels`."""
    entry = metrics[name if name in metrics else re.sub(r"_(bucket|sum|count)$", "", name)]
    return sum(v for (sample, ls), v in entry["samples"].items()
               if sample == name and labels.items() <= dict(ls).items())
