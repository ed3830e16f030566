"""The flags several commands share, each defined once, and the configs they map onto.

Every builder adds its flags to a parser or an argument group; `helps` rewords a flag's help
for one command (say, what `serve` does with a request that sets no temperature) without
redefining it. The converters turn parsed flags into the engine's validated dataclasses, so a
bad value is a ConfigError (one line, exit status 2) before anything loads.

    add_model_args       --model --device --dtype                 run, bench, batch, serve, the app
    add_sampling_args    --temperature --top-k/p --min-p …        run, batch, serve
    add_generation_args  strategy, backend, length, sampling, stop, fast path   run, serve
    add_fast_args        --fuse --layout --weights --kernel …     (part of the above)
    add_look_args        --theme --truecolor --shots              the app, replay, watch
    add_ui_args          the app's own flags                      ui (the default command)
"""

from __future__ import annotations

import argparse

from engine.config import (DTYPES, FAST_WEIGHTS, KERNELS, LAYOUTS, STRATEGIES, FastPathConfig,
                           GenerationConfig, SamplingConfig)

Parser = argparse.ArgumentParser        # (or an argument group: anything with add_argument)


def _adder(p: Parser, helps: dict[str, str] | None):
    """p.add_argument, with `helps` (dest → text) replacing the default help of some flags."""
    helps = helps or {}

    def add(*names, **kw):
        dest = kw.get("dest") or names[0].lstrip("-").replace("-", "_")
        if dest in helps:
            kw["help"] = helps[dest]
        return p.add_argument(*names, **kw)
    return add


def add_model_args(p: Parser, helps: dict[str, str] | None = None) -> None:
    """Which model, where, in which dtype."""
    add = _adder(p, helps)
    add("--model", default=None,
        help="a .gguf file, a Hugging Face folder, or a hub id "
             "(default: the embedded SmolLM2-135M-Instruct)")
    add("--device", default="auto", help="auto (CUDA if present), cpu or cuda")
    add("--dtype", default="float32", help=f"one of: {', '.join(DTYPES)}")


def add_sampling_args(p: Parser, helps: dict[str, str] | None = None) -> None:
    """How the next token is chosen from the logits (engine/sampling.py)."""
    add = _adder(p, helps)
    add("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    add("--top-k", type=int, default=None)
    add("--top-p", type=float, default=None)
    add("--min-p", type=float, default=None)
    add("--repetition-penalty", type=float, default=1.0)
    add("--seed", type=int, default=None, help="random seed of the sampler")


def add_generation_args(p: Parser, helps: dict[str, str] | None = None) -> None:
    """One request's settings: GenerationConfig's fields, fast path included."""
    add = _adder(p, helps)
    add("--strategy", default="kv", help=f"one of: {', '.join(STRATEGIES)}")
    add("--backend", default="sdpa", help="attention backend: naive, sdpa, flash, triton")
    add("--max-new-tokens", type=int, default=50)
    add_sampling_args(p, helps)
    add("--block-size", type=int, default=16, help="tokens per paged-cache block")
    add("--stop", action="append", default=[], help="stop string (repeatable)")
    add_fast_args(p)


def add_fast_args(p: Parser) -> None:
    """Fast-path options (engine/fast/, docs/fast_path.md); the defaults change nothing."""
    g = p.add_argument_group("fast path") if isinstance(p, argparse.ArgumentParser) else p
    g.add_argument("--fuse", action="store_true", help="one matmul for Q/K/V and for gate/up")
    g.add_argument("--layout", default="rows", help=f"weight layout: {', '.join(LAYOUTS)}")
    g.add_argument("--weights", default="same",
                   help=f"one of: {', '.join(FAST_WEIGHTS)} (gguf: a GGUF model's own quantised "
                        f"blocks, memory-mapped — the float32 model's tokens at 4-bit traffic)")
    g.add_argument("--kernel", default="torch", choices=KERNELS,
                   help="torch: the PyTorch model steps; c: the whole decode step in C (CPU, "
                        "Llama/Qwen2, float32, --weights int8 or --weights gguf)")
    g.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    g.add_argument("--cuda-graphs", action="store_true", help="replay the decode step (CUDA)")
    g.add_argument("--threads", type=int, default=None, help="CPU threads (default: PyTorch's)")


def add_look_args(p: Parser) -> None:
    """How the app looks and where its screenshots go (the app, replay, watch)."""
    p.add_argument("--theme", default="dark", help="dark, light or projector")
    p.add_argument("--truecolor", action="store_true",
                   help="force 24-bit colour (COLORTERM is often lost over SSH)")
    p.add_argument("--shots", default=None, metavar="DIR",
                   help="where `S` saves SVG screenshots (default: screenshots/ in the cache "
                        "folder, $MINILLM_CACHE or ~/.cache/minillm)")


def add_ui_args(p: argparse.ArgumentParser) -> None:
    """The app's flags (tui/settings.py `Settings.from_args` reads them)."""
    add_model_args(p)
    p.add_argument("--strategy", default="kv", help=f"one of: {', '.join(STRATEGIES)}")
    p.add_argument("--backend", default="sdpa", help="attention backend")
    p.add_argument("--prompt", default="Deep learning is", help="initial prompt")
    p.add_argument("--max-new-tokens", type=int, default=50)
    add_look_args(p)
    p.add_argument("--share", nargs="?", const="127.0.0.1:8765", default=None,
                   metavar="HOST:PORT",
                   help="let others follow this session read-only with `watch URL` "
                        "(default 127.0.0.1:8765: this machine only; 0.0.0.0:PORT for every "
                        "network)")
    p.add_argument("--fast", default="", metavar="OPTS",
                   help="fast-path options for the runs, words joined by + as in the bench: "
                        "c, c+gguf, gguf, fuse+cols, c+int8, int8, fp16 (default: the plain "
                        "model; `f` cycles them in the app)")
    p.add_argument("--flash-tile", type=int, default=16, metavar="KEYS",
                   help="keys per tile of the flash backend in the app (default 16, so that a "
                        "short run shows several tiles; the bench and `run` use 64)")
    p.add_argument("--record", default=None, metavar="FILE",
                   help="record every run and race to FILE (.gz compresses) from the moment "
                        "the model is ready; `r` starts and stops recording in the app")
    p.add_argument("--endpoint", default=None, metavar="URL",
                   help="an OpenAI-compatible server (`serve`, vLLM, llama-server …) that joins "
                        "every race as a remote lane, e.g. http://127.0.0.1:8000/v1 (API key "
                        "from $MINILLM_API_KEY or $OPENAI_API_KEY; docs/serve.md)")
    p.add_argument("--endpoint-model", default=None, metavar="NAME",
                   help="the server's model id (default: the one it lists)")
    p.add_argument("--prompts", default=None, metavar="FILE",
                   help="the requests `B` serves at once in the server view, one prompt a line "
                        "(default: 16 built-in questions sharing one system prompt)")


# ----------------------------------------------------------------------------- flags → configs
def fast_config(a: argparse.Namespace) -> FastPathConfig:
    """The fast-path flags (absent ones: their defaults) as a FastPathConfig."""
    return FastPathConfig(fuse=getattr(a, "fuse", False), layout=getattr(a, "layout", "rows"),
                          weights=getattr(a, "weights", "same"),
                          compile=getattr(a, "compile", False),
                          cuda_graphs=getattr(a, "cuda_graphs", False),
                          threads=getattr(a, "threads", None),
                          kernel=getattr(a, "kernel", "torch"))


def sampling_config(a: argparse.Namespace, seed: int | None = None) -> SamplingConfig:
    """The sampling flags as a SamplingConfig; `seed` replaces --seed (batch: SEED + i)."""
    return SamplingConfig(temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                          min_p=a.min_p, repetition_penalty=a.repetition_penalty,
                          seed=a.seed if seed is None else seed)


def generation_config(a: argparse.Namespace, **overrides) -> GenerationConfig:
    """add_generation_args' flags as a validated GenerationConfig; `overrides` win."""
    kw = dict(strategy=a.strategy, backend=a.backend, max_new_tokens=a.max_new_tokens,
              sampling=sampling_config(a), block_size=a.block_size, stop=tuple(a.stop),
              fast=fast_config(a))
    kw.update(overrides)
    return GenerationConfig(**kw)
