"""The words and numbers in the bench's tables, shared by the terminal and the Markdown file.

Every byte count, time and rate is written by engine/units.py (binary KiB/MiB/GiB, ms below a
second), so the bench, the app and docs/benchmarks.md say the same thing the same way. The
bandwidth figures in the JSON are GB/s (10^9 bytes a second, the STREAM convention); they are
shown in GiB/s like every other amount of memory.
"""

from __future__ import annotations

from ..units import GiB, format_bytes, format_number, format_seconds


def spread(stat: dict) -> str:
    """The " ±4%" after a median: half the range of the timed passes, as a share of the
    median (nothing for a single pass)."""
    sp = stat.get("spread_pct")
    return "" if sp is None or stat.get("n", 0) < 2 else f" ±{sp:.0f}%"


def gib_s(gb_s):
    """A GB/s figure from the JSON (10^9 bytes a second) in GiB/s; None stays None."""
    return None if gb_s is None else gb_s * 1e9 / GiB


def identical_cell(row: dict) -> str:
    """yes / no (step N) / — : the row's tokens against the naive reference's."""
    return {True: "yes", False: f"no (step {row['first_difference']})", None: "—"}[
        row["identical"]]


# ----------------------------------------------------------------------------- bench --fast-table
FAST_HEAD = ["run", "decode tok/s", "best", "lockstep", "× transformers", "weights per step",
             "ceiling tok/s", "% of ceiling", "identical", "max |Δ logits|", "setup"]


def fast_table_lines(doc: dict) -> list[list[str]]:
    """One row of cells per run of the fast-path table (FAST_HEAD): the plain kv/sdpa decode,
    every variant, and transformers; the ceiling is the copy bandwidth over the bytes one step
    reads (bandwidth.py), so "% of ceiling" is how close the median comes to memory's limit."""
    bw = {r["label"]: r for r in (doc.get("bandwidth") or {}).get("rows") or []}
    lock = doc.get("lockstep") or {}
    out = []
    for r in doc.get("rows", []):
        f, b = r["figures"]["decode_tokens_per_s"], bw.get(r["label"], {})
        ceiling = b.get("ceiling_tokens_per_s")
        share = 100 * f["median"] / ceiling if f["median"] and ceiling else None
        out.append([r["label"], format_number(f["median"]) + spread(f),
                    format_number(f["max"]), format_number(lock.get(r["label"])),
                    format_number((r.get("vs_baseline") or {}).get("decode_tokens_per_s"),
                                  "{:.2f}×"),
                    format_bytes(b.get("weight_bytes")), format_number(ceiling),
                    format_number(share, "{:.0f}%"), identical_cell(r),
                    format_number(r["max_abs_logit_diff"], "{:.1e}"),
                    format_seconds(r.get("setup_s"))])
    return out


# ----------------------------------------------------------------------------- bench --startup
STARTUP_HEAD = ["run", "first token (median)", "all", "peak RSS", "above the runtime's own"]


def startup_lines(rows: list[dict]) -> list[list[str]]:
    return [[r["run"], format_seconds(r["first_token_s"]),
             ", ".join(format_seconds(x) for x in r["first_token_s_all"]),
             format_bytes(r["peak_rss_bytes"]), format_bytes(r["above_runtime_bytes"])]
            for r in rows]


# ----------------------------------------------------------------------------- bench --batch
def batch_lines(doc: dict) -> tuple[list[str], list[list[str]], list[str], list[list[str]]]:
    """The batch bench's two tables as text cells: (header, rows) for batch sizes and for the
    shared prefix. One source for the terminal and for Markdown."""
    b = doc.get("batch") or {}
    head = ["batch", "decode tok/s (all requests)", "× batch 1", "× alone", "TPOT p50 "
            "(per request)", "TTFT p50", "identical"]
    rows = []
    for r in b.get("rows", []):
        rows.append([str(r["batch"]),
                     format_number(r["decode_tokens_per_s"]) + (
                         f" ±{r['decode_spread_pct']:.0f}%" if r.get("decode_spread_pct")
                         is not None else ""),
                     format_number(r["over_batch_1"], "{:.2f}×") + (
                         f" ({r['over_batch_1_min']:.2f}–{r['over_batch_1_max']:.2f})"
                         if len(r.get("over_batch_1_per_pass") or ()) > 1 else ""),
                     format_number(r.get("over_alone"), "{:.2f}×"),
                     format_seconds(r["tpot_p50_s"]),
                     format_seconds(r["ttft_p50_s"]), f"{r['identical']}/{r['requests']}"])
    p = b.get("prefix") or {}
    phead = ["prefix caching", "peak KV blocks", "% of no caching", "contiguous reservation",
             "hit rate", "identical"]
    prow = []
    for key in ("on", "off"):
        if key in p:
            x = p[key]
            prow.append([key, str(x["peak_blocks_used"]),
                         f"{100 * x['peak_blocks_used'] / p['off']['peak_blocks_used']:.0f}%"
                         if "off" in p else "—",
                         f"{x['peak_contiguous_blocks']} blocks",
                         format_number(None if x["prefix_hit_rate"] is None
                              else 100 * x["prefix_hit_rate"], "{:.0f}%"),
                         f"{x['identical']}/{p['requests']}"])
    return head, rows, phead, prow


def batch_caption(doc: dict) -> str:
    env, st = doc.get("environment", {}), (doc.get("batch") or {}).get("settings", {})
    la = env.get("load_average_start")
    order = ("in lockstep (the sizes take turns, step by step)" if st.get("lockstep")
             else "interleaved")
    return (f"{doc.get('model', {}).get('name', '?')} · {env.get('device_name', '?')} "
            f"({env.get('device', '?')}, {st.get('threads', '?')} threads) · "
            f"{env.get('dtype', '?')} · {st.get('max_new_tokens')} new tokens, greedy · "
            f"{st.get('warmup')} warm-up + {st.get('repeat')} timed passes, {order} · "
            f"backend {st.get('backend')} · projections: {st.get('projections', '?')} · "
            f"load average {la[0] if la else '?'} at the start")


def batch_alone_lines(doc: dict) -> list[str]:
    """One request alone through generate(), timed in every pass (plain, then fast paths)."""
    b = doc.get("batch") or {}
    out = []
    if b.get("alone_decode_tokens_per_s"):
        out.append(f"one request alone through generate() (kv/sdpa), timed in every pass: "
                   f"{b['alone_decode_tokens_per_s']:.1f} decode tok/s")
    for spec, v in (b.get("alone_fast_decode_tokens_per_s") or {}).items():
        out.append(f"… the same with the fast path +{spec}: {format_number(v)} decode tok/s")
    return out


def batch_titles(doc: dict) -> tuple[str, str]:
    system = ((doc.get("batch") or {}).get("prefix") or {}).get("system_tokens", 200)
    return ("continuous batching: B requests at once (median of the passes; × batch 1: the "
            "median of each pass's own ratio, lowest–highest in brackets)",
            f"8 requests sharing a {system}-token system prompt")

