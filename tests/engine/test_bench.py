"""`python main.py bench` on a tiny random model: the JSON it writes, that --quick completes, and
that every row it calls "identical" really is (recomputed here, independently of the bench).

No timing thresholds: on a shared 2-core machine a number can be anything; only the shape of
the result and the correctness claims are tested.
"""

from __future__ import annotations

import io
import json
import math

import pytest
import torch

from engine.bench import BenchSettings, run_bench
from engine.bench import report
from engine.bench.runs import summarise
from engine.config import FastPathConfig
from engine.bench.sweep import cumulative_s
from cli.main import main as cli_main
from engine.config import ConfigError, GenerationConfig, ModelConfig
from engine.decoding import run_to_end
from engine.fast import STEPS
from engine.loader import load_model
from tests.conftest import byte_tokenizer

transformers = pytest.importorskip("transformers")


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """A tiny model gains nothing from threads, and on a shared 2-core machine two threads
    that wait for each other make every step many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> str:
    """A random tiny Llama saved the way transformers saves it, with a byte-level tokenizer."""
    folder = tmp_path_factory.mktemp("tiny-llama-hf")
    hf = ModelConfig.from_name("tiny-llama").to_hf()
    hf.pop("model_type"), hf.pop("architectures")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf))
    # A narrow embedding (as conftest.tiny_model does) so the greedy path is not one repeated id.
    torch.nn.init.normal_(model.model.embed_tokens.weight, std=0.2)
    model.save_pretrained(folder)
    byte_tokenizer().backend.save(str(folder / "tokenizer.json"))
    return str(folder)


@pytest.fixture(scope="module")
def quick_doc(hf_folder, tmp_path_factory) -> dict:
    """`bench --quick --sweep --json FILE` through the real command line, read back from FILE."""
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    code = cli_main(["bench", "--model", hf_folder, "--device", "cpu", "--quick", "--sweep",
                     "--sweep-max", "24", "--threads", "1", "--no-progress",
                     "--fast", "fuse+cols", "--fast", "int8",
                     "--json", str(out)])
    assert code == 0
    return json.loads(out.read_text())


# ----------------------------------------------------------------------------- schema
def _stat(s: dict) -> None:
    assert set(s) == {"median", "min", "max", "spread_pct", "n"}
    if s["n"]:
        assert s["min"] <= s["median"] <= s["max"]


def test_json_schema(quick_doc):
    d = quick_doc
    assert d["schema"] == "minillm-bench/1"
    assert d["complete"] is True and d["interrupted"] is False
    st = d["settings"]
    assert st["prompt"] == "Deep learning is" and st["quick"] is True
    assert (st["max_new_tokens"], st["repeat"], st["warmup"]) == (16, 1, 0)   # --quick
    env = d["environment"]
    for key in ("device", "device_name", "dtype", "torch", "transformers", "torch_threads"):
        assert env[key] is not None, key
    assert env["dtype"] == "float32" and env["torch"] == torch.__version__
    assert d["model"]["weight_bytes"] > 0 and d["prompt_tokens"] == len(d["prompt_ids"])
    assert d["reference"] == "naive/naive"
    labels = [r["label"] for r in d["rows"]]
    for strategy in ("naive", "kv", "paged"):
        for backend in ("naive", "sdpa"):
            assert f"{strategy}/{backend}" in labels
    assert "transformers (cache)" in labels and "transformers (no cache)" in labels
    assert "kv/sdpa +fuse+cols" in labels and "kv/sdpa +int8" in labels
    for r in d["rows"]:
        assert r["error"] is None, r
        assert r["repetitions"] == 1 and len(r["samples"]) == 1
        assert len(r["tokens"]) == st["max_new_tokens"]
        assert isinstance(r["identical"], bool)
        assert r["max_abs_logit_diff"] is not None and r["max_abs_logit_diff"] >= 0
        for fig in ("total_s", "ttft_s", "tpot_s", "prefill_s", "decode_tokens_per_s",
                    "prefill_tokens_per_s", "peak_memory_bytes", "peak_added_bytes",
                    "kv_bytes"):
            _stat(r["figures"][fig])
        assert set(r["vs_baseline"]) == {"decode_tokens_per_s", "total_speedup"}
    base = d["rows"][labels.index("transformers (cache)")]["vs_baseline"]
    assert base["decode_tokens_per_s"] == pytest.approx(1.0)
    h = d["headline"]
    assert h["seed"] == {"naive_s": 2.5, "kv_s": 1.2, "attention_max_abs_diff": 4.1e-08}
    for key in ("kv_speedup_total", "kv_over_baseline_decode",
                "efficient_attention_max_abs_logit_diff"):
        assert h[key] is not None, key
    bw = d["bandwidth"]
    assert bw["machine"]["copy_gb_s"] > 0
    assert {r["label"] for r in bw["rows"]} == set(labels)
    for r in bw["rows"]:
        assert r["total_bytes"] == r["weight_bytes"] + r["kv_bytes"]
        assert (r["achieved_gb_s"] is None) == r["recomputes"]
    assert set(bw["profile"]["breakdown_s"]) == {"matmul", "attention", "other ops",
                                                 "Python & dispatch"}
    sw = d["sweep"]
    assert sw["positions"] == sorted(sw["positions"]) and sw["positions"][-1] == 24
    for s in ("naive", "kv", "paged"):
        assert len(sw["step_s"][s]) == len(sw["positions"])
    assert sw["summary"]["longest_position"] == 24
    curves = d.get("attention_curves")
    if curves is not None:                       # engine.attention.measure is there
        assert {c["phase"] for c in curves} == {"prefill", "decode"}
        assert all(c["seconds"] > 0 and c["peak_bytes"] >= 0 for c in curves)


def test_json_has_no_nan(quick_doc, tmp_path):
    """allow_nan=False in the writer: the file is strict JSON any tool can read."""
    text = json.dumps(quick_doc, allow_nan=False)
    assert "NaN" not in text


# ----------------------------------------------------------------------------- correctness
def _engine_tokens(lm, ids, strategy, backend, n, fast=None):
    extra = {"fast": FastPathConfig.from_spec(fast)} if fast else {}
    cfg = GenerationConfig(strategy=strategy, backend=backend, max_new_tokens=n,
                           attention_rows=False, stop_at_eos=False, **extra)
    return list(run_to_end(lm.model, lm.tokenizer, ids, cfg, steps=STEPS)[1].tokens)


def test_identical_rows_really_are(quick_doc, hf_folder):
    """Recompute every row's tokens without the bench and check its yes/no claim."""
    d = quick_doc
    n, ids = d["settings"]["max_new_tokens"], d["prompt_ids"]
    lm = load_model(hf_folder, "cpu", "float32")
    reference = _engine_tokens(lm, ids, "naive", "naive", n)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_folder).eval()
    hf.generation_config.eos_token_id = None
    for r in d["rows"]:
        if r["kind"] == "engine":
            tokens = _engine_tokens(lm, ids, r["strategy"], r["backend"], n, r["fast"])
        else:
            x = torch.tensor([ids])
            out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n,
                              do_sample=False, pad_token_id=0,
                              use_cache=r["label"] == "transformers (cache)")
            tokens = out[0, len(ids):].tolist()
        assert r["tokens"] == tokens, r["label"]
        assert r["identical"] == (tokens == reference), r["label"]


# ----------------------------------------------------------------------------- Ctrl+C
def test_interrupt_keeps_what_was_measured(hf_folder):
    lm = load_model(hf_folder, "cpu", "float32")
    ticks = []

    def tick(what):
        ticks.append(what)
        if what.startswith("pass 1") and "kv/" in what:
            raise KeyboardInterrupt
    doc = run_bench(BenchSettings(model=hf_folder, device="cpu", quick=True, baseline=False,
                                  backends=("naive", "sdpa"), threads=1), tick=tick, loaded=lm)
    assert doc["interrupted"] is True and doc["complete"] is False
    timed = [r["label"] for r in doc["rows"] if r["samples"]]
    assert timed == ["naive/naive", "naive/sdpa"]               # the rows before the Ctrl+C
    json.dumps(doc, allow_nan=False)
    buf = io.StringIO()
    report.render(doc, file=buf)
    assert "interrupted" in buf.getvalue() and "naive/sdpa" in buf.getvalue()


def test_interrupt_while_loading_still_reports(hf_folder, tmp_path):
    """Ctrl+C before anything was measured: a (nearly empty) report, valid JSON, no traceback."""
    def tick(what):
        raise KeyboardInterrupt
    doc = run_bench(BenchSettings(model=hf_folder, device="cpu"), tick=tick)
    assert doc["interrupted"] is True and doc["rows"] == []
    report.write_json(doc, str(tmp_path / "b.json"))
    report.render(doc, file=io.StringIO())
    report.markdown(doc)


def test_render_shows_tables_and_charts(quick_doc):
    buf = io.StringIO()
    report.render(quick_doc, file=buf)
    text = buf.getvalue()
    for part in ("standard experiment", "transformers (cache)", "× HF decode", "bandwidth",
                 "decode step latency vs position", "seed: KV cache took 50 tokens"):
        assert part in text, part
    assert "\x1b[" not in text                                  # no colour codes into a file


def test_markdown_tables(quick_doc):
    md = report.markdown(quick_doc)
    assert "| row | total | TTFT |" in md and "| kv/sdpa |" in md
    assert "| position | naive | kv | paged |" in md


# ----------------------------------------------------------------------------- settings, maths
@pytest.mark.parametrize("kw", [dict(strategies=("fast",)), dict(repeat=0), dict(warmup=-1),
                                dict(max_new_tokens=1), dict(dtype="int3"), dict(threads=0),
                                dict(sweep_max=2), dict(prompt="")])
def test_bad_settings_are_config_errors(kw):
    with pytest.raises(ConfigError):
        BenchSettings(**kw)


def test_fast_variants_parse():
    cfg = FastPathConfig.from_spec("fuse+cols+int8")
    assert (cfg.fuse, cfg.layout, cfg.weights) == (True, "cols", "int8")
    with pytest.raises(ConfigError, match="warp"):
        BenchSettings(fast=("fuse+warp",))


def test_unknown_backend_is_a_usage_error(hf_folder, capsys):
    code = cli_main(["bench", "--model", hf_folder, "--device", "cpu", "--quick",
                     "--backends", "warp", "--no-progress"])
    assert code == 2
    assert "warp" in capsys.readouterr().err


def test_summarise_median_and_spread():
    s = summarise([1.0, 3.0, 2.0, float("nan")])
    assert s == {"median": 2.0, "min": 1.0, "max": 3.0, "spread_pct": 50.0, "n": 3}
    assert summarise([])["median"] is None


def test_cumulative_time_is_the_area_under_the_curve():
    # a straight line 1 → 3 between positions 0 and 2, then flat
    assert cumulative_s([0, 2], [1.0, 3.0], 0, 4) == pytest.approx(1 + 2 + 3 + 3)
    assert math.isclose(cumulative_s([4], [0.5], 0, 10), 5.0)
