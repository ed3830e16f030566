"""`python main.py batch --prompts FILE`: JSON events, the readable summary, hostile files and
flags as one-line errors, Poisson arrivals, and Ctrl+C keeping what finished."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cli import batch as batch_cli
from cli.main import main
from engine import events as be, workload
from engine.config import GenerationConfig
from engine.decoding import run_to_end

ROOT = Path(__file__).resolve().parents[2]
pytest.importorskip("transformers")
PROMPTS = "Deep learning is\nshared start, then one\n\n  \nshared start, then two\n"


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text(PROMPTS)
    return path


def events_of(stdout: str) -> list:
    """The events of `batch --json`: a recording header first, then envelopes of batch 1."""
    lines = [json.loads(line) for line in stdout.splitlines() if line.strip()]
    assert lines[0]["type"] == "header" and lines[0]["command"] == "batch"
    envelopes = [be.Envelope.from_json(d) for d in lines[1:]]
    assert {e.run for e in envelopes} == {1}
    return [e.event for e in envelopes]


@pytest.mark.parametrize("weights", [[], ["--plain-weights"]])
def test_json_events_and_each_request_as_alone(tiny_folder, prompts_file, capsys, weights):
    """With the batch engine's packed projections (the default) and with the model's own."""
    rc = main(["batch", "--prompts", str(prompts_file), "--model", str(tiny_folder),
               "--max-new-tokens", "6", "--block-size", "4", "--json", "--threads", "1",
               *weights])
    assert rc == 0
    events = events_of(capsys.readouterr().out)
    assert isinstance(events[0], be.BatchStarted) and isinstance(events[-1], be.BatchSummary)
    summary = events[-1]
    assert summary.requests == summary.finished == 3 and summary.prefix_hit_rate > 0
    arrived = [e for e in events if isinstance(e, be.RequestArrived)]
    assert [e.prompt for e in arrived] == ["Deep learning is", "shared start, then one",
                                           "shared start, then two"]
    from engine.loader import load_model
    lm = load_model(str(tiny_folder), "cpu", "float32")
    done = {e.request: e for e in events if isinstance(e, be.RequestFinished)}
    for e in arrived:
        _, ref = run_to_end(lm.model, lm.tokenizer, e.prompt,
                            GenerationConfig(max_new_tokens=6, attention_rows=False))
        assert done[e.request].tokens == ref.tokens


def test_json_output_is_a_recording_replay_reads(tiny_folder, tmp_path, capsys):
    """`batch --json > FILE` then `replay FILE`: the header, then every envelope, the summary
    line last; the built-in prompts when no --prompts is given."""
    from engine.recording import read_recording
    assert main(["batch", "--model", str(tiny_folder), "--max-new-tokens", "2",
                 "--block-size", "4", "--json", "--threads", "1"]) == 0
    path = tmp_path / "batch.jsonl"
    path.write_text(capsys.readouterr().out)
    rec = read_recording(str(path))
    assert rec.notice is None and rec.header["command"] == "batch"
    assert rec.header["settings"]["batch"]["max_new_tokens"] == 2
    assert isinstance(rec.envelopes[-1].event, be.BatchSummary)
    arrived = [e.event for e in rec.envelopes if isinstance(e.event, be.RequestArrived)]
    assert [a.prompt for a in arrived] == list(batch_cli.BUILTIN_PROMPTS)


def test_readable_output_and_summary(tiny_folder, prompts_file, capsys):
    rc = main(["batch", "--prompts", str(prompts_file), "--model", str(tiny_folder),
               "--max-new-tokens", "4", "--temperature", "0.8", "--seed", "1",
               "--threads", "1"])
    out, err = capsys.readouterr()
    assert rc == 0
    assert out.count("=== request") == 3 and "(line 5)" in out
    for label in ("throughput", "TTFT", "TPOT", "KV blocks", "prefix cache", "contiguous"):
        assert label in err
    assert "Traceback" not in err


def test_seeds_differ_per_request_and_repeat(tiny_folder, tmp_path, capsys):
    path = tmp_path / "same.txt"
    path.write_text("same prompt\nsame prompt\n")
    args = ["batch", "--prompts", str(path), "--model", str(tiny_folder), "--json",
            "--max-new-tokens", "8", "--temperature", "1.0", "--seed", "5", "--threads", "1"]
    runs = []
    for _ in range(2):
        assert main(args) == 0
        done = [e for e in events_of(capsys.readouterr().out)
                if isinstance(e, be.RequestFinished)]
        runs.append(sorted((e.request, e.tokens) for e in done))
    assert runs[0] == runs[1]                          # seed + i: reproducible …
    assert runs[0][0][1] != runs[0][1][1]              # … and not the same for every request


def test_poisson_arrivals_are_seeded_and_spread():
    times = batch_cli.arrival_times(2000, 50.0, seed=3)
    assert times == batch_cli.arrival_times(2000, 50.0, seed=3)
    assert times == sorted(times) and times[0] == 0.0
    mean_gap = times[-1] / (len(times) - 1)
    assert 0.018 < mean_gap < 0.022                    # 1/50 s, within ±10 %
    assert batch_cli.arrival_times(3, None, 0) == [0.0, 0.0, 0.0]


def test_arrival_rate_run(tiny_folder, prompts_file, capsys):
    assert main(["batch", "--prompts", str(prompts_file), "--model", str(tiny_folder),
                 "--max-new-tokens", "3", "--arrival-rate", "40", "--json",
                 "--threads", "1"]) == 0
    arrived = [e for e in events_of(capsys.readouterr().out) if isinstance(e, be.RequestArrived)]
    gaps = [b.time_s - a.time_s for a, b in zip(arrived, arrived[1:])]
    expected = batch_cli.arrival_times(3, 40.0, 0)
    assert gaps == pytest.approx([b - a for a, b in zip(expected, expected[1:])], abs=1e-6)


@pytest.mark.parametrize("content, args, message", [
    (b"", [], "no prompts in"),
    (b"\n   \n\t\n", [], "no prompts in"),
    (b"fine\n\xff\xfe broken\n", [], "is not UTF-8 text (line 2"),
    (b"x" * 3000 + b"\n", [], "line 1: prompt of 3000 tokens"),
    (b"hello\n", ["--arrival-rate", "0"], "--arrival-rate must be a positive number"),
    (b"hello\n", ["--arrival-rate", "nan"], "--arrival-rate must be a positive number"),
    (b"hello\n", ["--max-batch", "0"], "max batch must be a positive integer"),
    (b"hello\n", ["--max-batch", "8", "--max-step-tokens", "4"], "must be at least the batch"),
    (b"hello\n", ["--num-blocks", "1", "--block-size", "4"], "raise --num-blocks"),
    (b"hello\n", ["--temperature", "-1"], "temperature must be"),
    (b"hello\n", ["--backend", "warp"], "unknown attention backend"),
])
def test_hostile_files_and_flags_are_one_line_errors(tiny_folder, tmp_path, capsys, content,
                                                     args, message):
    path = tmp_path / "prompts.txt"
    path.write_bytes(content)
    rc = main(["batch", "--prompts", str(path), "--model", str(tiny_folder), *args])
    err = capsys.readouterr().err
    assert rc == 2 and message in err
    assert "Traceback" not in err and err.strip().count("\n") == 0


def test_missing_directory_and_oversized_files(tmp_path, capsys, monkeypatch):
    for path, message in ((tmp_path / "nope.txt", "prompts file not found"),
                          (tmp_path, "is a directory")):
        assert main(["batch", "--prompts", str(path)]) == 2
        assert message in capsys.readouterr().err
    big = tmp_path / "big.txt"
    big.write_text("prompt\n" * 100)
    monkeypatch.setattr(workload, "MAX_FILE_BYTES", 64)
    assert main(["batch", "--prompts", str(big)]) == 2
    assert "split it into smaller files" in capsys.readouterr().err


def test_prompts_from_standard_input(tiny_folder, monkeypatch, capsys):
    import io
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"\xef\xbb\xbfhi there\n")))
    assert main(["batch", "--prompts", "-", "--model", str(tiny_folder), "--json",
                 "--max-new-tokens", "2", "--threads", "1"]) == 0
    arrived = [e for e in events_of(capsys.readouterr().out) if isinstance(e, be.RequestArrived)]
    assert [e.prompt for e in arrived] == ["hi there"]     # the byte-order mark is dropped


def test_ctrl_c_reports_what_finished(tiny_folder, tmp_path):
    """A real process: SIGINT once the first requests have finished; the rest are cancelled,
    the summary says interrupted, exit status 130, no traceback."""
    path = tmp_path / "many.txt"
    path.write_text("short one\n" + "".join(f"long request {i}\n" for i in range(6)))
    proc = subprocess.Popen(
        [sys.executable, "main.py", "batch", "--prompts", str(path), "--model", str(tiny_folder),
         "--json", "--max-new-tokens", "400", "--max-batch", "2", "--threads", "1"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    while True:                                   # wait for the first 20 tokens
        line = proc.stdout.readline()
        assert line, proc.stderr.read()
        lines.append(line)
        if sum('"request_token"' in x for x in lines) >= 20:
            break
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert "Traceback" not in err
    events = events_of("".join(lines) + out)
    summary = events[-1]
    assert isinstance(summary, be.BatchSummary) and summary.interrupted
    cancelled = [e for e in events if isinstance(e, be.RequestFinished)
                 and e.reason == "cancelled"]
    assert cancelled and summary.cancelled == len(cancelled) == 7 - summary.finished
    assert any(e.tokens for e in cancelled)       # what a cancelled request made is kept


def test_batch_summary_table_when_interrupted(tiny_folder, tmp_path):
    path = tmp_path / "many.txt"
    path.write_text("".join(f"request {i}\n" for i in range(4)))
    proc = subprocess.Popen(
        [sys.executable, "main.py", "batch", "--prompts", str(path), "--model", str(tiny_folder),
         "--max-new-tokens", "400", "--max-batch", "2", "--threads", "1"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = proc.stdout.readline()                # the first request finished (or was cut)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err
    assert "interrupted" in err and "cancelled" in err
    assert first.startswith("=== request")
