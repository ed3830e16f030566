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
    rc = main(["run", "hello", "--model", str(tiny_folder), "--max-new-tokens", "7", "--json",
               "--strategy", "paged"])
    assert rc == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    tokens = [x for x in lines if x["type"] == "token"]
    summary = lines[-1]
    assert summary["type"] == "summary" and len(tokens) <= 7
    assert summary["tokens"] == [t["id"] for t in tokens]
    assert summary["text"] == "".join(t["text"] for t in tokens)
    for key in ("ttft_ms", "tpot_ms", "tokens_per_s"):
        assert key in summary
    assert all(t["latency_ms"] > 0 for t in tokens)


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
