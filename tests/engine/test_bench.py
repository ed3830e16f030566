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
from engine.bench import markdown, terminal
from engine.bench.experiment import _plain, write_json
from engine.bench.runs import summarise
from engine.config import FastPathConfig
from engine.bench.sweep import cumulative_s
from cli.main import main as cli_main
from engine.config import ConfigError, GenerationConfig, ModelConfig
from engine.decoding import run_to_end
from engine.fast import STEPS
from engine.loader import load_model
from engine.units import format_bytes
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
    # The headline is computed from the rows: the medians it quotes are those of the rows it
    # names, and its ratios are theirs.
    h = d["headline"]
    fig = {r["label"]: r["figures"] for r in d["rows"]}
    assert h["backend"] == "sdpa"
    assert h["naive_total_s"] == fig["naive/sdpa"]["total_s"]["median"]
    assert h["kv_total_s"] == fig["kv/sdpa"]["total_s"]["median"]
    assert h["kv_speedup_total"] == pytest.approx(h["naive_total_s"] / h["kv_total_s"])
    assert h["kv_over_baseline_decode"] == pytest.approx(
        fig["kv/sdpa"]["decode_tokens_per_s"]["median"]
        / fig["transformers (cache)"]["decode_tokens_per_s"]["median"])
    engine_diffs = [r["max_abs_logit_diff"] for r in d["rows"] if r["kind"] == "engine"
                    and r["backend"] != "naive" and r["fast"] is None]
    assert h["efficient_attention_max_abs_logit_diff"] == max(engine_diffs)
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
    curves = d["attention_curves"]
    assert {c["phase"] for c in curves} == {"prefill", "decode"}
    assert {c["backend"] for c in curves} == {r["backend"] for r in d["rows"] if r["backend"]}
    assert all(c["seconds"] > 0 and c["peak_bytes"] >= 0 for c in curves)


def test_json_is_strict(tmp_path):
    """A figure that is not a number (TPOT of one token: nan) is written as null, so the file
    is strict JSON any tool can read; the writer refuses a nan that slipped through."""
    doc = _plain({"tpot_s": float("nan"), "rates": (float("inf"), 2.0), "n": 3})
    assert doc == {"tpot_s": None, "rates": [None, 2.0], "n": 3}
    write_json(doc, str(tmp_path / "b.json"))

    def refuse(constant):
        raise AssertionError(f"{constant} in the file")
    assert json.loads((tmp_path / "b.json").read_text(), parse_constant=refuse) == doc
    with pytest.raises(ValueError):
        write_json({"tpot_s": float("nan")}, str(tmp_path / "c.json"))


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
    terminal.render(doc, file=buf)
    assert "interrupted" in buf.getvalue() and "naive/sdpa" in buf.getvalue()


def test_interrupt_while_loading_still_reports(hf_folder, tmp_path):
    """Ctrl+C before anything was measured: a (nearly empty) report, valid JSON, no traceback."""
    def tick(what):
        raise KeyboardInterrupt
    doc = run_bench(BenchSettings(model=hf_folder, device="cpu"), tick=tick)
    assert doc["interrupted"] is True and doc["rows"] == []
    write_json(doc, str(tmp_path / "b.json"))
    terminal.render(doc, file=io.StringIO())
    markdown.markdown(doc)


def test_render_shows_tables_and_charts(quick_doc):
    buf = io.StringIO()
    terminal.render(quick_doc, file=buf)
    text = buf.getvalue()
    for part in ("standard experiment", "transformers (cache)", "× HF decode", "bandwidth",
                 "decode step latency vs position", "first version: KV cache took 50 tokens"):
        assert part in text, part
    assert "\x1b[" not in text                                  # no colour codes into a file


def test_markdown_tables(quick_doc):
    md = markdown.markdown(quick_doc)
    assert "| row | total | TTFT |" in md and "| kv/sdpa |" in md
    assert "| position | naive | kv | paged |" in md


def test_fast_table(hf_folder, tmp_path):
    """`bench --fast-table`: kv/sdpa, each variant named by its fast-path words, transformers;
    every variant compared with the naive reference; the lockstep rates and the Markdown table."""
    out = tmp_path / "fast.json"
    code = cli_main(["bench", "--model", hf_folder, "--device", "cpu", "--quick", "--fast-table",
                     "--fast", "fuse+cols", "--fast", "int8", "--lockstep", "--threads", "1",
                     "--no-progress", "--json", str(out)])
    assert code == 0
    d = json.loads(out.read_text())
    rows = {r["label"]: r for r in d["rows"]}
    assert set(rows) == {"kv/sdpa", "kv/sdpa +fuse+cols", "kv/sdpa +int8", "transformers (cache)"}
    assert rows["kv/sdpa"]["identical"] is True and rows["kv/sdpa +fuse+cols"]["identical"] is True
    assert all(r["setup_s"] > 0 and r["error"] is None for r in rows.values())
    assert set(d["lockstep"]) == {"kv/sdpa", "kv/sdpa +fuse+cols", "kv/sdpa +int8"}
    assert all(v > 0 for v in d["lockstep"].values())
    md = markdown.markdown(d)
    table = md[md.index("Fast paths on kv/sdpa"):]
    for label in rows:
        assert f"| {label} |" in table, label
    weights = {r["label"]: r["weight_bytes"] for r in d["bandwidth"]["rows"]}
    assert weights["kv/sdpa +int8"] < weights["kv/sdpa"]      # int8 reads fewer bytes a step
    assert format_bytes(weights["kv/sdpa +int8"]) in table


def test_startup_table_is_written_in_binary_units():
    rows = [dict(run="kv/sdpa +c", first_token_s=0.5, first_token_s_all=[0.5, 0.6],
                 peak_rss_bytes=300 * 2**20, above_runtime_bytes=3 * 2**19,
                 runtime_rss_bytes=2**30)]
    text = markdown.startup_markdown(rows)
    assert "| kv/sdpa +c | 500.0 ms | 500.0 ms, 600.0 ms | 300.0 MiB | 1.5 MiB |" in text
    assert "1.0 GiB" in text


# ----------------------------------------------------------------------------- settings, maths
@pytest.mark.parametrize("kw", [dict(strategies=("fast",)), dict(repeat=0), dict(warmup=-1),
                                dict(max_new_tokens=1), dict(dtype="int3"), dict(threads=0),
                                dict(sweep_max=2), dict(prompt=""), dict(lockstep=True)])
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
