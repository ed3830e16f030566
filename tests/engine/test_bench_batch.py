"""`bench --batch SIZES`: the document, the tables, Ctrl+C, and the GPU script's rows (on the CPU,
tiny sizes)."""

from __future__ import annotations

import io
import json

import pytest

from cli.main import main
from engine.bench import batching, terminal
from engine.config import ConfigError
from tests.conftest import tiny_model

pytest.importorskip("transformers")


# Tiny models gain nothing from threads; on a shared 2-core machine they only wait.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def batch_doc(tiny_folder, tmp_path_factory):
    """`bench --batch 1,2,3 --quick --json FILE --markdown FILE`, through the command line."""
    out = tmp_path_factory.mktemp("bench-batch")
    code = main(["bench", "--batch", "1,2,3", "--model", str(tiny_folder), "--device", "cpu",
                 "--quick", "--threads", "1", "--no-progress", "--block-size", "8",
                 "--fast", "fuse",
                 "--json", str(out / "b.json"), "--markdown", str(out / "b.md")])
    assert code == 0
    return json.loads((out / "b.json").read_text()), (out / "b.md").read_text()


def test_batch_rows(batch_doc):
    doc, _ = batch_doc
    assert doc["complete"] and not doc["interrupted"]
    rows = doc["batch"]["rows"]
    assert [r["batch"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert r["identical"] == r["requests"] == r["batch"]
        assert r["decode_tokens_per_s"] > 0 and r["tpot_p50_s"] > 0
        assert len(r["samples"]) == 1                     # --quick: one timed pass
    assert rows[0]["over_batch_1"] == 1.0
    alone = doc["batch"]["alone_decode_tokens_per_s"]        # generate() itself, every pass
    assert alone > 0 and rows[1]["over_alone"] == rows[1]["decode_tokens_per_s"] / alone
    assert doc["batch"]["alone_fast_decode_tokens_per_s"]["fuse"] > 0     # --fast fuse
    assert doc["batch"]["settings"]["max_new_tokens"] == 16


def test_shared_prefix_rows(batch_doc):
    doc, _ = batch_doc
    p = doc["batch"]["prefix"]
    on, off = p["on"], p["off"]
    assert p["requests"] == 8 and p["system_tokens"] == 200
    assert all(n > 200 for n in p["prompt_tokens"])
    assert on["identical"] == off["identical"] == 8
    assert off["prefix_hit_rate"] == 0 and on["prefix_hit_rate"] > 0.7
    # The 25 system blocks of 8 tokens are held once instead of 8 times (questions that start
    # alike may share a block more).
    assert off["peak_blocks_used"] - on["peak_blocks_used"] >= 7 * 25
    assert p["blocks_ratio"] == on["peak_blocks_used"] / off["peak_blocks_used"] < 0.4
    # Every request runs to its last token here, so a contiguous reservation is exactly full;
    # the paged pool without sharing holds the same tokens plus each last block's unused tail.
    assert 0 <= off["peak_blocks_used"] - off["peak_contiguous_blocks"] < 8


def test_tables_on_the_terminal_and_in_markdown(batch_doc):
    doc, md = batch_doc
    buf = io.StringIO()
    terminal.render_batch(doc, file=buf)
    text = buf.getvalue()
    for part in ("ontinuous batching", "× batch 1", "× alone", "alone through generate()",
                 "fast path +fuse",
                 "TPOT p50", "identical",
                 "8 requests sharing a 200-token system prompt", "hit rate"):
        assert part in text and part in md, part
    assert "| 3 |" in md and "| on |" in md and "\x1b[" not in text


def test_interrupt_keeps_the_rows_measured(tiny_folder):
    from engine.loader import load_model
    lm = load_model(str(tiny_folder), "cpu", "float32")

    def tick(what):
        if what.endswith("batch 2") and "pass" in what:
            raise KeyboardInterrupt
    s = batching.BatchBenchSettings(sizes=(1, 2), max_new_tokens=4, repeat=1, warmup=0)
    doc = batching.bench_document(s, None, "cpu", "float32", 1, tick, loaded=lm)
    assert doc["interrupted"] and not doc["complete"]
    rows = {r["batch"]: r for r in doc["batch"]["rows"]}
    assert rows[1]["samples"] and not rows[2]["samples"]
    json.dumps(doc, allow_nan=False)
    terminal.render_batch(doc, file=io.StringIO())


@pytest.mark.parametrize("text", ["0,2", "1,x", "", "-4"])
def test_bad_sizes_are_one_line_errors(text, tiny_folder, capsys):
    with pytest.raises(ConfigError):
        batching.parse_sizes(text)
    assert main(["bench", "--batch", text or ",", "--model", str(tiny_folder),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--batch wants batch sizes" in err and "Traceback" not in err


def test_gpu_rows_run_on_the_cpu():
    """scripts/gpu_check.py's batching table, tiny: both paths, two batch sizes."""
    pytest.importorskip("triton")
    table = batching.throughput_table(tiny_model("llama"), sizes=(1, 2),
                                      backends=("sdpa", "triton"), new_tokens=3,
                                      prompt_tokens=8)
    lines = table.splitlines()
    assert lines[0] == "| backend | B=1 | B=2 |"
    assert lines[2].startswith("| sdpa |") and lines[3].startswith("| triton |")
    assert "tok/s" in lines[3] and "OOM" not in table
