"""The bench on the terminal: a progress bar while it runs, then rich tables and plotext charts.

The one place under engine/ that draws: the measuring modules beside it never import rich or
plotext, and this one imports them only when called. The words in each cell come from cells.py
and verdicts.py, which the Markdown writer (markdown.py) shares.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager

from ..units import format_bandwidth, format_bytes, format_number, format_seconds
from .cells import (FAST_HEAD, batch_alone_lines, batch_caption, batch_lines, batch_titles,
                    fast_table_lines, gib_s, spread)
from .verdicts import headline_text, sweep_text


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
    if st.get("fast_table") and doc.get("rows"):
        console.print(cell_table("fast paths on kv/sdpa (ceiling = copy bandwidth ÷ bytes one "
                                 "step reads; setup = the first pass)", FAST_HEAD,
                                 fast_table_lines(doc)))


def cell_table(title: str, head: list[str], rows: list[list[str]]):
    """A rich table of text cells (cells.py): the first column left, the others right."""
    from rich.table import Table
    t = Table(title=title, title_justify="left")
    for i, name in enumerate(head):
        t.add_column(name, justify="left" if i == 0 else "right", no_wrap=True)
    for r in rows:
        t.add_row(*r)
    return t


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
                  format_seconds(f["total_s"]["median"]) + spread(f["total_s"]),
                  format_seconds(f["ttft_s"]["median"]), format_seconds(f["tpot_s"]["median"]),
                  format_number(f["decode_tokens_per_s"]["median"])
                  + spread(f["decode_tokens_per_s"]),
                  format_number(f["prefill_tokens_per_s"]["median"], "{:.0f}"),
                  f'{format_bytes(f["peak_memory_bytes"]["median"])} '
                  f'[dim](+{format_bytes(f["peak_added_bytes"]["median"])})[/]',
                  format_bytes(f["kv_bytes"]["median"]),
                  ident, format_number(r["max_abs_logit_diff"], "{:.1e}"),
                  format_number(vs.get("decode_tokens_per_s"), "{:.2f}×"),
                  format_number(vs.get("total_speedup"), "{:.2f}×"))
    return t



def bandwidth_tables(doc: dict):
    from rich.table import Table
    b = doc["bandwidth"]
    m = b["machine"]
    out = [f"\n[bold]bandwidth[/]: this machine copies {format_bandwidth(m['copy_gb_s'] * 1e9)} "
           f"(read + write, {format_bytes(m['buffer_bytes'])} buffer) and reads "
           f"{format_bandwidth(m['read_gb_s'] * 1e9)} (sum), {m['threads']} threads"]
    if b.get("formats"):
        t = Table(title="bytes per token → tokens per second: the ceiling of each weight format",
                  title_justify="left")
        for name in ("weights", "bytes per token", "ceiling tok/s (copy)",
                     "ceiling tok/s (read)"):
            t.add_column(name, justify="left" if name == "weights" else "right")
        for f in b["formats"]:
            t.add_row(f["format"], format_bytes(f["weight_bytes"]),
                      format_number(f["ceiling_tokens_per_s"]),
                      format_number(f["read_ceiling_tokens_per_s"]))
        out.append(t)
    if b.get("rows"):
        t = Table(title="bytes read per decode step vs the copy bandwidth", title_justify="left")
        for name in ("row", "weights", "KV read", "TPOT", "achieved GiB/s", "% of copy",
                     "ceiling tok/s"):
            t.add_column(name, justify="left" if name == "row" else "right")
        for r in b["rows"]:
            note = " [dim](recomputes)[/]" if r["recomputes"] else ""
            t.add_row(r["label"] + note, format_bytes(r["weight_bytes"]),
                      format_bytes(r["kv_bytes"]),
                      format_seconds(r["tpot_s"]), format_number(gib_s(r["achieved_gb_s"])),
                      format_number(r["pct_of_copy"], "{:.0f}%"),
                      format_number(r["ceiling_tokens_per_s"], "{:.1f}"))
        out.append(t)
        out.append("[dim](recomputes): naive strategies push the whole sequence through the "
                   "model every step, so they are bound by arithmetic, not by these bytes[/]")
    mf = b.get("matmul_floor")
    if mf:
        out.append(f"matmuls alone ({mf['matrices']} matrices, {format_bytes(mf['bytes'])}): "
                   f"{format_seconds(mf['seconds'])} per token = "
                   f"{format_bandwidth(mf['gb_s'] * 1e9)} "
                   f"({100 * mf['gb_s'] / m['copy_gb_s']:.0f}% of copy) — GEMV efficiency")
    p = b.get("profile")
    if p:
        t = Table(title=f"where a kv/{p['backend']} decode step goes (torch.profiler, "
                        f"{p['steps']} steps at position {p['position']}, "
                        f"{format_seconds(p['step_s_profiled'])} per step profiled)",
                  title_justify="left")
        t.add_column("part")
        t.add_column("per step", justify="right")
        t.add_column("share", justify="right")
        total = sum(p["breakdown_s"].values()) or 1
        for k, v in p["breakdown_s"].items():
            t.add_row(k, format_seconds(v), f"{100 * v / total:.0f}%")
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



def render_batch(doc: dict, file=None) -> None:
    from rich.console import Console
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
        console.print(cell_table(title, h, rs))

