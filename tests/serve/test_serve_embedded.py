"""`serve` on the embedded SmolLM2-135M-Instruct (slow): eight concurrent streams get exactly the
tokens each prompt gets from `run` alone — in float32, the dtype people use — and chat goes
through the model's own template."""

from __future__ import annotations

import threading

import pytest

from tests.serve.conftest import start_server

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.slow

PROMPTS = ["Deep learning is", "The capital of France is", "Deep learning is a field of",
           "Once upon a time", "def fibonacci(n):", "The three primary colours are",
           "Water boils at", "Deep learning is often"]


@pytest.fixture(scope="module")
def server(embedded):                       # the fixture skips when the model is missing
    srv = start_server(["--threads", "2"])
    yield srv
    assert srv.stop() == 0


def test_eight_concurrent_streams_equal_lone_runs(server, embedded):
    from engine.config import GenerationConfig
    from engine.decoding import run_to_end
    cfg = GenerationConfig(max_new_tokens=16, attention_rows=False)
    expected = [list(run_to_end(embedded.model, embedded.tokenizer, p, cfg)[1].tokens)
                for p in PROMPTS]
    results: dict = {}
    barrier = threading.Barrier(len(PROMPTS))

    def one(i, prompt):
        c = openai.OpenAI(base_url=server.base, api_key="-", max_retries=0)
        barrier.wait()
        ids = []
        for chunk in c.completions.create(model="SmolLM2-135M-Instruct", prompt=prompt,
                                          max_tokens=16, temperature=0, stream=True,
                                          logprobs=0):
            if chunk.choices and chunk.choices[0].logprobs:
                ids += chunk.choices[0].logprobs.model_extra["token_ids"]
        results[i] = ids

    threads = [threading.Thread(target=one, args=(i, p)) for i, p in enumerate(PROMPTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert [results.get(i) for i in range(len(PROMPTS))] == expected


def test_chat_through_the_models_template(server):
    c = openai.OpenAI(base_url=server.base, api_key="-", max_retries=0)
    r = c.chat.completions.create(model="SmolLM2-135M-Instruct", max_tokens=30, temperature=0,
                                  messages=[{"role": "user", "content": "What is 2+2?"}])
    assert "4" in r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"          # <|im_end|>: the turn ended
