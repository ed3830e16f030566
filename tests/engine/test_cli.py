"""`python main.py run`: streaming text, --json events, and one-line errors for user mistakes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import engine.loader
from cli.main import main
from engine.config import ModelConfig

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
    assert proc.returncode == 2                      # a usage error, as documented
    assert "model path not found" in proc.stderr
    assert "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------- one-line errors
def one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("spec", ["models/x.gguf", "models/typo", "typo/x.gguf",
                                  "modls/weights.safetensors"])
def test_a_relative_path_typo_is_not_a_hub_id(tmp_path, monkeypatch, capsys, spec):
    """"org/name" is a hub id only when nothing says it is a path: a first folder that exists
    here, or a file suffix, makes it a typo to report — not a download to attempt."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()

    def no_hub(*args, **kw):
        raise AssertionError(f"{spec} was treated as a hub id")
    monkeypatch.setattr(engine.loader, "hub_download", no_hub)
    assert main(["run", "hi", "--model", spec]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"model path not found: {spec}" in line and str(tmp_path) in line


def test_org_slash_name_is_still_a_hub_id():
    from engine.loader import looks_like_hub_id
    assert looks_like_hub_id("HuggingFaceTB/SmolLM2-360M-Instruct")
    assert looks_like_hub_id("Qwen/Qwen2.5-0.5B")
    assert not looks_like_hub_id("tests/engine")            # "tests" exists here


def _raise(exc):
    def boom(*args, **kw):
        raise exc
    return boom


COMMANDS = {
    "run": (["run", "hi"], "engine.session:Session", "run", KeyError("boom")),
    "bench": (["bench", "--quick"], "engine.bench", "cmd_bench", ZeroDivisionError("boom")),
    "ui": (["ui"], "cli.main", "cmd_ui", TypeError("boom")),
}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("debug", ["", "--debug", "MINILLM_DEBUG=1"])
def test_an_unexpected_error_in_any_command_is_one_line(tiny_folder, monkeypatch, capsys,
                                                        command, debug):
    import importlib
    argv, where, name, exc = COMMANDS[command]
    module, _, attr = where.partition(":")            # "package.module[:Class]"
    target = importlib.import_module(module)
    monkeypatch.setattr(getattr(target, attr) if attr else target, name, _raise(exc))
    monkeypatch.delenv("MINILLM_DEBUG", raising=False)
    if debug == "MINILLM_DEBUG=1":
        monkeypatch.setenv("MINILLM_DEBUG", "1")
    extra = ["--debug"] if debug == "--debug" else []
    assert main([*argv, "--model", str(tiny_folder), *extra]) == 1
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"error: unexpected {type(exc).__name__}: ")
    assert "boom" in last and ".py:" in last                 # what, and where
    if debug:
        assert "Traceback (most recent call last)" in err
    else:
        one_error_line(err)
        assert "--debug shows the traceback" in last


def test_exit_codes_are_documented_in_help(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for line in ("0    done", "1    the run failed", "2    a usage error", "130  interrupted"):
        assert line in out
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    assert "exit status: 0 done, 1 failed, 2 usage error, 130 interrupted" in \
        capsys.readouterr().out.replace("\n", " ").replace("  ", " ")


def test_a_closed_pipe_is_quiet(tiny_folder):
    """The reader of stdout is gone before the first token (`… | head -c 0`)."""
    proc = subprocess.Popen([sys.executable, "main.py", "run", "hello", "--model",
                             str(tiny_folder), "--max-new-tokens", "20", "--json"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 1
    assert err == "", err                                    # no traceback, no "Exception ignored"


def test_head_c_10_is_quiet(tiny_folder):
    cmd = (f"{sys.executable} main.py run hello --model {tiny_folder} --max-new-tokens 60 "
           f"--temperature 1 --seed 0 | head -c 10")
    proc = subprocess.run(["bash", "-c", cmd], cwd=ROOT, capture_output=True, timeout=120)
    assert len(proc.stdout) <= 10
    err = proc.stderr.decode()
    assert "Traceback" not in err and "Exception ignored" not in err and "Broken" not in err


def test_a_closed_stdout_is_no_traceback(tiny_folder):
    proc = subprocess.run(["bash", "-c", f"{sys.executable} main.py run hello --model "
                           f"{tiny_folder} --max-new-tokens 3 >&-"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "3 tokens" in proc.stderr


def constant_byte_model(folder: Path, byte: int) -> Path:
    """A tiny Llama that always predicts the token of one byte: every layer is zero, every
    embedding row is ones, and only that byte's row of the (untied) head is not zero."""
    from tests.conftest import byte_tokenizer
    from tests.engine.gguf_writer import byte_tokens
    from engine.loader.gguf_tokenizer import byte_spelling
    cfg = ModelConfig.from_name("tiny-llama")
    cfg.tie_embeddings = False
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg.to_hf())).eval()
    target = byte_tokens().index(byte_spelling()[byte])
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.model.embed_tokens.weight.fill_(1.0)
        model.model.norm.weight.fill_(1.0)
        model.lm_head.weight[target] = 1.0
    model.save_pretrained(folder)
    byte_tokenizer().backend.save(str(folder / "tokenizer.json"))
    return folder


def test_json_lines_add_up_to_the_finished_text_with_an_unfinished_character(tmp_path, capsys):
    """0xE4 starts a three-byte character (e.g. 中) that never finishes: no token line can show
    it, yet the finished line's text holds it. The token lines and the finished line's `tail`
    (the text no token line showed) must add up to it."""
    folder = constant_byte_model(tmp_path / "e4", 0xE4)
    assert main(["run", "hi", "--model", str(folder), "--json", "--max-new-tokens", "4",
                 "--device", "cpu"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    finished = lines[-1]
    assert finished["type"] == "finished"
    assert "\ufffd" in finished["text"]                     # the case this test is about
    pieces = "".join(line["text"] for line in lines if line["type"] == "token")
    assert pieces + finished["tail"] == finished["text"]


def test_bench_exits_non_zero_when_every_row_failed(tiny_folder, capsys):
    rc = main(["bench", "--model", str(tiny_folder), "--device", "cpu", "--quick",
               "--no-baseline", "--no-bandwidth", "--no-progress", "--prompt", "x" * 600])
    assert rc == 1
    err = capsys.readouterr().err
    assert "error: every bench row failed" in err and "exceeds the model's context" in err


def test_bench_block_size_zero_is_refused_before_loading(tiny_folder, monkeypatch, capsys):
    import engine.bench.experiment as experiment
    monkeypatch.setattr(experiment, "load_model", _raise(AssertionError("loaded anyway")))
    assert main(["bench", "--model", str(tiny_folder), "--block-size", "0"]) == 2
    assert "--block-size must be ≥ 1, got 0" in one_error_line(capsys.readouterr().err)


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


def test_a_bench_that_cannot_import_is_an_error_not_a_missing_command(monkeypatch, capsys):
    """The bench is listed whatever happens inside it; if it cannot be imported, running it is
    one error line and exit status 1 — never "invalid choice: 'bench'"."""
    import engine
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "bench" in capsys.readouterr().out
    monkeypatch.delattr(engine, "bench", raising=False)
    monkeypatch.setitem(sys.modules, "engine.bench", None)       # what a broken import gives
    assert main(["bench", "--quick"]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "Error: import of engine.bench" in line


def test_the_parser_imports_neither_torch_nor_textual():
    """Every command's flags are known before torch loads: the app's own process (the model
    runs in another), a replay and `watch` never import it."""
    code = ("import sys; from cli.parser import build_parser; p = build_parser(); "
            "[p.parse_args(a) for a in (['ui'], ['bench', '--quick'], ['replay', 'f'], "
            "['serve'], ['batch', '--prompts', 'f'])]; "
            "print(sorted(m for m in ('torch', 'textual') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, check=True).stdout
    assert out.strip() == "[]"
