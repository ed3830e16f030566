"""`python main.py run`: streaming text, --json events, and one-line errors for user mistakes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from engine.cli import main

ROOT = Path(__file__).resolve().parents[2]
transformers = pytest.importorskip("transformers")


def test_run_json_lines(tiny_folder, capsys):
    """--json prints the recording format: a header, then one envelope per line, each readable
    by engine.events (the one reader); the pieces of text add up to the finished text."""
    from engine.events import Envelope, Finished, Started, Token
    rc = main(["run", "hello", "--model", str(tiny_folder), "--max-new-tokens", "7", "--json",
               "--strategy", "paged"])
    assert rc == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines[0]["type"] == "header" and lines[0]["settings"]["prompt"] == "hello"
    events = [Envelope.from_json(d).event for d in lines[1:]]
    assert lines[1]["type"] == "ready" and isinstance(events[1], Started)
    assert events[1].strategy == "paged"
    tokens = [e for e in events if isinstance(e, Token)]
    fin = events[-1]
    assert isinstance(fin, Finished) and 0 < len(tokens) <= 7
    assert list(fin.tokens) == [t.id for t in tokens]
    assert "".join(t.text for t in tokens) + fin.tail == fin.text
    assert fin.metrics.ttft_s > 0 and fin.metrics.tpot_s > 0
    assert all(t.latency_s > 0 for t in tokens)
    assert {d["run"] for d in lines[2:]} == {1} and all("t" in d for d in lines[1:])


def test_run_streams_plain_text(tiny_folder, capsys):
    assert main(["run", "abc", "--model", str(tiny_folder), "--max-new-tokens", "5",
                 "--temperature", "0.7", "--seed", "3"]) == 0
    out = capsys.readouterr()
    assert "tokens" in out.err and "TTFT" in out.err


@pytest.mark.parametrize("args, message", [
    (["run", "", "--max-new-tokens", "3"], "prompt is empty"),
    (["run", "x", "--strategy", "turbo"], "unknown strategy 'turbo'"),
    (["run", "x", "--backend", "magic"], "unknown attention backend 'magic'"),
    (["run", "x", "--temperature", "-1"], "temperature must be"),
    (["run", "x", "--top-p", "1.5"], "top-p must be in (0, 1]"),
    (["run", "x", "--top-k", "0"], "top-k must be a positive integer"),
    (["run", "x", "--max-new-tokens", "-4"], "max new tokens must be"),
    (["run", "x", "--block-size", "0"], "block size must be a positive integer"),
    (["run", "x", "--device", "tpu"], "unknown device"),
    (["run", "x", "--dtype", "int3"], "unknown dtype"),
])
def test_user_mistakes_are_one_line(tiny_folder, capsys, args, message):
    rc = main(args + ["--model", str(tiny_folder)])
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err
    assert "Traceback" not in err and err.strip().count("\n") == 0


def test_missing_model_file_from_a_real_process(tmp_path):
    proc = subprocess.run([sys.executable, "main.py", "run", "hi", "--model",
                           str(tmp_path / "nope.gguf")], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0
    assert "model path not found" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_run_record_writes_a_replayable_recording(tiny_folder, tmp_path, capsys):
    from engine.events import AttentionRow, Finished
    from engine.recording import read_recording
    path = tmp_path / "run.jsonl.gz"
    assert main(["run", "hello", "--model", str(tiny_folder), "--max-new-tokens", "5",
                 "--record", str(path)]) == 0
    rec = read_recording(str(path))
    assert rec.notice is None and rec.header["command"] == "run"
    assert rec.header["settings"]["prompt"] == "hello" and rec.header["packages"]["torch"]
    rows = [e.event for e in rec.envelopes if isinstance(e.event, AttentionRow)]
    assert len(rows) == 5 and rows[0].shape[:2] == (2, 4)        # every layer, every head
    assert isinstance(rec.envelopes[-1].event, Finished)
    assert f"python main.py replay {path}" in capsys.readouterr().err


def test_a_run_that_never_starts_leaves_no_recording(tiny_folder, tmp_path, capsys):
    path = tmp_path / "empty.jsonl"
    assert main(["run", "   ", "--model", str(tiny_folder), "--record", str(path)]) == 2
    assert "whitespace" in capsys.readouterr().err and not path.exists()


@pytest.mark.parametrize("content, message", [
    (None, "recording not found"),
    ("not a recording\n", "is not a minillm recording"),
    ('{"type": "header", "v": 7, "format": "minillm-recording"}\n', "schema version 7"),
])
def test_replay_of_a_bad_file_is_one_line(tmp_path, capsys, content, message):
    path = tmp_path / "bad.jsonl"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    assert main(["replay", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.strip().count("\n") == 0
