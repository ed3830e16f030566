"""One bench run from start to finish, collected into a single JSON-ready dictionary.

Stages: load → copy bandwidth → standard experiment (+ transformers baseline; with
--fast-table, kv/sdpa and every fast-path variant) → lockstep steps (optional) → bandwidth
view → length sweep (optional) → attention curves (optional). Each stage writes into the
result as it goes; Ctrl+C stops the current stage, marks the result `interrupted`, and
everything measured so far is still reported.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import platform
import time
from typing import Callable

import torch

from ..loader import load_model
from . import bandwidth as bw
from . import fast_paths as fp
from . import sweep as sw
from .attention_curves import attention_curves
from .runs import BASELINE, REFERENCE, StandardResult, build_rows, standard_experiment
from .settings import BenchSettings
from .verdicts import headline, ratio

SCHEMA = "minillm-bench/1"
Tick = Callable[[str], None]


def environment(device: torch.device, dtype: torch.dtype) -> dict:
    env = {"device": str(device), "device_name": device_name(device),
           "dtype": str(dtype).removeprefix("torch."), "torch": torch.__version__,
           "python": platform.python_version(), "platform": platform.platform(),
           "cpu_count": _cpu_count(), "torch_threads": torch.get_num_threads(),
           "load_average_start": _loadavg()}
    try:
        import transformers
        env["transformers"] = transformers.__version__
    except ImportError:
        env["transformers"] = None
    return env


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def _loadavg() -> list[float] | None:
    """1/5/15-minute load average: on a shared machine, how busy it was with others' work."""
    import os
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _cpu_count() -> int | None:
    import os
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count()


def estimate_stages(settings: BenchSettings, n_rows: int, n_sweep: int) -> int:
    """How many ticks the progress bar should expect."""
    return ((settings.warmup + settings.repeat) * n_rows + 1 + 3 * n_sweep + 3
            + settings.lockstep)


def run_bench(settings: BenchSettings, tick: Tick = lambda _: None,
              set_total: Callable[[int], None] = lambda _: None,
              loaded=None) -> dict:
    """Run everything `settings` asks for. `loaded` (a LoadedModel) skips the load (tests)."""
    s = settings.reduced()
    t_start = time.perf_counter()
    stages: dict[str, float] = {}
    current = ["", t_start]

    def stage(what: str, show: bool = True) -> None:
        """Tick the progress bar and book the time since the last tick to its stage."""
        now = time.perf_counter()
        name = current[0].split(":")[0]
        if name:
            stages[name] = stages.get(name, 0.0) + now - current[1]
        current[:] = [what, now]
        if show:
            tick(what)

    lm = loaded
    threads_before = torch.get_num_threads()
    if s.threads:
        torch.set_num_threads(s.threads)
    doc: dict = {"schema": SCHEMA, "complete": False, "interrupted": False,
                 "started_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                 "settings": s.to_dict(), "reference": "/".join(REFERENCE)}
    try:
        stage("loading the model")
        if lm is None:
            lm = load_model(s.model, s.device, s.dtype)
        device = lm.model.device
        doc["environment"] = environment(device, lm.model.dtype)
        doc["model"] = {"name": lm.name, "source": lm.source,
                        "parameters": lm.model.num_parameters(),
                        "weight_bytes": lm.model.weight_bytes(), "config": lm.config.to_dict()}
        if s.fast_table and not s.fast:               # every variant this model can run
            s = dataclasses.replace(s, fast=fp.default_variants(lm.model))
            doc["settings"] = s.to_dict()
        ids = lm.tokenizer.encode(s.prompt)
        doc["prompt_tokens"], doc["prompt_ids"] = len(ids), ids
        hf = None
        doc["baseline"] = {"label": BASELINE, "available": False, "error": None}
        if s.baseline:
            stage("loading the transformers baseline")
            from .hf_baseline import BaselineUnavailable, HFBaseline
            try:
                hf = HFBaseline(lm)
                doc["baseline"].update(available=True, transformers=hf.version)
            except (BaselineUnavailable, OSError, ValueError) as exc:
                doc["baseline"]["error"] = str(exc).splitlines()[0]
        result = StandardResult(prompt_ids=ids, rows=build_rows(lm, s, ids, hf))
        positions = sw.sweep_positions(device, lm.config.max_seq_len, s.sweep_max, s.quick) \
            if s.sweep else []
        set_total(estimate_stages(s, len(result.rows), len(positions)))
        doc["_standard"] = result                         # filled in place, serialised below
        if s.bandwidth:
            stage("measuring copy bandwidth")
            doc["bandwidth"] = {"machine": bw.copy_bandwidth(
                device, (64 if s.quick else 256) << 20)}
            doc["bandwidth"]["formats"] = bw.format_ceilings(lm, doc["bandwidth"]["machine"])
        standard_experiment(lm, s, result, hf, stage)
        if s.lockstep:
            stage("lockstep: every variant one step at a time, in turn")
            variants = [r.fast for r in result.rows if r.fast and not r.error]
            doc["lockstep"] = fp.lockstep(lm, variants, s.max_new_tokens, s.prompt)
        if s.bandwidth:
            stage("timing the matmuls alone")
            doc["bandwidth"]["matmul_floor"] = bw.matmul_floor(lm.model)
            backend = "sdpa" if any(r.backend == "sdpa" for r in result.rows) \
                else next((r.backend for r in result.rows if r.backend), "naive")
            stage("profiling decode steps")
            doc["bandwidth"]["profile"] = bw.profile_decode(
                lm, backend, position=len(ids) + s.max_new_tokens // 2,
                steps=4 if s.quick else 16)
        if s.sweep:
            backend = "sdpa" if "sdpa" in {r.backend for r in result.rows} else \
                next((r.backend for r in result.rows if r.backend), "naive")
            doc["sweep"] = {}
            sw.length_sweep(lm, backend, positions, doc["sweep"], s.block_size, s.seed,
                            s.quick, stage)
            doc["attention_curves"] = attention_curves(
                device, lm, sorted({r.backend for r in result.rows if r.backend}), s.quick, stage)
        doc["complete"] = True
    except KeyboardInterrupt:
        doc["interrupted"] = True
    finally:
        torch.set_num_threads(threads_before)
    stage("done", show=False)            # books the last stage; no tick a Ctrl+C could hit
    doc["stage_s"] = stages
    if "environment" in doc:
        doc["environment"]["load_average_end"] = _loadavg()
    finish(doc, time.perf_counter() - t_start, lm)
    return doc


# ----------------------------------------------------------------------------- serialising
def finish(doc: dict, duration_s: float, lm=None) -> None:
    """Turn the live objects into plain data, add ratios and the headline."""
    doc["duration_s"] = duration_s
    result: StandardResult | None = doc.pop("_standard", None)
    rows = result.rows if result else []
    doc["passes_done"] = result.passes_done if result else 0
    base = next((r for r in rows if r.label == BASELINE and r.samples), None)
    out_rows = []
    for r in rows:
        d = r.to_dict()
        d["vs_baseline"] = None
        if base is not None and r.samples:
            d["vs_baseline"] = {
                "decode_tokens_per_s": ratio(r.median("decode_tokens_per_s"),
                                              base.median("decode_tokens_per_s")),
                "total_speedup": ratio(base.median("total_s"), r.median("total_s"))}
        out_rows.append(d)
    doc["rows"] = out_rows
    if lm is not None and "machine" in doc.get("bandwidth", {}) and rows:
        doc["bandwidth"]["rows"] = bw.bandwidth_view(
            lm, [r for r in rows if r.samples and not r.error],
            doc["prompt_tokens"], doc["settings"]["max_new_tokens"], doc["bandwidth"]["machine"])
    doc["headline"] = headline(doc, rows)
    if doc.get("sweep"):
        doc["sweep"]["summary"] = sw.summary(doc["sweep"], doc.get("prompt_tokens", 0))
    clean = _plain(doc)
    doc.clear()
    doc.update(clean)


def _plain(x):
    """JSON-safe: nan/inf → None, tuples → lists, tensors/numpy → numbers."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, (bool, int, str)) or x is None:
        return x
    if hasattr(x, "tolist"):
        return _plain(x.tolist())
    if hasattr(x, "item"):
        return _plain(x.item())
    return str(x)


def write_json(doc: dict, path: str) -> None:
    """The result document as strict JSON (no NaN: _plain made every figure a number or null)."""
    with open(path, "w") as f:
        json.dump(doc, f, indent=2, allow_nan=False)
        f.write("\n")
