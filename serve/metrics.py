"""GET /metrics: the server's figures in Prometheus' text format, under vLLM's names where they
mean the same thing — so a Grafana board or a benchmark client made for vLLM reads this server.

    vllm:num_requests_running          gauge      requests holding KV blocks (in the batch)
    vllm:num_requests_waiting          gauge      requests queued for admission (or preempted)
    vllm:kv_cache_usage_perc           gauge      KV blocks in use / blocks in the pool (0…1)
    vllm:gpu_cache_usage_perc          gauge      the same, under vLLM's older name
    vllm:prompt_tokens_total           counter    prompt tokens of admitted requests
    vllm:generation_tokens_total       counter    tokens generated
    vllm:request_success_total         counter    finished requests, by finished_reason:
                                                  stop (EOS or a stop string), length, abort
                                                  (cancelled: the client left), error
    vllm:num_preemptions_total         counter    requests preempted (blocks reclaimed)
    vllm:prefix_cache_queries_total    counter    prompt tokens looked up in the prefix cache
    vllm:prefix_cache_hits_total       counter    … and found there
    vllm:time_to_first_token_seconds   histogram  arrival → first token, per request
    vllm:time_per_output_token_seconds histogram  each gap between two tokens of a request
    vllm:inter_token_latency_seconds   histogram  the same observations (vLLM v1's name)
    vllm:request_time_per_output_token_seconds   histogram  a request's TPOT (engine/metrics.py)
    vllm:e2e_request_latency_seconds   histogram  arrival → finish
    vllm:request_queue_time_seconds    histogram  arrival → admission
    minillm:kv_blocks_used             gauge      the pool in blocks, for the block-level view
    minillm:kv_blocks_total            gauge

Every sample carries model_name="…" as vLLM's do. The text format: `# HELP` and `# TYPE` lines,
then `name{labels} value`; a histogram is cumulative `_bucket{le="…"}` samples ending at
le="+Inf", then `_sum` and `_count`. Written here in a few lines rather than with
prometheus_client: this is all of the format we need, and one dependency fewer.
"""

from __future__ import annotations

import bisect
import threading

# vLLM's buckets for the same histograms.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
               10.0, 20.0, 40.0, 80.0)
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                   60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
FINISHED_REASONS = {"eos": "stop", "stop": "stop", "length": "length", "cancelled": "abort",
                    "error": "error"}


def _number(x: float) -> str:
    return repr(float(x))             # "3.0", "0.25", "1e-05": all valid sample values


def _escape(value) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(labels: dict) -> str:
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}" \
        if labels else ""


class Metric:
    def __init__(self, name: str, kind: str, help: str, labels: dict):
        self.name, self.kind, self.help, self.labels = name, kind, help, labels

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Value(Metric):
    """A counter or a gauge; a counter's values may be split by one extra label."""

    def __init__(self, name, kind, help, labels, split: str | None = None, keys=()):
        super().__init__(name, kind, help, labels)
        self.split = split
        self.values = {k: 0.0 for k in keys} if split else {None: 0.0}

    def add(self, amount: float = 1.0, key=None) -> None:
        self.values[key] = self.values.get(key, 0.0) + amount

    def set(self, value: float) -> None:
        self.values[None] = float(value)

    def lines(self) -> list[str]:
        out = self.header()
        for key, v in self.values.items():
            labels = dict(self.labels, **({self.split: key} if self.split else {}))
            out.append(f"{self.name}{_labels(labels)} {_number(v)}")
        return out


class Histogram(Metric):
    def __init__(self, name, help, labels, buckets):
        super().__init__(name, "histogram", help, labels)
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)      # the last one: above every bound
        self.sum = 0.0

    def observe(self, x: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, x)] += 1
        self.sum += x

    def lines(self) -> list[str]:
        out, total = self.header(), 0
        for bound, n in zip((*self.buckets, float("inf")), self.counts):
            total += n
            le = "+Inf" if bound == float("inf") else _number(bound)
            out.append(f"{self.name}_bucket{_labels(dict(self.labels, le=le))} {total}")
        out.append(f"{self.name}_sum{_labels(self.labels)} {_number(self.sum)}")
        out.append(f"{self.name}_count{_labels(self.labels)} {total}")
        return out


class ServerMetrics:
    """Updated by the engine thread, read by the HTTP side: one lock around both."""

    def __init__(self, model_name: str):
        self.lock = threading.Lock()
        m = {"model_name": model_name}

        def value(name, kind, help, **kw):
            return Value(name, kind, help, m, **kw)

        def hist(name, help, buckets):
            return Histogram(name, help, m, buckets)

        self.running = value("vllm:num_requests_running", "gauge",
                             "Requests in the running batch (holding KV blocks).")
        self.waiting = value("vllm:num_requests_waiting", "gauge",
                             "Requests waiting to be admitted (new or preempted).")
        self.kv_usage = value("vllm:kv_cache_usage_perc", "gauge",
                              "KV-cache usage: blocks in use / blocks in the pool (1 = full).")
        self.gpu_usage = value("vllm:gpu_cache_usage_perc", "gauge",
                               "The same as vllm:kv_cache_usage_perc (vLLM's older name).")
        self.prompt_tokens = value("vllm:prompt_tokens_total", "counter",
                                   "Prompt tokens of admitted requests.")
        self.generation_tokens = value("vllm:generation_tokens_total", "counter",
                                       "Tokens generated.")
        self.success = value("vllm:request_success_total", "counter",
                             "Finished requests by finished_reason (abort: the client left).",
                             split="finished_reason", keys=("stop", "length", "abort", "error"))
        self.preemptions = value("vllm:num_preemptions_total", "counter",
                                 "Requests preempted: their KV blocks were reclaimed.")
        self.prefix_queries = value("vllm:prefix_cache_queries_total", "counter",
                                    "Prompt tokens looked up in the prefix cache.")
        self.prefix_hits = value("vllm:prefix_cache_hits_total", "counter",
                                 "Prompt tokens found in the prefix cache.")
        self.ttft = hist("vllm:time_to_first_token_seconds",
                         "Time from a request's arrival to its first token.", TTFT_BUCKETS)
        self.tpot = hist("vllm:time_per_output_token_seconds",
                         "Time between two consecutive tokens of a request.", ITL_BUCKETS)
        self.itl = hist("vllm:inter_token_latency_seconds",
                        "Time between two consecutive tokens of a request.", ITL_BUCKETS)
        self.request_tpot = hist("vllm:request_time_per_output_token_seconds",
                                 "A request's time per output token after the first.",
                                 ITL_BUCKETS)
        self.e2e = hist("vllm:e2e_request_latency_seconds",
                        "Time from a request's arrival to its end.", REQUEST_BUCKETS)
        self.queue = hist("vllm:request_queue_time_seconds",
                          "Time from a request's arrival to its admission.", REQUEST_BUCKETS)
        self.blocks_used = value("minillm:kv_blocks_used", "gauge", "KV blocks in use.")
        self.blocks_total = value("minillm:kv_blocks_total", "gauge", "KV blocks in the pool.")
        self.all = [self.running, self.waiting, self.kv_usage, self.gpu_usage,
                    self.prompt_tokens, self.generation_tokens, self.success, self.preemptions,
                    self.prefix_queries, self.prefix_hits, self.ttft, self.tpot, self.itl,
                    self.request_tpot, self.e2e, self.queue, self.blocks_used, self.blocks_total]

    def text(self) -> str:
        with self.lock:
            return "\n".join(line for metric in self.all for line in metric.lines()) + "\n"
