"""The bench's verdicts: the sentences a reader takes away (the headline beside the first
version's numbers, the sweep's speedup), computed once and shown by the terminal and the
Markdown alike."""

from __future__ import annotations

import math

from ..units import format_number, format_seconds
from .runs import BASELINE

# The first version of this project measured: 50 greedy tokens took 2.5 s without a KV cache and
# 1.2 s with one, and efficient attention matched naive within 4.1e-08. The headline quotes it
# beside today's numbers; it is history, not a measurement of this run.
FIRST_VERSION = {"naive_s": 2.5, "kv_s": 1.2, "attention_max_abs_diff": 4.1e-08}


def ratio(a, b):
    """a / b, or None when either is missing, b is zero, or a is nan."""
    if a is None or b is None or not b or (isinstance(a, float) and math.isnan(a)):
        return None
    return a / b


def headline(doc: dict, rows) -> dict:
    """The numbers the README quotes, next to the first version's."""
    by = {r.label: r for r in rows if r.samples}
    h: dict = {"first_version": dict(FIRST_VERSION)}
    backend = "sdpa" if "kv/sdpa" in by else "naive"
    naive, kv = by.get(f"naive/{backend}"), by.get(f"kv/{backend}")
    if naive and kv:
        h["backend"] = backend
        h["naive_total_s"], h["kv_total_s"] = naive.median("total_s"), kv.median("total_s")
        h["kv_speedup_total"] = ratio(h["naive_total_s"], h["kv_total_s"])
    diffs = [r.max_abs_logit_diff for r in rows if r.kind == "engine" and r.backend != "naive"
             and r.fast is None and r.max_abs_logit_diff is not None]
    h["efficient_attention_max_abs_logit_diff"] = max(diffs) if diffs else None
    base = by.get(BASELINE)
    if kv and base:
        h["kv_decode_tokens_per_s"] = kv.median("decode_tokens_per_s")
        h["baseline_decode_tokens_per_s"] = base.median("decode_tokens_per_s")
        h["kv_over_baseline_decode"] = ratio(h["kv_decode_tokens_per_s"],
                                             h["baseline_decode_tokens_per_s"])
        h["kv_and_baseline_identical"] = bool(kv.identical and base.identical)
    return h


def headline_text(doc: dict) -> str:
    h = doc.get("headline", {})
    first = h.get("first_version", {})
    lines = [f"[bold]first version[/]: KV cache took 50 tokens from {first.get('naive_s')} s "
             f"to {first.get('kv_s')} s; efficient attention within "
             f"{first.get('attention_max_abs_diff')} of naive"]
    if h.get("kv_speedup_total"):
        lines.append(f"[bold]now[/]:  naive/{h['backend']} "
                     f"{format_seconds(h['naive_total_s'])} → "
                     f"kv/{h['backend']} {format_seconds(h['kv_total_s'])} "
                     f"({h['kv_speedup_total']:.2f}× for {doc['settings']['max_new_tokens']} "
                     f"tokens); efficient attention within "
                     f"{format_number(h.get('efficient_attention_max_abs_logit_diff'), '{:.1e}')} "
                     f"of naive (max |Δ logits|)")
    if h.get("kv_over_baseline_decode"):
        lines.append(f"[bold]vs transformers[/]: kv decodes {h['kv_decode_tokens_per_s']:.1f} "
                     f"tok/s, generate() with its cache {h['baseline_decode_tokens_per_s']:.1f} "
                     f"({h['kv_over_baseline_decode']:.2f}×), tokens "
                     f"{'identical' if h['kv_and_baseline_identical'] else '[red]differ[/]'}")
    return "\n".join(lines)


def sweep_text(sweep: dict) -> str:
    summ = sweep.get("summary") or {}
    if not summ:
        return ""
    return (f"at position {summ['longest_position']}: one naive step costs "
            f"{summ['naive_over_kv_step']:.1f}× a kv step ({summ['naive_over_paged_step']:.1f}× "
            f"paged); generating every position up to there, about "
            f"{summ['naive_over_kv_cumulative']:.1f}× (area under the curves)")

