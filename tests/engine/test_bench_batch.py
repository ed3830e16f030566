"""`bench --batch SIZES`: the document, the tables, Ctrl+C, and the GPU script's rows (on the CPU,
tiny sizes)."""

from __future__ import annotations

import io
import json
import time

import pytest

from cli.main import main
from engine.bench import batching, terminal
from engine.bench.cells import batch_lines
from engine.config import ConfigError
from engine.packed_linear import onednn_works
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


def test_batch_1_ratio_is_the_median_of_each_pass_own_ratio():
    """Passes are interleaved, so a pass's batch 8 and batch 1 ran under the same load: the
    headline is the median of the per-pass ratios, with their range — not one lucky pass."""
    rows = {1: batching.BatchRow(batch=1, decode_tokens_per_s=[10.0, 20.0, 10.0]),
            8: batching.BatchRow(batch=8, decode_tokens_per_s=[60.0, 100.0, 70.0])}
    doc = {"batch": {"_sizes": {"rows": rows, "alone": {"": [11.0, 12.0, 13.0]}}}}
    batching.finish(doc)
    eight = doc["batch"]["rows"][1]
    assert eight["over_batch_1_per_pass"] == [6.0, 5.0, 7.0]
    assert (eight["over_batch_1"], eight["over_batch_1_min"], eight["over_batch_1_max"]) == \
        (6.0, 5.0, 7.0)
    assert eight["over_alone"] == 70.0 / 12.0                     # medians of the passes
    head, cells, _, _ = batch_lines(doc)
    assert cells[1][head.index("× batch 1")] == "6.00× (5.00–7.00)"


def test_projections_are_the_same_at_every_batch_size(batch_doc, tiny_folder, tmp_path):
    """The batch engine's packed projections by default, the model's own with --plain-weights;
    the document says which (one setting for every row: like is compared with like)."""
    doc, md = batch_doc
    packed = "fused, packed for oneDNN" if onednn_works() else "the model's own"
    assert doc["batch"]["settings"]["projections"].startswith(packed)
    assert f"projections: {packed}" in md
    code = main(["bench", "--batch", "1,2", "--model", str(tiny_folder), "--device", "cpu",
                 "--quick", "--threads", "1", "--no-progress", "--plain-weights",
                 "--json", str(tmp_path / "plain.json")])
    plain = json.loads((tmp_path / "plain.json").read_text())
    assert code == 0 and plain["batch"]["settings"]["projections"].startswith("the model's own")
    assert [r["identical"] for r in plain["batch"]["rows"]] == [1, 2]


def test_own_clock_runs_only_while_its_engine_steps():
    """In lockstep an engine's clock stands still while the other batch sizes step."""
    clock = batching.OwnClock()
    seen = []

    class Engine:
        def step(self):
            start = clock()
            time.sleep(0.01)                      # the step's own work
            seen.append(clock() - start)
            return ["event"]
    assert clock() == 0.0 and clock.step(Engine()) == ["event"]
    after = clock()
    time.sleep(0.01)                              # another engine's step
    assert clock() == after >= seen[0] >= 0.01


def test_lockstep_by_default_and_each_size_on_its_own_with_no_lockstep(batch_doc, tiny_folder,
                                                                        tmp_path):
    """By default the sizes step in turn, each engine on its own clock; --no-lockstep runs
    each size on its own. Either way every request's tokens are its lone run's, and the
    document and the caption say which."""
    doc, md = batch_doc
    assert doc["batch"]["settings"]["lockstep"] and "in lockstep" in md
    code = main(["bench", "--batch", "1,2,3", "--model", str(tiny_folder), "--device", "cpu",
                 "--quick", "--threads", "1", "--no-progress", "--no-lockstep",
                 "--json", str(tmp_path / "seq.json"), "--markdown", str(tmp_path / "seq.md")])
    seq = json.loads((tmp_path / "seq.json").read_text())
    assert code == 0 and seq["complete"] and not seq["batch"]["settings"]["lockstep"]
    rows = seq["batch"]["rows"]
    assert [(r["batch"], r["identical"]) for r in rows] == [(1, 1), (2, 2), (3, 3)]
    assert all(r["decode_tokens_per_s"] > 0 and r["tpot_p50_s"] > 0 for r in rows)
    text = (tmp_path / "seq.md").read_text()
    assert "interleaved" in text and "in lockstep" not in text


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
    s = batching.BatchBenchSettings(sizes=(1, 2), max_new_tokens=4, repeat=1, warmup=0,
                                    lockstep=False)
    doc = batching.bench_document(s, None, "cpu", "float32", 1, tick, loaded=lm)
    assert doc["interrupted"] and not doc["complete"]
    rows = {r["batch"]: r for r in doc["batch"]["rows"]}
    assert rows[1]["samples"] and not rows[2]["samples"]
    json.dumps(doc, allow_nan=False)
    terminal.render_batch(doc, file=io.StringIO())


def test_interrupt_in_lockstep_keeps_the_passes_measured(tiny_folder):
    """In lockstep (the default) a pass runs every size at once: Ctrl+C in the second pass
    keeps the first pass's rows."""
    from engine.loader import load_model
    lm = load_model(str(tiny_folder), "cpu", "float32")

    def tick(what):
        if "pass 2" in what:
            raise KeyboardInterrupt
    s = batching.BatchBenchSettings(sizes=(1, 2), max_new_tokens=4, repeat=2, warmup=0)
    doc = batching.bench_document(s, None, "cpu", "float32", 1, tick, loaded=lm)
    assert doc["interrupted"] and doc["batch"]["settings"]["lockstep"]
    assert [len(r["samples"]) for r in doc["batch"]["rows"]] == [1, 1]


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
