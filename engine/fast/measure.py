"""The numbers behind docs/fast_path.md, measured in one process so they can be compared.

    python -m engine.fast.measure [--new-tokens 50] [--rounds 3] [--threads N] [--json FILE]
    python -m engine.fast.measure --startup     (process start → first token, peak memory)

For each variant (the plain engine, each fast-path option, Hugging Face `generate()` on the
same weights) it decodes the seed's experiment ("Deep learning is", greedy) and reports decode
tokens/s (median over rounds; rounds interleave the variants, so a noisy neighbour slows all of
them alike), the bytes of weights one step reads, the machine's measured copy bandwidth, and
the ceiling those two imply — plus, for every variant, whether its tokens equal the plain
engine's, where they first differ, and the largest logits error while both runs had seen the
same tokens.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from ..compare import compare
from ..config import FastPathConfig, GenerationConfig
from ..decoding import run_to_end
from . import STEPS, decode_bytes, prepare

PROMPT = "Deep learning is"

VARIANTS: dict[str, FastPathConfig] = {
    "plain": FastPathConfig(),
    "fuse": FastPathConfig(fuse=True),
    "cols": FastPathConfig(layout="cols"),
    "fuse+cols": FastPathConfig(fuse=True, layout="cols"),
    "static step": FastPathConfig(cuda_graphs=True),      # on a CPU: the uncaptured fixed step
    "bfloat16 weights": FastPathConfig(weights="bfloat16"),
    "float16 weights": FastPathConfig(fuse=True, weights="float16"),
    "int8 weights": FastPathConfig(fuse=True, weights="int8"),
    "int8 + float32 head": FastPathConfig(fuse=True, weights="int8", quantize_head=False),
    "C step": FastPathConfig(kernel="c"),
    "C step + int8": FastPathConfig(kernel="c", weights="int8"),
    "C step + int8 + float32 head": FastPathConfig(kernel="c", weights="int8",
                                                   quantize_head=False),
    "gguf blocks": FastPathConfig(weights="gguf"),
    "C step + gguf blocks": FastPathConfig(kernel="c", weights="gguf"),
}


def copy_bandwidth(mib: int = 256, repeats: int = 7) -> float:
    """Best-of copy bandwidth in bytes/s (read + write counted), on the CPU."""
    a = torch.ones(mib * 2**20 // 4)
    b = torch.empty_like(a)
    b.copy_(a)
    best = min(_timed(lambda: b.copy_(a)) for _ in range(repeats))
    return 2 * a.nbytes / best


def read_bandwidth(mib: int = 256, repeats: int = 7) -> float:
    """Best-of read bandwidth (a sum streams the array once), bytes/s."""
    a = torch.ones(mib * 2**20 // 4)
    return a.nbytes / min(_timed(lambda: a.sum()) for _ in range(repeats))


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


class HFClock:
    """A logits processor that changes nothing and notes when each step's logits arrive."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


def hf_decode(hf, ids: list[int], n: int) -> tuple[float, list[int]]:
    """transformers generate(): decode tokens/s (first token excluded, like ours), tokens."""
    from transformers import LogitsProcessorList
    clock = HFClock()
    x = torch.tensor([ids])
    with torch.inference_mode():
        out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n,
                          do_sample=False, logits_processor=LogitsProcessorList([clock]))
    steps = clock.times
    return (len(steps) - 1) / (steps[-1] - steps[0]), out[0, len(ids):].tolist()


def engine_decode(model, tok, fast: FastPathConfig, n: int):
    cfg = GenerationConfig(max_new_tokens=n, attention_rows=False, keep_logits=True,
                           stop_at_eos=False, fast=fast)
    events, fin = run_to_end(model, tok, PROMPT, cfg, steps=STEPS)
    logits = torch.stack([e.logits for e in events if getattr(e, "logits", None) is not None])
    return fin.metrics.decode_tokens_per_s, list(fin.tokens), logits          # (steps, vocab)


def lockstep(model, tok, variants: dict[str, FastPathConfig], n: int) -> dict[str, float]:
    """Median decode-step rate of each variant, the variants' steps interleaved one by one.

    On a machine whose load changes from second to second, whole runs one after another see
    different neighbours; stepping all variants in turn (each with its own cache) exposes them
    to the same load, so their ratios are fair even when the absolute numbers are not.
    """
    from ..attention import get_backend
    from ..decoding import CachedAttention, forward_step, make_cache
    from . import make_decoder
    ids = tok.encode(PROMPT)
    state = {}
    for name, fast in variants.items():
        m = prepare(model, fast)
        cache = make_cache("kv", m, len(ids) + n + 1)
        attn = CachedAttention(get_backend("sdpa", m.device), cache)
        logits = forward_step(m, torch.tensor([ids]), 0, attn)
        dec = make_decoder(m, cache, fast, len(ids)) if fast.own_step else None
        state[name] = dict(m=m, attn=attn, dec=dec, token=int(logits.argmax()), times=[])
    prepare(model, FastPathConfig())
    for i in range(n):
        pos = len(ids) + i
        for name, st in state.items():
            prepare(model, variants[name])             # its thread setting, if any
            t = time.perf_counter()
            if st["dec"] is not None:
                logits = st["dec"].step(st["token"], pos)
            else:
                logits = forward_step(st["m"], torch.tensor([[st["token"]]]), pos, st["attn"])
            st["token"] = int(logits.argmax())
            st["times"].append(time.perf_counter() - t)
    for st in state.values():
        st["attn"].cache.free()
    return {name: 1 / statistics.median(st["times"]) for name, st in state.items()}


BASELINE_IMPORTS = ("import resource, torch, numpy, tokenizers, cli.main, engine.decoding; "
                    "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)")


def startup(rounds: int = 3, cache: str | None = None) -> list[dict]:
    """Process start → first token of `python main.py run`, and its peak resident memory, for
    the float32 C step and for `--weights gguf` (each in a fresh process; the first token is the
    first "token" line of `run --json`). `cache` (MINILLM_CACHE) lets a caller time a first run."""
    import os
    import subprocess
    import sys
    env = dict(os.environ, **({"MINILLM_CACHE": cache} if cache else {}))
    base = int(subprocess.run([sys.executable, "-c", BASELINE_IMPORTS], capture_output=True,
                              text=True, env=env, check=True).stdout.split()[-1])
    rows = []
    for label, flags in (("float32, --kernel c", ["--kernel", "c"]),
                         ("--weights gguf --kernel c", ["--weights", "gguf", "--kernel", "c"])):
        firsts, peaks = [], []
        for _ in range(rounds):
            t0 = time.perf_counter()
            proc = subprocess.Popen([sys.executable, "main.py", "run", PROMPT, "--json",
                                     "--max-new-tokens", "2", *flags], stdout=subprocess.PIPE,
                                    stderr=subprocess.DEVNULL, text=True, env=env)
            first = peak = None
            for line in proc.stdout:
                event = json.loads(line)
                if first is None and event.get("type") == "token":
                    first = time.perf_counter() - t0
                if event.get("type") == "finished":
                    peak = event["metrics"]["peak_memory_bytes"]
            proc.wait()
            firsts.append(first)
            peaks.append(peak)
        rows.append(dict(run=label, first_token_s=statistics.median(firsts),
                         first_token_s_all=firsts, peak_rss_bytes=max(peaks),
                         above_runtime_bytes=max(peaks) - base, runtime_rss_bytes=base))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--new-tokens", type=int, default=50)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names")
    p.add_argument("--no-hf", action="store_true")
    p.add_argument("--compile", action="store_true", help="add a torch.compile variant")
    p.add_argument("--json", default=None)
    p.add_argument("--lockstep", action="store_true",
                   help="also time the variants step by step, interleaved (fair under load)")
    p.add_argument("--startup", action="store_true",
                   help="only time process start → first token and peak memory of `run`, "
                        "float32 and --weights gguf, each in fresh processes")
    a = p.parse_args(argv)
    if a.startup:
        rows = startup(a.rounds)
        print("| run | first token (median) | all | peak RSS | above the runtime's own |")
        print("|---|---:|---|---:|---:|")
        for r in rows:
            print(f"| {r['run']} | {r['first_token_s']:.2f} s | "
                  f"{', '.join(f'{x:.2f}' for x in r['first_token_s_all'])} | "
                  f"{r['peak_rss_bytes'] / 1e6:.0f} MB | {r['above_runtime_bytes'] / 1e6:.0f} MB |")
        print(f"(the runtime alone — Python, torch, tokenizers, the engine's modules: "
              f"{rows[0]['runtime_rss_bytes'] / 1e6:.0f} MB)")
        return 0
    if a.threads:
        torch.set_num_threads(a.threads)
    from ..loader import load_model
    lm = load_model(None, "cpu", "float32")
    model, tok = lm.model, lm.tokenizer
    ids = tok.encode(PROMPT)
    names = [v for v in a.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {', '.join(map(repr, unknown))}; choose from: "
                f"{', '.join(VARIANTS)}")
    variants = {k: VARIANTS[k] for k in names}
    if a.compile:
        variants["compile"] = FastPathConfig(compile=True)
        variants["fuse+int8+compile"] = FastPathConfig(fuse=True, weights="int8", compile=True)

    # Build every variant (and compile) before timing anything.
    setup = {}
    for name, fast in variants.items():
        t = time.perf_counter()
        engine_decode(model, tok, fast, 3)          # warm-up (and compilation, if asked)
        setup[name] = time.perf_counter() - t
    hf = None
    if not a.no_hf and lm.hf_folder:
        from transformers import AutoModelForCausalLM
        hf = AutoModelForCausalLM.from_pretrained(lm.hf_folder, dtype=torch.float32,
                                                  trust_remote_code=False).eval()
        hf.generation_config.eos_token_id = None
        hf.generation_config.pad_token_id = 0
        hf_decode(hf, ids, 3)

    rates: dict[str, list[float]] = {k: [] for k in [*variants, *(["transformers"] if hf else [])]}
    tokens, logits = {}, {}
    bw_copy, bw_read = [], []
    for _ in range(a.rounds):
        bw_copy.append(copy_bandwidth())
        bw_read.append(read_bandwidth())
        for name, fast in variants.items():
            r, tokens[name], logits[name] = engine_decode(model, tok, fast, a.new_tokens)
            rates[name].append(r)
        if hf:
            r, tokens["transformers"] = hf_decode(hf, ids, a.new_tokens)
            rates["transformers"].append(r)

    step_rates = lockstep(model, tok, variants, a.new_tokens) if a.lockstep else {}
    bandwidth = max(bw_read)
    ref_tokens, ref_logits = tokens["plain"], logits["plain"]
    hf_rate = statistics.median(rates["transformers"]) if hf else float("nan")
    rows = []
    for name in rates:
        fast = variants.get(name)
        nbytes = decode_bytes(prepare(model, fast)) if fast else decode_bytes(model)
        rate = statistics.median(rates[name])
        best = max(rates[name])
        # Logits are comparable while both runs have seen the same tokens (engine/compare.py).
        c = compare(tokens[name], ref_tokens, logits.get(name), ref_logits)
        first_diff, err = c.first_difference, c.max_logit_delta
        rows.append(dict(variant=name, tok_s=rate, tok_s_best=best, tok_s_all=rates[name],
                         tok_s_lockstep=step_rates.get(name), weight_mb=nbytes / 1e6,
                         ceiling_tok_s=bandwidth / nbytes, of_ceiling=rate * nbytes / bandwidth,
                         vs_transformers=rate / hf_rate, identical=first_diff is None,
                         first_diff=first_diff, max_abs_dlogits=err,
                         setup_s=setup.get(name)))
    info = dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                machine=platform.processor() or platform.machine(), cpus=torch.get_num_threads(),
                torch=torch.__version__, threads=torch.get_num_threads(),
                read_gb_s=bandwidth / 1e9, copy_gb_s=max(bw_copy) / 1e9,
                new_tokens=a.new_tokens, rounds=a.rounds, prompt=PROMPT, rows=rows)
    print(f"{info['date']} · torch {info['torch']} · {info['threads']} threads · read "
          f"{info['read_gb_s']:.1f} GB/s · copy {info['copy_gb_s']:.1f} GB/s · "
          f"{a.new_tokens} tokens × {a.rounds} rounds")
    print("| variant | decode tok/s (median) | best | lockstep | × transformers (best) | "
          "weight MB/step | ceiling tok/s | % of ceiling (best) | tokens = plain | "
          "max Δlogits (same inputs) | setup s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|")
    hf_best = max(rates["transformers"]) if hf else float("nan")
    for r in rows:
        ident = "yes" if r["identical"] else f"first differs at {r['first_diff']}"
        err = "—" if r["max_abs_dlogits"] is None else f"{r['max_abs_dlogits']:.2g}"
        setup_s = "—" if r["setup_s"] is None else f"{r['setup_s']:.1f}"
        lock = "—" if r["tok_s_lockstep"] is None else f"{r['tok_s_lockstep']:.1f}"
        r["of_ceiling"] = r["tok_s_best"] * r["weight_mb"] * 1e6 / bandwidth
        print(f"| {r['variant']} | {r['tok_s']:.1f} | {r['tok_s_best']:.1f} | {lock} | "
              f"{r['tok_s_best'] / hf_best:.2f} | "
              f"{r['weight_mb']:.0f} | {r['ceiling_tok_s']:.1f} | {100 * r['of_ceiling']:.0f}% | "
              f"{ident} | {err} | {setup_s} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(info, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
