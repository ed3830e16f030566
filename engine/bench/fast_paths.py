"""`bench --fast-table`: the table of docs/fast_path.md — every fast-path variant of a kv/sdpa
decode beside the plain engine and transformers, measured in one process.

It is the standard experiment (runs.py) narrowed to kv/sdpa: each variant is a row named as the
app, `run --fast` and the race name it (engine/events.py's run_label: "kv/sdpa +c+int8"); the
naive reference stands behind its "identical" and "max |Δ logits|" columns; transformers
generate() is the baseline; the passes are interleaved; the bandwidth view (bandwidth.py) gives
the bytes each step reads and the ceiling they allow; the first pass's wall time is the row's
setup (preparing the weights, building the C step, compiling). Two extras:

    --lockstep   every variant stepped one token at a time, in turn, each with its own cache:
                 on a machine whose load changes from second to second, whole runs one after
                 another see different neighbours; interleaved steps see the same ones
    --startup    process start → first token of `python main.py run` and its peak memory, for
                 the float32 C step and for the GGUF blocks (each in a fresh process)
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

import torch

from .. import fast
from ..attention import get_backend
from ..config import ConfigError, FastPathConfig
from ..decoding import CachedAttention, forward_step, make_cache
from ..events import run_label
from ..timing import clock
from .settings import FIRST_PROMPT

# The variants of docs/fast_path.md's table, in the fast-path words (config.FAST_WORDS).
VARIANTS = ("fuse", "cols", "fuse+cols", "graphs", "bf16", "fuse+fp16", "fuse+int8",
            "fuse+int8+head-full", "c", "c+int8", "c+int8+head-full", "gguf", "c+gguf")
STRATEGY, BACKEND = "kv", "sdpa"                        # the rows' decode: kv cache, sdpa


def default_variants(model) -> tuple[str, ...]:
    """VARIANTS that can run on `model` (the GGUF blocks need a model loaded from a .gguf file).
    torch.compile is not among them (minutes of compilation on a small CPU): name it, as in
    `--fast compile --fast fuse+int8+compile`."""
    try:
        fast.check_gguf(model)
        gguf = True
    except ConfigError:
        gguf = False
    return tuple(v for v in VARIANTS if gguf or "gguf" not in v)


# ----------------------------------------------------------------------------- lockstep
@torch.inference_mode()
def lockstep(lm, specs, n: int, prompt: str = FIRST_PROMPT) -> dict[str, float]:
    """Median decode-step rate (tokens/s) of the plain kv/sdpa step and of each variant, their
    steps interleaved one by one; keyed by run label."""
    model = lm.model
    ids = lm.tokenizer.encode(prompt)
    state = {}
    for spec in ("", *specs):
        cfg = FastPathConfig.from_spec(spec)
        m = fast.prepare(model, cfg)
        cache = make_cache(STRATEGY, m, len(ids) + n + 1)
        attn = CachedAttention(get_backend(BACKEND, m.device), cache)
        logits = forward_step(m, torch.tensor([ids], device=m.device), 0, attn)
        dec = fast.make_decoder(m, cache, cfg, len(ids)) if cfg.own_step else None
        state[run_label(STRATEGY, BACKEND, spec)] = dict(
            cfg=cfg, m=m, attn=attn, dec=dec, token=int(logits.argmax()), times=[])
    fast.prepare(model, FastPathConfig())
    try:
        for i in range(n):
            pos = len(ids) + i
            for st in state.values():
                fast.prepare(model, st["cfg"])             # its thread setting, if any
                t0 = clock(st["m"].device)
                if st["dec"] is not None:
                    logits = st["dec"].step(st["token"], pos)
                else:
                    x = torch.tensor([[st["token"]]], device=st["m"].device)
                    logits = forward_step(st["m"], x, pos, st["attn"])
                st["token"] = int(logits.argmax())
                st["times"].append(clock(st["m"].device) - t0)
    finally:
        fast.prepare(model, FastPathConfig())
        for st in state.values():
            st["attn"].cache.free()
    return {label: 1 / statistics.median(st["times"]) for label, st in state.items()}


# ----------------------------------------------------------------------------- startup
BASELINE_IMPORTS = ("import resource, torch, numpy, tokenizers, cli.main, engine.decoding; "
                    "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)")
# fast-path words → `run`'s flags for them
STARTUP_RUNS = (("c", ["--kernel", "c"]), ("c+gguf", ["--weights", "gguf", "--kernel", "c"]))


def startup(rounds: int = 3, cache: str | None = None) -> list[dict]:
    """Process start → first token of `python main.py run --json`, and its peak resident memory,
    for each of STARTUP_RUNS, each in a fresh process (the first token is the first "token"
    line). `cache` (MINILLM_CACHE) lets a caller time a first run."""
    env = dict(os.environ, **({"MINILLM_CACHE": cache} if cache else {}))
    base = int(subprocess.run([sys.executable, "-c", BASELINE_IMPORTS], capture_output=True,
                              text=True, env=env, check=True).stdout.split()[-1])
    rows = []
    for spec, flags in STARTUP_RUNS:
        firsts, peaks = [], []
        for _ in range(rounds):
            t0 = time.perf_counter()
            proc = subprocess.Popen([sys.executable, "main.py", "run", FIRST_PROMPT, "--json",
                                     "--max-new-tokens", "2", *flags],
                                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                    text=True, env=env)
            first = peak = None
            for line in proc.stdout:
                event = json.loads(line)
                if first is None and event.get("type") == "token":
                    first = time.perf_counter() - t0
                if event.get("type") == "finished":
                    peak = event["metrics"]["peak_memory_bytes"]
            proc.wait()
            if first is None or peak is None:
                raise RuntimeError(f"`main.py run {' '.join(flags)}` gave no token (exit "
                                   f"{proc.returncode})")
            firsts.append(first)
            peaks.append(peak)
        rows.append(dict(run=run_label(STRATEGY, BACKEND, spec),
                         first_token_s=statistics.median(firsts), first_token_s_all=firsts,
                         peak_rss_bytes=max(peaks), above_runtime_bytes=max(peaks) - base,
                         runtime_rss_bytes=base))
    return rows
