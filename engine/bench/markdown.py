"""The bench's tables as Markdown (`bench --markdown FILE`), as in docs/benchmarks.md."""

from __future__ import annotations

from ..units import format_bandwidth, format_bytes, format_number, format_seconds
from .cells import (FAST_HEAD, STARTUP_HEAD, batch_alone_lines, batch_caption, batch_lines,
                    batch_titles, fast_table_lines, gib_s, identical_cell, spread, startup_lines)
from .verdicts import sweep_text


def markdown(doc: dict) -> str:
    """The tables of docs/benchmarks.md, from a result document (`--markdown FILE`)."""
    env, st = doc.get("environment", {}), doc["settings"]
    la = env.get("load_average_start")
    lines = [f"- date: {doc['started_at']}",
             f"- machine: {env.get('device_name')} ({env.get('device')}), "
             f"{env.get('cpu_count')} CPUs, {env.get('torch_threads')} torch threads, "
             f"load average {la[0] if la else '?'} at the start",
             f"- software: torch {env.get('torch')}, transformers {env.get('transformers')}, "
             f"Python {env.get('python')}",
             f"- model: {doc.get('model', {}).get('name')}, {env.get('dtype')}",
             f"- settings: prompt {st['prompt']!r} ({doc.get('prompt_tokens')} tokens), "
             f"{st['max_new_tokens']} new tokens, greedy, {st['warmup']} warm-up + "
             f"{st['repeat']} timed passes, interleaved", ""]
    lines += ["| row | total | TTFT | TPOT | decode tok/s | prefill tok/s | KV | identical | "
              "max \\|Δ logits\\| | × HF decode | × HF total |",
              "|---|---:|---:|---:|---:|---:|---:|:-:|---:|---:|---:|"]
    for r in doc.get("rows", []):
        f, vs = r["figures"], r.get("vs_baseline") or {}
        ident = identical_cell(r)
        lines.append(
            f"| {r['label']} | {format_seconds(f['total_s']['median'])}{spread(f['total_s'])} | "
            f"{format_seconds(f['ttft_s']['median'])} | {format_seconds(f['tpot_s']['median'])} | "
            f"{format_number(f['decode_tokens_per_s']['median'])} | "
            f"{format_number(f['prefill_tokens_per_s']['median'], '{:.0f}')} | "
            f"{format_bytes(f['kv_bytes']['median'])} | {ident} | "
            f"{format_number(r['max_abs_logit_diff'], '{:.1e}')} | "
            f"{format_number(vs.get('decode_tokens_per_s'), '{:.2f}×')} | "
            f"{format_number(vs.get('total_speedup'), '{:.2f}×')} |")
    b = doc.get("bandwidth")
    if b and b.get("rows"):
        m = b["machine"]
        lines += ["", f"Copy bandwidth {format_bandwidth(m['copy_gb_s'] * 1e9)} (read + write), "
                      f"read {format_bandwidth(m['read_gb_s'] * 1e9)}, {m['threads']} thread(s).",
                  "",
                  "| row | weights | KV read | TPOT | achieved GiB/s | % of copy | ceiling tok/s |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for r in b["rows"]:
            lines.append(f"| {r['label']} | {format_bytes(r['weight_bytes'])} | "
                         f"{format_bytes(r['kv_bytes'])} | {format_seconds(r['tpot_s'])} | "
                         f"{format_number(gib_s(r['achieved_gb_s']))} | "
                         f"{format_number(r['pct_of_copy'], '{:.0f}%')} | "
                         f"{format_number(r['ceiling_tokens_per_s'])} |")
        if b.get("formats"):
            lines += ["", "| weights | bytes per token | ceiling tok/s (copy) | "
                          "ceiling tok/s (read) |", "|---|---:|---:|---:|"]
            lines += [f"| {f['format']} | {format_bytes(f['weight_bytes'])} | "
                      f"{format_number(f['ceiling_tokens_per_s'])} | "
                      f"{format_number(f['read_ceiling_tokens_per_s'])} |" for f in b["formats"]]
        mf, p = b.get("matmul_floor"), b.get("profile")
        if mf:
            lines += ["", f"Matmuls alone: {mf['matrices']} matrices, {format_bytes(mf['bytes'])}, "
                          f"{format_seconds(mf['seconds'])} per token = "
                          f"{format_bandwidth(mf['gb_s'] * 1e9)} "
                          f"({100 * mf['gb_s'] / m['copy_gb_s']:.0f}% of copy)."]
        if p:
            total = sum(p["breakdown_s"].values()) or 1
            lines += ["", f"Profile of kv/{p['backend']} decode steps ({p['steps']} steps at "
                          f"position {p['position']}, {format_seconds(p['step_s_profiled'])} "
                          f"per step "
                          f"under the profiler):", "", "| part | per step | share |",
                      "|---|---:|---:|"]
            lines += [f"| {k} | {format_seconds(v)} | {100 * v / total:.0f}% |"
                      for k, v in p["breakdown_s"].items()]
    sw = doc.get("sweep")
    if sw and sw.get("positions"):
        lines += ["", f"Decode step latency against position ({sw['backend']} attention):", "",
                  "| position | " + " | ".join(sw["step_s"]) + " | naive ÷ kv |",
                  "|---:|" + "---:|" * (len(sw["step_s"]) + 1)]
        for i, pos in enumerate(sw["positions"]):
            cells = [format_seconds(sw["step_s"][s][i]) for s in sw["step_s"]]
            ratio = sw["step_s"]["naive"][i] / sw["step_s"]["kv"][i]
            lines.append(f"| {pos} | " + " | ".join(cells) + f" | {ratio:.1f}× |")
        if sw.get("summary"):
            lines += ["", sweep_text(sw)]
    curves = doc.get("attention_curves")
    if curves:
        pre = [c for c in curves if c["phase"] == "prefill"]
        lengths = sorted({c["length"] for c in pre})
        lines += ["", "One prefill attention call (all heads of one layer): time · peak extra "
                      "memory", "", "| backend | " + " | ".join(f"T={n}" for n in lengths) + " |",
                  "|---|" + "---:|" * len(lengths)]
        for name in dict.fromkeys(c["backend"] for c in pre):
            cell = {c["length"]: c for c in pre if c["backend"] == name}
            lines.append(f"| {name} | " + " | ".join(
                f"{format_seconds(cell[n]['seconds'])} · {format_bytes(cell[n]['peak_bytes'])}"
                if n in cell else "—" for n in lengths) + " |")
    lines += fast_table_markdown(doc)
    return "\n".join(lines) + "\n"



def batch_markdown(doc: dict) -> str:
    head, rows, phead, prow = batch_lines(doc)
    lines = [f"- {batch_caption(doc)}", f"- date: {doc.get('started_at')}",
             *(f"- {line}" for line in batch_alone_lines(doc)), ""]
    for title, h, rs in zip(batch_titles(doc), (head, phead), (rows, prow)):
        if rs:
            lines += [f"{title[0].upper()}{title[1:]}:", ""]
            lines += ["| " + " | ".join(h) + " |", "|---|" + "---:|" * (len(h) - 1)]
            lines += ["| " + " | ".join(r) + " |" for r in rs]
            lines.append("")
    return "\n".join(lines)


def table(head: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table: the first column left-aligned, the others right-aligned."""
    return (["| " + " | ".join(h.replace("|", "\\|") for h in head) + " |",
             "|---|" + "---:|" * (len(head) - 1)]
            + ["| " + " | ".join(r) + " |" for r in rows])


def fast_table_markdown(doc: dict) -> list[str]:
    """The fast-path table (`bench --fast-table`) as docs/fast_path.md shows it."""
    if not (doc.get("settings") or {}).get("fast_table") or not doc.get("rows"):
        return []
    return ["", "Fast paths on kv/sdpa (median of the timed passes; ceiling = copy bandwidth ÷ "
                "bytes one step reads; setup = the first pass, first-call costs included):", "",
            *table(FAST_HEAD, fast_table_lines(doc))]


def startup_markdown(rows: list[dict]) -> str:
    """`bench --startup`: process start → first token, and peak memory."""
    lines = table(STARTUP_HEAD, startup_lines(rows))
    if rows:
        lines.append(f"(the runtime alone — Python, torch, tokenizers, the engine's modules: "
                     f"{format_bytes(rows[0]['runtime_rss_bytes'])})")
    return "\n".join(lines) + "\n"
