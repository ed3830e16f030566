"""Does the UI distort what it measures? Decode tokens/s with and without the app attached.

    python -m tui.measure [--tokens 100] [--rounds 3] [--strategy kv] [--backend sdpa]
                          [--fast c] [--json FILE]

The bench's UI-overhead stage. It lives beside the app because it drives the app (the engine
never imports the UI); everything else is the bench's: the run is named by run_label, the
engine's rate comes from the standard experiment's generate() loop and engine/metrics.py
(decode tokens/s = 1 / TPOT), the medians and spreads from engine/bench/runs.py's summarise,
the numbers are written by engine/units.py, the JSON by the bench's writer.

Three ways to run the same greedy request, interleaved round by round so that a change in
machine load hits all of them alike:

    engine     generate() in this process, nothing listening (the reference), PyTorch's
               default threads; and `engine@N`, the same with the N threads the engine process
               uses beside the app (one core left to the app), when N differs
    process    the engine process the app uses, with a plain thread reading its batches
    app        the real app (headless Textual, full compositing) on the engine process

All three record attention rows, as the app asks for them, so what is compared is how much the
consumer slows the producer down. docs/ui.md records a run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import queue
import time

from engine.bench.cells import spread
from engine.bench.experiment import write_json
from engine.bench.runs import summarise
from engine.bench.settings import FIRST_PROMPT
from engine.events import run_label
from engine.units import format_number, format_rate


def torch_threads() -> int:
    import torch
    return torch.get_num_threads()


def engine_runs(lm, cfg, prompt):
    """generate() alone, through the fast steps, as the bench's rows run it: decode tok/s.
    The events are dropped as they come (attention rows add up), as a consumer would."""
    from engine.decoding import generate
    from engine.fast import STEPS
    fin = None
    for ev in generate(lm.model, lm.tokenizer, prompt, cfg, steps=STEPS):
        fin = ev
    return fin.metrics.decode_tokens_per_s


async def main_async(args) -> dict[str, list[float]]:
    from engine.config import GenerationConfig
    from engine.loader import load_model
    from engine.events import Finished, Ready
    from engine.requests import RunRequest
    from tui.app import MiniLLMApp
    from tui.bridge import ProcessSource
    from tui.messages import EngineEvents
    from tui.settings import Settings

    prompt = args.prompt
    from engine.config import FastPathConfig
    from engine.fast.threads import apply_threads, threads_beside
    cfg = GenerationConfig(strategy=args.strategy, backend=args.backend,
                           max_new_tokens=args.tokens, attention_rows=True,
                           fast=FastPathConfig.from_spec(args.fast))
    default_threads, app_threads = torch_threads(), threads_beside(1)
    lm = load_model(None, "cpu", "float32")

    inbox: queue.Queue = queue.Queue()
    bare = ProcessSource(None, "cpu", "float32")
    bare.start(lambda envelopes, restart=False: [inbox.put(e.event) for e in envelopes])

    async def bare_run(run_id: int) -> float:
        bare.submit(RunRequest(prompt, cfg, run_id))
        while True:
            try:
                event = inbox.get_nowait()
            except queue.Empty:
                await asyncio.sleep(0.01)
                continue
            if isinstance(event, Finished):
                return event.metrics.decode_tokens_per_s

    results: dict[str, list[float]] = {"engine": [], "process": [], "app": []}
    if app_threads != default_threads:
        results[f"engine@{app_threads}"] = []
    app = MiniLLMApp(Settings(max_new_tokens=args.tokens, strategy=args.strategy,
                              backend=args.backend, prompt=prompt, fast=args.fast))
    finished: list = []                  # the Finished events the app drew

    def hook(message) -> None:
        if isinstance(message, EngineEvents):
            finished.extend(e.event for e in message.envelopes if isinstance(e.event, Finished))

    async with app.run_test(size=(160, 48), message_hook=hook) as pilot:
        while app.info is None:
            await asyncio.sleep(0.1)
        while True:                      # the bare client's model too
            event = inbox.get() if not inbox.empty() else None
            if isinstance(event, Ready):
                break
            await asyncio.sleep(0.1)
        engine_runs(lm, cfg, prompt)     # warm-up, all three
        await bare_run(0)
        n = len(finished)
        await pilot.press("enter")
        while len(finished) == n:
            await asyncio.sleep(0.05)
        for r in range(args.rounds):
            results["engine"].append(engine_runs(lm, cfg, prompt))
            if app_threads != default_threads:
                apply_threads(app_threads)
                results[f"engine@{app_threads}"].append(engine_runs(lm, cfg, prompt))
                apply_threads(default_threads)
            results["process"].append(await bare_run(r + 1))
            n = len(finished)
            await pilot.press("enter")
            while len(finished) == n:
                await asyncio.sleep(0.05)
            results["app"].append(finished[-1].metrics.decode_tokens_per_s)
            print(f"round {r + 1}: " + "  ".join(f"{k} {v[-1]:.1f}" for k, v in results.items()),
                  flush=True)
    bare.stop()
    return results


def summary(res: dict[str, list[float]]) -> dict[str, dict]:
    """Each consumer's decode tokens/s (the bench's median and spread) and its change against
    the engine alone, in percent."""
    ref = summarise(res["engine"])["median"]
    out = {}
    for name, values in res.items():
        stat = summarise(values)
        stat["vs_engine_pct"] = (stat["median"] / ref - 1) * 100 if stat["median"] and ref \
            else None
        out[name] = stat
    return out


def summary_lines(label: str, tokens: int, rounds: int, load: float, seconds: float,
                  stats: dict[str, dict], runs: dict[str, list[float]]) -> list[str]:
    lines = [f"{tokens} tokens, {label}, {rounds} rounds, load average at start {load:.1f}, "
             f"{seconds:.0f} s"]
    for name, st in stats.items():
        lines.append(f"  {name:<8} median {format_rate(st['median'])}{spread(st)}  "
                     f"({format_number(st['vs_engine_pct'], '{:+.1f}')}% vs engine)  runs: "
                     + ", ".join(format_number(v) for v in runs[name]))
    return lines


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m tui.measure",
                                description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=100)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--strategy", default="kv")
    p.add_argument("--backend", default="sdpa")
    p.add_argument("--prompt", default=FIRST_PROMPT)
    p.add_argument("--fast", default="", help="fast-path options, e.g. c (as the app's --fast)")
    p.add_argument("--json", metavar="FILE", default=None,
                   help="also write the runs and their summary to FILE")
    args = p.parse_args(argv)
    label = run_label(args.strategy, args.backend, args.fast)
    load = os.getloadavg()[0]
    t0 = time.time()
    res = asyncio.run(main_async(args))
    stats = summary(res)
    print("\n" + "\n".join(summary_lines(label, args.tokens, args.rounds, load,
                                         time.time() - t0, stats, res)))
    if args.json:
        write_json({"schema": "minillm-ui-overhead/1", "run": label, "tokens": args.tokens,
                    "rounds": args.rounds, "load_average_start": load,
                    "decode_tokens_per_s": res, "summary": stats}, args.json)


if __name__ == "__main__":
    main()
