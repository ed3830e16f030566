"""Does the UI distort what it measures? Decode tokens/s with and without the app attached.

    python -m tui.measure [--tokens 100] [--rounds 3] [--strategy kv] [--backend sdpa]

Three ways to run the same greedy request, interleaved round by round so that a change in
machine load hits all of them alike:

    engine     generate() in this process, nothing listening (the reference), PyTorch's
               default threads; and `engine@N`, the same with the N threads the engine process
               uses beside the app (one core left to the app), when N differs
    process    the engine process the app uses, with a plain thread reading its batches
    app        the real app (headless Textual, full compositing) on the engine process

All three record attention rows, as the app asks for them. The numbers are the engine's own
decode tokens/s (1 / TPOT, engine/metrics.py), so what is compared is how much the consumer
slows the producer down. Results are medians; docs/ui.md records a run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import queue
import statistics
import time


def torch_threads() -> int:
    import torch
    return torch.get_num_threads()


def engine_runs(lm, cfg, prompt):
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=100)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--strategy", default="kv")
    p.add_argument("--backend", default="sdpa")
    p.add_argument("--prompt", default="Deep learning is")
    p.add_argument("--fast", default="", help="fast-path options, e.g. c (as the app's --fast)")
    args = p.parse_args()
    load = os.getloadavg()[0]
    t0 = time.time()
    res = asyncio.run(main_async(args))
    ref = statistics.median(res["engine"])
    fast = f" +{args.fast}" if args.fast else ""
    print(f"\n{args.tokens} tokens, {args.strategy}/{args.backend}{fast}, {args.rounds} rounds, "
          f"load average at start {load:.1f}, {time.time() - t0:.0f} s")
    for name, values in res.items():
        med = statistics.median(values)
        print(f"  {name:<8} median {med:6.1f} tok/s  ({(med / ref - 1) * 100:+.1f}% vs engine)"
              f"  runs: {', '.join(f'{v:.1f}' for v in values)}")


if __name__ == "__main__":
    main()
