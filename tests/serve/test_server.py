"""The real `serve` process, talked to by the `openai` package and by raw HTTP.

Greedy answers must be `run`'s tokens for the same prompt (the server batches; docs/batching.md
promises each request its lone-run tokens — float64 here, see conftest). Every refusal is a 4xx
with OpenAI's JSON error, carrying the message `run` prints for the same mistake.
"""

from __future__ import annotations

import http.client
import json
import math
import threading
from urllib.parse import urlsplit

import pytest

from tests.serve.conftest import API_KEY, render, request, run_tokens, wait_for
from tests.serve.prom import value

openai = pytest.importorskip("openai")

AUTH = {"Authorization": f"Bearer {API_KEY}"}
PROMPTS = ["The cat sat on", "Deep learning is", "The cat sat on the mat and", "Once upon",
           "1, 2, 3,", "Hello, world!", "The cat sat on the", "zzz"]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base, api_key=API_KEY, max_retries=0)


@pytest.fixture(scope="module")
def model_id(client):
    return client.models.list().data[0].id


def post(server, path: str, body=None, raw: bytes | None = None, headers=AUTH):
    status, text = request(server.base + path, body, headers=headers, raw=raw)
    return status, json.loads(text)


# ----------------------------------------------------------------------------- answers
def test_health_and_models(server, client, chat_folder):
    assert server.get("/health") == (200, '{"status": "ok"}')
    models = client.models.list().data
    assert [m.id for m in models] == [chat_folder.name]


def test_completion_equals_run(server, client, model_id, chat_folder):
    for prompt in PROMPTS[:3]:
        tokens, text = run_tokens(chat_folder, prompt, 20)
        r = client.completions.create(model=model_id, prompt=prompt, max_tokens=20,
                                      temperature=0, logprobs=0)
        assert r.choices[0].text == text
        assert r.choices[0].logprobs.model_extra["token_ids"] == tokens
        assert r.usage.completion_tokens == len(tokens)
        assert r.choices[0].finish_reason == ("length" if len(tokens) == 20 else "stop")
        t = r.model_extra["timings"]
        assert t["predicted_n"] == len(tokens) and len(t["token_ms"]) == len(tokens)
        assert t["prompt_n"] + t["cache_n"] == r.usage.prompt_tokens


def test_streamed_completion_equals_run(client, model_id, chat_folder):
    tokens, text = run_tokens(chat_folder, PROMPTS[1], 20)
    chunks = list(client.completions.create(model=model_id, prompt=PROMPTS[1], max_tokens=20,
                                            temperature=0, stream=True, logprobs=0,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    ids = [i for c in chunks if c.choices and c.choices[0].logprobs
           for i in c.choices[0].logprobs.model_extra["token_ids"]]
    assert ids == tokens
    assert chunks[-1].usage.completion_tokens == len(tokens) and not chunks[-1].choices
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("length", "stop")


def test_chat_equals_run_of_the_rendered_prompt(client, model_id, chat_folder):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hello there"}]
    tokens, text = run_tokens(chat_folder, render(messages), 16)
    r = client.chat.completions.create(model=model_id, messages=messages, max_tokens=16,
                                       temperature=0, logprobs=True, top_logprobs=2)
    assert r.choices[0].message.content == text
    assert [e.model_extra["id"] for e in r.choices[0].logprobs.content] == tokens
    stream = client.chat.completions.create(model=model_id, messages=messages, max_tokens=16,
                                            temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant" and not chunks[0].choices[0].delta.content
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text


def test_eight_concurrent_streams(server, model_id, chat_folder):
    """Eight streams at once (shared prefixes among them: the prefix cache is in play); each
    gets its own lone `run`'s tokens."""
    expected = [run_tokens(chat_folder, p, 24) for p in PROMPTS]
    results: dict = {}
    barrier = threading.Barrier(len(PROMPTS))

    def one(i, prompt):
        c = openai.OpenAI(base_url=server.base, api_key=API_KEY, max_retries=0)
        barrier.wait()
        ids, text = [], ""
        for chunk in c.completions.create(model=model_id, prompt=prompt, max_tokens=24,
                                          temperature=0, stream=True, logprobs=0):
            if chunk.choices:
                text += chunk.choices[0].text
                if chunk.choices[0].logprobs:
                    ids += chunk.choices[0].logprobs.model_extra["token_ids"]
        results[i] = (ids, text)

    threads = [threading.Thread(target=one, args=(i, p)) for i, p in enumerate(PROMPTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [results.get(i) for i in range(len(PROMPTS))] == [tuple(e) for e in expected]
    m = server.metrics()
    assert value(m, "vllm:num_requests_running") == 0
    assert value(m, "vllm:prefix_cache_hits_total") > 0        # "The cat sat on" shared


def test_logprobs_are_the_engines(client, model_id, chat_folder):
    """The chosen token's log-probability and the top 3, as the engine computes them alone."""
    from engine.config import GenerationConfig
    from engine.decoding import run_to_end
    from engine.loader import load_model
    lm = load_model(str(chat_folder), "cpu", "float64")
    events, fin = run_to_end(lm.model, lm.tokenizer, PROMPTS[0],
                             GenerationConfig(max_new_tokens=8, logprobs=3, attention_rows=False))
    local = [e for e in events if type(e).__name__ == "Token"]
    r = client.completions.create(model=model_id, prompt=PROMPTS[0], max_tokens=8,
                                  temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert lp.model_extra["token_ids"] == list(fin.tokens)
    for token, mine, top in zip(local, lp.token_logprobs, lp.top_logprobs):
        assert mine == pytest.approx(token.logprob, abs=1e-9)
        assert len(top) <= 3 and max(top.values()) == pytest.approx(token.top_logprobs[0][1])
        assert mine <= 0 and math.isclose(token.logprob, token.top_logprobs[0][1])   # greedy


def test_stop_strings_are_cut(client, model_id, chat_folder):
    tokens, text = run_tokens(chat_folder, PROMPTS[1], 24)
    stop = text[6:8]
    expected = text[:text.index(stop)]
    r = client.completions.create(model=model_id, prompt=PROMPTS[1], max_tokens=24,
                                  temperature=0, stop=[stop])
    assert (r.choices[0].text, r.choices[0].finish_reason) == (expected, "stop")
    streamed = client.completions.create(model=model_id, prompt=PROMPTS[1], max_tokens=24,
                                         temperature=0, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == expected


def test_seeded_sampling_equals_runs(client, model_id, chat_folder):
    tokens, text = run_tokens(chat_folder, PROMPTS[3], 16, "--temperature", "0.9", "--top-k",
                              "40", "--seed", "7")
    for _ in range(2):
        r = client.completions.create(model=model_id, prompt=PROMPTS[3], max_tokens=16,
                                      temperature=0.9, seed=7, extra_body={"top_k": 40})
        assert r.choices[0].text == text


def test_token_id_prompts(client, model_id, chat_folder):
    from engine.loader import load_model
    ids = load_model(str(chat_folder), "cpu", "float64").tokenizer.encode(PROMPTS[0])
    r = client.completions.create(model=model_id, prompt=ids, max_tokens=10, temperature=0)
    assert r.choices[0].text == run_tokens(chat_folder, PROMPTS[0], 10)[1]


# ----------------------------------------------------------------------------- refusals
def cli_error(chat_folder, capsys, *flags, prompt: str = "hello") -> str:
    """The one line `run` prints for the same mistake."""
    from cli.main import main
    assert main(["run", prompt, "--model", str(chat_folder), *flags]) == 2
    return capsys.readouterr().err.strip().removeprefix("error: ")


@pytest.mark.parametrize("body, flags, param", [
    ({"max_tokens": -1}, ["--max-new-tokens", "-1"], "max_tokens"),
    ({"temperature": -0.5}, ["--temperature", "-0.5"], "temperature"),
    ({"top_p": 1.5}, ["--top-p", "1.5"], "top_p"),
    ({"seed": -3}, ["--seed", "-3"], "seed"),
    ({"stop": [""]}, ["--stop", ""], "stop"),
])
def test_bad_values_say_what_run_says(server, chat_folder, capsys, body, flags, param):
    status, err = post(server, "/completions", {"prompt": "hello", **body})
    assert status == 400
    assert err["error"]["message"] == cli_error(chat_folder, capsys, *flags)
    assert err["error"]["param"] == param and err["error"]["type"] == "invalid_request_error"


def test_a_prompt_beyond_the_context(server, chat_folder, capsys):
    """`run`'s message, the flag said as the request field."""
    long = "word " * 120                              # 600 byte tokens > the 512 context
    status, err = post(server, "/completions", {"prompt": long, "max_tokens": 10})
    assert status == 400 and err["error"]["code"] == "context_length_exceeded"
    cli = cli_error(chat_folder, capsys, "--max-new-tokens", "10", prompt=long)
    assert "exceeds the model's context of 512 tokens" in cli
    assert err["error"]["message"] == cli.replace("--max-new-tokens", "max_tokens")
    status, err = post(server, "/completions", {"prompt": long})     # no max_tokens: still
    assert status == 400 and err["error"]["code"] == "context_length_exceeded"


@pytest.mark.parametrize("path, body, status, param", [
    ("/completions", {"prompt": "x", "max_tokens": "5"}, 400, "max_tokens"),
    ("/completions", {"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ("/completions", {"prompt": 5}, 400, "prompt"),
    ("/completions", {"prompt": "x", "stream": "yes"}, 400, "stream"),
    ("/completions", {"prompt": "x", "max_tokens": True}, 400, "max_tokens"),
    ("/completions", {"prompt": [1, 99999]}, 400, "prompt"),
    ("/completions", {"prompt": ["a", "b"]}, 400, "prompt"),
    ("/completions", {"prompt": "x", "n": 2}, 400, "n"),
    ("/completions", {"prompt": "x", "logprobs": 50}, 400, "logprobs"),
    ("/completions", {}, 400, "prompt"),
    ("/completions", [1, 2], 400, None),
    ("/completions", {"prompt": "   "}, 400, "prompt"),
    ("/completions", {"prompt": "x", "model": "gpt-5"}, 404, "model"),
    ("/chat/completions", {"messages": "hi"}, 400, "messages"),
    ("/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400,
     "messages[0].role"),
    ("/chat/completions", {"messages": [{"role": "user", "content": 3}]}, 400,
     "messages[0].content"),
    ("/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
     400, "top_logprobs"),
])
def test_wrong_input_is_a_4xx_json_error(server, path, body, status, param):
    got, err = post(server, path, body)
    assert got == status, err
    assert set(err["error"]) == {"message", "type", "param", "code"}
    assert err["error"]["param"] == param and err["error"]["message"]
    if status == 404:
        assert err["error"]["code"] == "model_not_found"


def test_malformed_and_oversized_bodies(server):
    status, err = post(server, "/completions", raw=b'{"prompt": "x",')
    assert status == 400 and err["error"]["code"] == "invalid_json"
    status, err = post(server, "/completions", raw=b"\xff\xfe not utf-8")
    assert status == 400 and err["error"]["code"] == "invalid_json"
    status, err = post(server, "/completions", raw=b"[" * 100_000 + b"]" * 100_000)
    assert status == 400 and err["error"]["code"] == "invalid_json"
    big = json.dumps({"prompt": "x" * (5 << 20)}).encode()
    status, err = post(server, "/completions", raw=big)
    assert status == 413 and "larger than 4 MiB" in err["error"]["message"]


def test_unknown_routes_and_methods_are_json(server):
    status, err = post(server, "/embeddings", {"input": "x"})
    assert status == 404 and err["error"]["code"] == "not_found"
    status, text = request(server.base + "/completions", headers=AUTH)     # GET
    assert status == 405 and "error" in json.loads(text)


def test_the_api_key(server):
    status, err = post(server, "/completions", {"prompt": "x"}, headers={})
    assert status == 401 and err["error"]["code"] == "invalid_api_key"
    status, err = post(server, "/completions", {"prompt": "x"},
                       headers={"Authorization": "Bearer wrong"})
    assert status == 401
    assert server.get("/health")[0] == 200 and server.get("/metrics")[0] == 200   # open


# ----------------------------------------------------------------------------- leaving, metrics
def test_a_client_that_leaves_frees_its_request(server, client, model_id, chat_folder):
    """Disconnect mid-stream: the request is aborted — its slot and KV blocks freed — and the
    server goes on serving."""
    before = server.metrics()
    parts = urlsplit(server.base)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    conn.request("POST", "/v1/completions", json.dumps(
        {"prompt": "The cat", "max_tokens": 480, "temperature": 0, "stream": True,
         "ignore_eos": True}), {"Content-Type": "application/json", **AUTH})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.readline().startswith(b"data: ")
    m = server.metrics()
    assert value(m, "vllm:num_requests_running") == 1 and value(m, "minillm:kv_blocks_used") > 0
    conn.sock.close()                                   # the client leaves
    conn.close()
    after = wait_for(lambda: (m := server.metrics()) and
                     value(m, "vllm:request_success_total", finished_reason="abort") >
                     value(before, "vllm:request_success_total", finished_reason="abort") and m,
                     "the request to be aborted")
    assert value(after, "vllm:num_requests_running") == 0
    assert value(after, "vllm:num_requests_waiting") == 0
    assert value(after, "minillm:kv_blocks_used") == 0
    assert value(after, "vllm:kv_cache_usage_perc") == 0
    generated = (value(after, "vllm:generation_tokens_total") -
                 value(before, "vllm:generation_tokens_total"))
    assert 1 <= generated < 480                         # stopped early, not finished
    r = client.completions.create(model=model_id, prompt=PROMPTS[0], max_tokens=20,
                                  temperature=0)      # still serving
    assert r.choices[0].text == run_tokens(chat_folder, PROMPTS[0], 20)[1]


def test_metrics_parse_and_count(server, client, model_id):
    before = server.metrics()
    r = client.completions.create(model=model_id, prompt=PROMPTS[5], max_tokens=12,
                                  temperature=0)
    m = server.metrics()
    for name, kind in [("vllm:num_requests_running", "gauge"),
                       ("vllm:num_requests_waiting", "gauge"),
                       ("vllm:kv_cache_usage_perc", "gauge"),
                       ("vllm:gpu_cache_usage_perc", "gauge"),
                       ("vllm:prompt_tokens_total", "counter"),
                       ("vllm:generation_tokens_total", "counter"),
                       ("vllm:request_success_total", "counter"),
                       ("vllm:time_to_first_token_seconds", "histogram"),
                       ("vllm:time_per_output_token_seconds", "histogram"),
                       ("vllm:e2e_request_latency_seconds", "histogram")]:
        assert m[name]["type"] == kind and m[name]["help"]

    def delta(name, **labels):
        return value(m, name, **labels) - value(before, name, **labels)

    n = r.usage.completion_tokens
    assert delta("vllm:generation_tokens_total") == n
    assert delta("vllm:prompt_tokens_total") == r.usage.prompt_tokens
    assert delta("vllm:time_to_first_token_seconds_count") == 1
    assert delta("vllm:time_per_output_token_seconds_count") == n - 1
    assert delta("vllm:request_success_total", finished_reason="length") + \
        delta("vllm:request_success_total", finished_reason="stop") == 1
    ttft = r.model_extra["timings"]["ttft_ms"] / 1000
    assert delta("vllm:time_to_first_token_seconds_sum") == pytest.approx(ttft, abs=1e-6)
    labels = {dict(k[1]).get("model_name") for k in m["vllm:prompt_tokens_total"]["samples"]}
    assert labels == {model_id}
