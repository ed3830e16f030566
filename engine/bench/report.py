"""Showing a bench result: rich tables and plotext charts on the terminal, and the JSON file.

This is the bench's front end, the one place under engine/ that draws: the measuring modules
beside it never import rich or plotext, and this one imports them only when called.
"""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager


# ----------------------------------------------------------------------------- formatting
def _s(x, unit="s"):
    if x is None:
        return "—"
    if unit == "s":
        return f"{x:.2f} s" if x >= 1 else f"{x * 1e3:.1f} ms"
    return f"{x}"


def _bytes(n):
    if n is None:
        return "—"
    for unit, k in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= k:
            return f"{n / k:.1f} {unit}"
    return f"{int(n)} B"


def _num(x, fmt="{:.1f}"):
    return "—" if x is None else fmt.format(x)


def _spread(stat):
    sp = stat.get("spread_pct")
    return "" if sp is None or stat.get("n", 0) < 2 else f" ±{sp:.0f}%"


def write_json(doc: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(doc, f, indent=2, allow_nan=False)
        f.write("\n")


# ----------------------------------------------------------------------------- progress
@contextmanager
def progress(mode: str):
    """Yields (tick, set_total): a rich bar on stderr ("bar"), one line per stage for logs
    ("lines"), or nothing ("off")."""
    if mode == "off":
        yield (lambda _: None), (lambda _: None)
        return
    if mode == "lines":
        import time
        state = {"n": 0, "total": "?", "t0": time.perf_counter()}

        def tick_line(what: str) -> None:
            state["n"] += 1
            print(f"[{state['n']}/{state['total']} {time.perf_counter() - state['t0']:6.1f} s] "
                  f"{what}", file=sys.stderr, flush=True)

        yield tick_line, (lambda n: state.update(total=n))
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, \
        TimeElapsedColumn
    bar = Progress(TextColumn("[bold]bench[/]"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), TextColumn("{task.description}"),
                   console=Console(stderr=True), transient=True)
    task = bar.add_task("starting", total=None)
    started = [False]

    def tick(what: str) -> None:
        if started[0]:
            bar.advance(task)
        started[0] = True
        bar.update(task, description=what)

    def set_total(n: int) -> None:
        bar.update(task, total=n)

    with bar:
        yield tick, set_total


# ----------------------------------------------------------------------------- terminal
def render(doc: dict, file=None) -> None:
    from rich.console import Console
    file = file or sys.stdout
    tty = file.isatty()
    console = Console(file=file, width=None if tty else 200)
    env, st = doc.get("environment", {}), doc["settings"]
    title = (f"{doc.get('model', {}).get('name', '?')} · {env.get('device_name', '?')} "
             f"({env.get('device', '?')}, {env.get('torch_threads', '?')} threads) · "
             f"{env.get('dtype', '?')} · torch {env.get('torch', '?')}")
    console.print(f"[bold]{title}[/]")
    la = env.get("load_average_start")
    if la and env.get("cpu_count") and la[0] > 0.5 * env["cpu_count"]:
        console.print(f"[yellow]the machine was busy (load average {la[0]:.1f} on "
                      f"{env['cpu_count']} CPUs at the start): trust the ratios between rows "
                      f"more than the absolute times[/]")
    console.print(f"prompt {st['prompt']!r} ({doc.get('prompt_tokens', '?')} tokens) · "
                  f"{st['max_new_tokens']} new tokens, greedy · {doc.get('passes_done', 0)} "
                  f"passes ({st['warmup']} warm-up + {st['repeat']} timed, interleaved) · "
                  f"reference {doc['reference']}")
    if doc.get("interrupted"):
        console.print("[bold yellow]interrupted: showing what was measured so far[/]")
    if doc.get("rows"):
        console.print(standard_table(doc))
    if doc.get("baseline", {}).get("error"):
        console.print(f"[yellow]no transformers baseline: {doc['baseline']['error']}[/]")
    for r in doc.get("rows", []):
        if r.get("error"):
            console.print(f"[red]{r['label']} failed: {r['error']}[/]")
    console.print(headline_text(doc))
    if doc.get("bandwidth"):
        for part in bandwidth_tables(doc):
            console.print(part)
    # plotext draws its own ANSI text: written straight to the file, not through rich.
    width = min(console.width, 110)
    if (doc.get("sweep") or {}).get("positions"):
        file.write(sweep_chart(doc["sweep"], width, color=tty) + "\n")
        console.print(sweep_text(doc["sweep"]))
    chart = curves_chart(doc.get("attention_curves"), width, color=tty)
    if chart:
        file.write(chart + "\n")


def standard_table(doc: dict):
    from rich.table import Table
    t = Table(title="standard experiment (median of the timed passes, ± half the range)",
              title_justify="left")
    for name, justify in (("row", "left"), ("total", "right"), ("TTFT", "right"),
                          ("TPOT", "right"), ("decode tok/s", "right"),
                          ("prefill tok/s", "right"), ("peak mem (+run)", "right"), ("KV", "right"),
                          ("identical", "center"), ("max |Δ logits|", "right"),
                          ("× HF decode", "right"), ("× HF total", "right")):
        t.add_column(name, justify=justify, no_wrap=True)
    for r in doc["rows"]:
        f = r["figures"]
        vs = r.get("vs_baseline") or {}
        ident = {True: "[green]yes[/]", False: f"[red]no (step {r['first_difference']})[/]",
                 None: "—"}[r["identical"]]
        if r.get("unstable"):
            ident += " [red](unstable)[/]"
        t.add_row(r["label"] + (" [dim](ref)[/]" if r["label"] == doc["reference"] else ""),
                  _s(f["total_s"]["median"]) + _spread(f["total_s"]),
                  _s(f["ttft_s"]["median"]), _s(f["tpot_s"]["median"]),
                  _num(f["decode_tokens_per_s"]["median"]) + _spread(f["decode_tokens_per_s"]),
                  _num(f["prefill_tokens_per_s"]["median"], "{:.0f}"),
                  f'{_bytes(f["peak_memory_bytes"]["median"])} '
                  f'[dim](+{_bytes(f["peak_added_bytes"]["median"])})[/]',
                  _bytes(f["kv_bytes"]["median"]),
                  ident, _num(r["max_abs_logit_diff"], "{:.1e}"),
                  _num(vs.get("decode_tokens_per_s"), "{:.2f}×"),
                  _num(vs.get("total_speedup"), "{:.2f}×"))
    return t


def headline_text(doc: dict) -> str:
    h = doc.get("headline", {})
    seed = h.get("seed", {})
    lines = [f"[bold]seed[/]: KV cache took 50 tokens from {seed.get('naive_s')} s to {seed.get('kv_s')} s; efficient attention "
             f"within {seed.get('attention_max_abs_diff')} of naive"]
    if h.get("kv_speedup_total"):
        lines.append(f"[bold]now[/]:  naive/{h['backend']} {_s(h['naive_total_s'])} → "
                     f"kv/{h['backend']} {_s(h['kv_total_s'])} "
                     f"({h['kv_speedup_total']:.2f}× for {doc['settings']['max_new_tokens']} "
                     f"tokens); efficient attention within "
                     f"{_num(h.get('efficient_attention_max_abs_logit_diff'), '{:.1e}')} "
                     f"of naive (max |Δ logits|)")
    if h.get("kv_over_baseline_decode"):
        lines.append(f"[bold]vs transformers[/]: kv decodes {h['kv_decode_tokens_per_s']:.1f} "
                     f"tok/s, generate() with its cache {h['baseline_decode_tokens_per_s']:.1f} "
                     f"({h['kv_over_baseline_decode']:.2f}×), tokens "
                     f"{'identical' if h['kv_and_baseline_identical'] else '[red]differ[/]'}")
    return "\n".join(lines)


def bandwidth_tables(doc: dict):
    from rich.table import Table
    b = doc["bandwidth"]
    m = b["machine"]
    out = [f"\n[bold]bandwidth[/]: this machine copies {m['copy_gb_s']:.1f} GB/s (read + "
           f"write, {_bytes(m['buffer_bytes'])} buffer) and reads {m['read_gb_s']:.1f} GB/s "
           f"(sum), {m['threads']} threads"]
    if b.get("rows"):
        t = Table(title="bytes read per decode step vs the copy bandwidth", title_justify="left")
        for name in ("row", "weights", "KV read", "TPOT", "achieved GB/s", "% of copy",
                     "ceiling tok/s"):
            t.add_column(name, justify="left" if name == "row" else "right")
        for r in b["rows"]:
            note = " [dim](recomputes)[/]" if r["recomputes"] else ""
            t.add_row(r["label"] + note, _bytes(r["weight_bytes"]), _bytes(r["kv_bytes"]),
                      _s(r["tpot_s"]), _num(r["achieved_gb_s"], "{:.1f}"),
                      _num(r["pct_of_copy"], "{:.0f}%"),
                      _num(r["ceiling_tokens_per_s"], "{:.1f}"))
        out.append(t)
        out.append("[dim](recomputes): naive strategies push the whole sequence through the "
                   "model every step, so they are bound by arithmetic, not by these bytes[/]")
    mf = b.get("matmul_floor")
    if mf:
        out.append(f"matmuls alone ({mf['matrices']} matrices, {_bytes(mf['bytes'])}): "
                   f"{_s(mf['seconds'])} per token = {mf['gb_s']:.1f} GB/s "
                   f"({100 * mf['gb_s'] / m['copy_gb_s']:.0f}% of copy) — GEMV efficiency")
    p = b.get("profile")
    if p:
        t = Table(title=f"where a kv/{p['backend']} decode step goes (torch.profiler, "
                        f"{p['steps']} steps at position {p['position']}, "
                        f"{_s(p['step_s_profiled'])} per step profiled)", title_justify="left")
        t.add_column("part")
        t.add_column("per step", justify="right")
        t.add_column("share", justify="right")
        total = sum(p["breakdown_s"].values()) or 1
        for k, v in p["breakdown_s"].items():
            t.add_row(k, _s(v), f"{100 * v / total:.0f}%")
        out.append(t)
    return out


def _figure(width: int, height: int, color: bool):
    import plotext as plt
    plt.clear_figure()
    plt.plotsize(width, height)
    plt.theme("clear")
    return plt


def _built(plt, color: bool) -> str:
    text = plt.build()
    return text if color else plt.uncolorize(text)


def sweep_chart(sweep: dict, width: int = 100, height: int = 22, color: bool = True) -> str:
    plt = _figure(width, height, color)
    # Without colour the curves are told apart by their marker.
    markers = {"naive": "•", "kv": "+", "paged": "x"}
    for s, ys in sweep["step_s"].items():
        plt.plot(sweep["positions"], [y * 1e3 for y in ys], label=s,
                 marker="braille" if color else markers.get(s, "*"))
    plt.title(f"decode step latency vs position ({sweep['backend']} attention)")
    plt.xlabel("position (tokens already in the sequence)")
    plt.ylabel("ms per step")
    return _built(plt, color)


def sweep_text(sweep: dict) -> str:
    summ = sweep.get("summary") or {}
    if not summ:
        return ""
    return (f"at position {summ['longest_position']}: one naive step costs "
            f"{summ['naive_over_kv_step']:.1f}× a kv step ({summ['naive_over_paged_step']:.1f}× "
            f"paged); generating every position up to there, about "
            f"{summ['naive_over_kv_cumulative']:.1f}× (area under the curves)")


def curves_chart(curves, width: int = 100, color: bool = True) -> str | None:
    """Prefill attention: peak extra memory and time against length, one curve per backend."""
    if not curves:
        return None
    pre = [c for c in curves if c["phase"] == "prefill"]
    if not pre:
        return None
    backends = list(dict.fromkeys(c["backend"] for c in pre))
    markers = ["•", "+", "x", "o", "*"]
    parts = []
    for key, scale, unit in (("peak_bytes", 2**20, "MiB"), ("seconds", 1e-3, "ms")):
        plt = _figure(width, 16, color)
        for i, b in enumerate(backends):
            pts = sorted((c["length"], c[key] / scale) for c in pre if c["backend"] == b)
            plt.plot([p[0] for p in pts], [p[1] for p in pts], label=b,
                     marker="braille" if color else markers[i % len(markers)])
        what = "peak extra memory" if key == "peak_bytes" else "time"
        plt.title(f"one prefill attention call: {what} vs length (all heads of one layer)")
        plt.xlabel("tokens")
        plt.ylabel(unit)
        parts.append(_built(plt, color))
    return "\n".join(parts)


# ----------------------------------------------------------------------------- Markdown
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
        ident = {True: "yes", False: f"no (step {r['first_difference']})", None: "—"}[
            r["identical"]]
        lines.append(
            f"| {r['label']} | {_s(f['total_s']['median'])}{_spread(f['total_s'])} | "
            f"{_s(f['ttft_s']['median'])} | {_s(f['tpot_s']['median'])} | "
            f"{_num(f['decode_tokens_per_s']['median'])} | "
            f"{_num(f['prefill_tokens_per_s']['median'], '{:.0f}')} | "
            f"{_bytes(f['kv_bytes']['median'])} | {ident} | "
            f"{_num(r['max_abs_logit_diff'], '{:.1e}')} | "
            f"{_num(vs.get('decode_tokens_per_s'), '{:.2f}×')} | "
            f"{_num(vs.get('total_speedup'), '{:.2f}×')} |")
    b = doc.get("bandwidth")
    if b and b.get("rows"):
        m = b["machine"]
        lines += ["", f"Copy bandwidth {m['copy_gb_s']:.1f} GB/s (read + write), read "
                      f"{m['read_gb_s']:.1f} GB/s, {m['threads']} thread(s).", "",
                  "| row | weights | KV read | TPOT | achieved GB/s | % of copy | ceiling tok/s |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for r in b["rows"]:
            lines.append(f"| {r['label']} | {_bytes(r['weight_bytes'])} | {_bytes(r['kv_bytes'])}"
                         f" | {_s(r['tpot_s'])} | {_num(r['achieved_gb_s'])} | "
                         f"{_num(r['pct_of_copy'], '{:.0f}%')} | "
                         f"{_num(r['ceiling_tokens_per_s'])} |")
        mf, p = b.get("matmul_floor"), b.get("profile")
        if mf:
            lines += ["", f"Matmuls alone: {mf['matrices']} matrices, {_bytes(mf['bytes'])}, "
                          f"{_s(mf['seconds'])} per token = {mf['gb_s']:.1f} GB/s "
                          f"({100 * mf['gb_s'] / m['copy_gb_s']:.0f}% of copy)."]
        if p:
            total = sum(p["breakdown_s"].values()) or 1
            lines += ["", f"Profile of kv/{p['backend']} decode steps ({p['steps']} steps at "
                          f"position {p['position']}, {_s(p['step_s_profiled'])} per step "
                          f"under the profiler):", "", "| part | per step | share |",
                      "|---|---:|---:|"]
            lines += [f"| {k} | {_s(v)} | {100 * v / total:.0f}% |"
                      for k, v in p["breakdown_s"].items()]
    sw = doc.get("sweep")
    if sw and sw.get("positions"):
        lines += ["", f"Decode step latency against position ({sw['backend']} attention):", "",
                  "| position | " + " | ".join(sw["step_s"]) + " | naive ÷ kv |",
                  "|---:|" + "---:|" * (len(sw["step_s"]) + 1)]
        for i, pos in enumerate(sw["positions"]):
            cells = [_s(sw["step_s"][s][i]) for s in sw["step_s"]]
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
                f"{_s(cell[n]['seconds'])} · {_bytes(cell[n]['peak_bytes'])}" if n in cell
                else "—" for n in lengths) + " |")
    return "\n".join(lines) + "\n"


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
                     _num(r["decode_tokens_per_s"]) + (
                         f" ±{r['decode_spread_pct']:.0f}%" if r.get("decode_spread_pct")
                         is not None else ""),
                     _num(r["over_batch_1"], "{:.2f}×"), _num(r.get("over_alone"), "{:.2f}×"),
                     _s(r["tpot_p50_s"]),
                     _s(r["ttft_p50_s"]), f"{r['identical']}/{r['requests']}"])
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
                         _num(None if x["prefix_hit_rate"] is None
                              else 100 * x["prefix_hit_rate"], "{:.0f}%"),
                         f"{x['identical']}/{p['requests']}"])
    return head, rows, phead, prow


def batch_caption(doc: dict) -> str:
    env, st = doc.get("environment", {}), (doc.get("batch") or {}).get("settings", {})
    la = env.get("load_average_start")
    return (f"{doc.get('model', {}).get('name', '?')} · {env.get('device_name', '?')} "
            f"({env.get('device', '?')}, {st.get('threads', '?')} threads) · "
            f"{env.get('dtype', '?')} · {st.get('max_new_tokens')} new tokens, greedy · "
            f"{st.get('warmup')} warm-up + {st.get('repeat')} timed passes, interleaved · "
            f"backend {st.get('backend')} · load average {la[0] if la else '?'} at the start")


def batch_alone_lines(doc: dict) -> list[str]:
    """One request alone through generate(), timed in every pass (plain, then fast paths)."""
    b = doc.get("batch") or {}
    out = []
    if b.get("alone_decode_tokens_per_s"):
        out.append(f"one request alone through generate() (kv/sdpa), timed in every pass: "
                   f"{b['alone_decode_tokens_per_s']:.1f} decode tok/s")
    for spec, v in (b.get("alone_fast_decode_tokens_per_s") or {}).items():
        out.append(f"… the same with the fast path +{spec}: {_num(v)} decode tok/s")
    return out


def batch_titles(doc: dict) -> tuple[str, str]:
    system = ((doc.get("batch") or {}).get("prefix") or {}).get("system_tokens", 200)
    return ("continuous batching: B requests at once (median of the passes)",
            f"8 requests sharing a {system}-token system prompt")


def render_batch(doc: dict, file=None) -> None:
    from rich.console import Console
    from rich.table import Table
    file = file or sys.stdout
    console = Console(file=file, width=None if file.isatty() else 200)
    console.print(f"[bold]{batch_caption(doc)}[/]")
    if doc.get("interrupted"):
        console.print("[bold yellow]interrupted: showing what was measured so far[/]")
    head, rows, phead, prow = batch_lines(doc)
    for line in batch_alone_lines(doc):
        console.print(line)
    for title, h, rs in zip(batch_titles(doc), (head, phead), (rows, prow)):
        if not rs:
            continue
        t = Table(title=title, title_justify="left")
        for i, name in enumerate(h):
            t.add_column(name, justify="left" if i == 0 else "right", no_wrap=True)
        for r in rs:
            t.add_row(*r)
        console.print(t)


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
