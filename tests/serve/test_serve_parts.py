"""The server's parts without a server: the chat template (a file we do not trust) in its
sandbox, where templates are read from, the engine's logprobs, and `serve`'s flags (each
mistake one line, before the model loads)."""

from __future__ import annotations

import dataclasses
import json
import os
import socket

import pytest
import torch

from engine.config import ConfigError, GenerationConfig
from engine.decoding import run_to_end
from engine.loader.chat_template import chat_template
from engine.loader.errors import ModelLoadError
from serve.chat import ChatTemplate, TemplateFailed
from tests.conftest import byte_tokenizer, tiny_model

HI = [{"role": "user", "content": "Hi"}]


# ----------------------------------------------------------------------------- the sandbox
@pytest.mark.parametrize("source, message", [
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "chat template failed"),
    ("{% set x = messages.append(1) %}", "chat template failed"),     # immutable
    ("{{ 'x' * 100000000 }}", "too large"),
    ("{{ 10 ** 100000 }}", "exponent too large"),
    ("{{ raise_exception('only user and assistant roles') }}", "refused the messages: only"),
    ("{{ messages[5]['content'] }}", "chat template failed"),
])
def test_a_hostile_or_broken_template_is_refused(source, message):
    with pytest.raises(TemplateFailed, match=message):
        ChatTemplate(source).render(HI)


def test_private_attributes_are_invisible():
    assert ChatTemplate("{{ messages.__class__ }}{{ ''.__class__ }}").render(HI) == ""


def test_a_template_that_does_not_compile():
    with pytest.raises(ConfigError, match="does not compile"):
        ChatTemplate("{% for m in messages %}")


def test_templates_see_what_transformers_gives_them():
    t = ChatTemplate("{{ bos_token }}{% for m in messages %}{{ m.role }}:{{ m['content'] }}"
                     "{% endfor %}{% if add_generation_prompt %}A:{% endif %}{{ eos_token }}",
                     bos_token="<s>", eos_token="</s>")
    assert t.render(HI) == "<s>user:HiA:</s>"
    assert t.render(HI, add_generation_prompt=False) == "<s>user:Hi</s>"


@pytest.mark.slow
def test_the_embedded_models_template():
    from engine.loader import embedded_gguf
    try:
        path = embedded_gguf()
    except Exception as exc:             # noqa: BLE001
        pytest.skip(f"embedded model unavailable: {exc}")
    text = ChatTemplate(chat_template(path)).render(HI)
    assert text.startswith("<|im_start|>system\n") and \
        text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


# ----------------------------------------------------------------------------- where it is read
def test_templates_in_model_folders(tmp_path):
    assert chat_template(tmp_path) is None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "A"}))
    assert chat_template(tmp_path) == "A"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [
        {"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}))
    assert chat_template(tmp_path) == "D"
    (tmp_path / "chat_template.jinja").write_text("J")
    assert chat_template(tmp_path) == "J"                 # newer transformers' file wins
    (tmp_path / "chat_template.jinja").write_text("x" * (2 << 20))
    with pytest.raises(ModelLoadError, match="more than"):
        chat_template(tmp_path)
    os.remove(tmp_path / "chat_template.jinja")
    os.mkfifo(tmp_path / "chat_template.jinja")           # would block a plain open()
    with pytest.raises(ModelLoadError):
        chat_template(tmp_path)
    os.remove(tmp_path / "chat_template.jinja")
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        chat_template(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": 5}))
    with pytest.raises(ModelLoadError, match="not text"):
        chat_template(tmp_path)


def test_templates_in_gguf_files(tmp_path):
    transformers = pytest.importorskip("transformers")
    from engine.config import ModelConfig
    from tests.engine.gguf_writer import byte_tokens, gguf_parts, write_gguf
    cfg = ModelConfig.from_name("tiny-llama")
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg.to_hf()))
    arch, meta, tensors = gguf_parts(hf, byte_tokens())
    write_gguf(tmp_path / "plain.gguf", arch, meta, tensors)
    assert chat_template(tmp_path / "plain.gguf") is None
    write_gguf(tmp_path / "chat.gguf", arch, {**meta, "tokenizer.chat_template": "{{ 1 }}"},
               tensors)
    assert chat_template(tmp_path / "chat.gguf") == "{{ 1 }}"


# ----------------------------------------------------------------------------- logprobs
def test_logprobs_are_log_softmax_of_the_logits_in_generate_and_batch():
    from engine.batch import BatchEngine
    from engine.scheduler import SchedulerConfig
    model, tok = tiny_model(dtype=torch.float64), byte_tokenizer()
    cfg = GenerationConfig(max_new_tokens=6, logprobs=4, keep_logits=True, attention_rows=False)
    events, fin = run_to_end(model, tok, "hello", cfg)
    lone = [e for e in events if type(e).__name__ == "Token"]
    for t in lone:
        logp = torch.log_softmax(t.logits.double(), -1)
        assert t.logprob == pytest.approx(float(logp[t.id]), abs=1e-6)
        best = torch.topk(logp, 4)
        assert [i for i, _ in t.top_logprobs] == best.indices.tolist()
        assert t.top_logprobs[0][0] == t.id                       # greedy: the best one
    engine = BatchEngine(model, tok, SchedulerConfig(num_blocks=16))
    engine.add("hello", cfg)
    engine.add("other prompt", dataclasses.replace(cfg, logprobs=None))
    batched = []
    while engine.has_work():
        batched += engine.step()
    mine = [e for e in batched if type(e).__name__ == "RequestToken" and e.request == 0]
    assert [e.id for e in mine] == [t.id for t in lone]
    assert [e.logprob for e in mine] == pytest.approx([t.logprob for t in lone])
    assert all(e.logprob is None and e.top_logprobs == () for e in batched
               if type(e).__name__ == "RequestToken" and e.request == 1)
    with pytest.raises(ConfigError, match="logprobs must be an integer from 0 to 20"):
        GenerationConfig(logprobs=21)


# ----------------------------------------------------------------------------- the command
@pytest.mark.parametrize("flags, message", [
    (["--strategy", "kv"], "serve batches requests on the paged KV pool"),
    (["--kernel", "c"], "fast-path options (c)"),
    (["--port", "70000"], "--port must be from 0 to 65535"),
    (["--max-batch", "0"], "max batch must be a positive integer"),
    (["--temperature", "-1"], "temperature must be ≥ 0"),
    (["--chat-template", "/nonexistent.jinja"], "chat template not found"),
    (["--backend", "warp"], "unknown attention backend 'warp'"),
    (["--model", "/nonexistent"], "model path not found"),
])
def test_serve_mistakes_are_one_line_before_loading(capsys, flags, message, monkeypatch):
    from engine import loader
    from cli.main import main
    if "--model" not in flags:               # prove nothing loads: loading would fail loudly
        monkeypatch.setattr(loader, "load_model", lambda *a, **k: 1 / 0)
    assert main(["serve", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_a_port_in_use_is_one_line(tiny_folder, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        from cli.main import main
        assert main(["serve", "--model", str(tiny_folder), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err and "--port" in err


def test_only_loopback_addresses_are_quiet():
    from serve.cli import loopback
    assert all(loopback(h) for h in ("127.0.0.1", "127.0.0.2", "localhost", "::1"))
    assert not any(loopback(h) for h in ("0.0.0.0", "::", "192.168.1.10", "example.com"))
