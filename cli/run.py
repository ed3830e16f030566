"""`python main.py run PROMPT`: stream the completion (or, with --json, the events) to stdout;
--record writes the events to a file too; --endpoint streams from a remote server instead."""

from __future__ import annotations

import math
import os
import sys
import time

from engine.config import ConfigError, FastPathConfig, GenerationConfig
from engine.recording import Recorder, header

from .flags import generation_config
from .terminal import progress_printer


def cmd_run(args) -> int:
    """Both writers (--json, --record) are engine.recording.Recorder: one format."""
    from engine.events import Envelope, Finished, Token
    from engine.requests import RunRequest
    from engine.session import Session

    # Validate flags before loading; a recording keeps every layer's attention rows.
    cfg = generation_config(args, attention_rows=bool(args.record))
    if args.endpoint or args.endpoint_model:
        ready, runs, label = remote_run(args, cfg)
    else:
        session = Session.load(args.model, args.device, args.dtype,
                               progress=progress_printer(sys.stderr.isatty()),
                               weights="gguf" if cfg.fast.weights == "gguf" else "same")
        ready = session.ready(probe=False)
        runs = session.run(RunRequest(args.prompt, cfg), raise_errors=True)
        fast = cfg.fast.spec()
        label = f"{cfg.strategy}/{cfg.backend}{' +' + fast if fast else ''}"
    settings = {"prompt": args.prompt, "config": cfg.to_dict()}
    writers = []
    try:
        if args.record:
            writers.append(Recorder(args.record, header(settings, ready, "run")))
        if args.json:
            writers.append(Recorder(sys.stdout, header(settings, ready, "run")))
        first = Envelope(0, time.monotonic(), ready)
        for w in writers:
            w.write([first])
        out = sys.stdout
        for env in runs:
            for w in writers:
                w.write([env])
            ev = env.event
            if isinstance(ev, Finished) and ev.reason == "error":   # a remote run's end
                from engine.remote import RemoteError
                raise RemoteError(ev.error or "the server failed")
            if args.json:
                continue
            if isinstance(ev, Token):
                out.write(ev.text)
                out.flush()
            elif isinstance(ev, Finished):
                out.write(ev.tail + "\n")
                print(stats_line(ev, label), file=sys.stderr)
    except BaseException:
        for w in writers:                 # a run that never started leaves no recording
            w.close()
            if w.path is not None and w.events <= 1:
                os.remove(w.path)
        raise
    for w in writers:
        w.close()
    if args.record:
        print(f"recorded {writers[0].events} events to {args.record}; "
              f"`python main.py replay {args.record}` plays them", file=sys.stderr)
    return 0


def stats_line(ev, label: str) -> str:
    """The figures under a run's text; a remote run's server figures beside the client's."""
    m = ev.metrics
    if m is None:
        return f"[0 tokens · {label} · {ev.reason}]"
    line = (f"[{m.new_tokens} tokens · TTFT {m.ttft_s * 1e3:.0f} ms · TPOT {_fmt(m.tpot_s * 1e3)}"
            f" ms · {_fmt(m.decode_tokens_per_s)} tok/s · {label} · {ev.reason}]")
    s, t = ev.server_metrics, ev.server_timings
    if s is not None:
        line += (f"\n[server: TTFT {s.ttft_s * 1e3:.0f} ms · TPOT {_fmt(s.tpot_s * 1e3)} ms · "
                 f"{_fmt(s.decode_tokens_per_s)} tok/s — the client's TTFT is "
                 f"{(m.ttft_s - s.ttft_s) * 1e3:.0f} ms more: network and HTTP]")
    elif "predicted_ms" in t:
        line += (f"\n[server: prompt {t.get('prompt_n', 0):.0f} tokens in "
                 f"{t.get('prompt_ms', 0):.0f} ms · {t.get('predicted_n', 0):.0f} tokens in "
                 f"{t['predicted_ms']:.0f} ms]")
    return line


def remote_run(args, cfg: GenerationConfig):
    """`run --endpoint`: (Ready, the run's envelopes, its label) from a remote server."""
    from engine.events import Envelope, Ready
    from engine.remote import Endpoint, stream_events
    from engine.requests import RunRequest
    if not args.endpoint:
        raise ConfigError("--endpoint-model needs --endpoint URL")
    local = [flag for flag, changed in (
        ("--model", args.model is not None), ("--device", args.device != "auto"),
        ("--dtype", args.dtype != "float32"), ("--strategy", args.strategy != "kv"),
        ("--backend", args.backend != "sdpa"), ("--block-size", args.block_size != 16),
        ("fast-path options", cfg.fast != FastPathConfig()), ("--record", bool(args.record)))
        if changed]
    if local:
        raise ConfigError(f"{', '.join(local)} choose how this machine runs a model; with "
                          f"--endpoint the server runs it (--endpoint-model picks its model)")
    endpoint = Endpoint.resolve(args.endpoint, args.endpoint_model)
    ready = Ready(model=endpoint.model, device=endpoint.base, dtype="", n_layers=0, n_heads=0,
                  n_kv_heads=0, head_dim=0, max_seq_len=0)
    runs = (Envelope(1, time.monotonic(), ev)
            for ev in stream_events(endpoint, RunRequest(args.prompt, cfg)))
    return ready, runs, f"remote {endpoint.model}"


def _fmt(x: float) -> str:
    return "—" if math.isnan(x) else f"{x:.1f}"
