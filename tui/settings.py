"""What the app is set to: the next run's settings, and how they are shown in words.

`Settings` is what the command line sets (cli/flags.py `add_ui_args`) and the keys change
(`s`, `b`, `f`, `o`); the app turns it into the engine's `GenerationConfig` for each request.
No Textual here: the launcher checks settings before any screen exists.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from engine.config import (FAST_CHOICES, STRATEGIES, ConfigError, FastPathConfig,
                           GenerationConfig, SamplingConfig)
from engine.events import Contestant, RaceStarted
from engine.remote import Endpoint
from engine.requests import RaceRequest, Remote, RunRequest

BACKENDS = ("naive", "sdpa", "flash", "triton")     # before the model says which can run
FAST_TEXT = {
    "": "the plain PyTorch model (the reference)",
    "c": "the whole decode step in one C call — same tokens, faster",
    "c+gguf": "C step on the GGUF file's own 4-bit blocks — same tokens, a fifth of the bytes",
    "gguf": "the GGUF file's own 4-bit blocks, PyTorch step — same tokens",
    "fuse+cols": "fused Q/K/V and gate/up, weights stored (in, out) — same tokens",
    "c+int8": "C step on int8 weights — a quarter of the bytes; tokens may differ",
    "int8": "int8 weights (per-channel) — a quarter of the bytes; tokens may differ",
    "fp16": "16-bit weights, float32 arithmetic — half the bytes; tokens may differ",
}


@dataclass
class Settings:
    """What the command line can set, and what the next run or race will use."""
    model: str | None = None
    device: str = "auto"
    dtype: str = "float32"
    strategy: str = "kv"
    backend: str = "sdpa"
    prompt: str = "Deep learning is"
    max_new_tokens: int = 50
    theme: str = "dark"
    truecolor: bool = False
    sampling: dict = field(default_factory=lambda: dict(temperature=0.0))
    fast: str = ""                  # fast-path options ("c", "c+int8", …); "" = plain model
    flash_tile: int = 16            # keys per flash tile: small, so a short run shows several
    record: str | None = None       # write a recording here once the model is ready
    shots: str | None = None        # screenshots go here (default: under the cache folder)
    share: str | None = None        # HOST:PORT to share the session on, read-only
    endpoint: str | None = None     # an OpenAI-compatible server that joins each race (R)
    endpoint_model: str | None = None   # its model id (default: the one it lists)
    prompts: str | None = None      # `B` serves these (a file, one a line); None: built-in

    @classmethod
    def from_args(cls, args) -> "Settings":
        s = cls()
        for f in dataclasses.fields(cls):
            if f.name != "sampling" and getattr(args, f.name, None) is not None:
                setattr(s, f.name, getattr(args, f.name))
        return s

    def config(self) -> GenerationConfig:
        """The engine's settings for the next run (the app always asks for attention rows)."""
        return GenerationConfig(strategy=self.strategy, backend=self.backend,
                                max_new_tokens=self.max_new_tokens,
                                sampling=SamplingConfig(**self.sampling),
                                fast=FastPathConfig.from_spec(self.fast),
                                flash_tile=self.flash_tile)

    def to_json(self) -> dict:
        """What a recording's header keeps of them."""
        return {"prompt": self.prompt, "config": self.config().to_dict()}

    def take(self, header: dict) -> None:
        """Adopt a recording header's settings (for a replay's status bar and prompt); a header
        that does not parse changes nothing — it is only what was shown at the start."""
        settings = header.get("settings") if isinstance(header, dict) else None
        if not isinstance(settings, dict):
            return
        try:
            cfg = GenerationConfig.from_dict(settings.get("config") or {})
        except ConfigError:
            return
        if isinstance(settings.get("prompt"), str):
            self.prompt = settings["prompt"]
        self.take_run(cfg.strategy, cfg.backend, cfg.fast.spec(), cfg.max_new_tokens,
                      dataclasses.asdict(cfg.sampling))

    def take_run(self, strategy: str, backend: str, fast: str, max_new_tokens: int,
                 sampling: dict, prompt: str | None = None) -> None:
        """Show the settings a recorded or watched run was made with."""
        self.strategy, self.backend, self.fast = strategy, backend, fast
        self.max_new_tokens, self.sampling = max_new_tokens, dict(sampling)
        if prompt is not None:
            self.prompt = prompt

    def take_started(self, ev) -> None:
        """The settings of a recorded or watched run, from its Started event."""
        self.take_run(ev.strategy, ev.backend, ev.fast, ev.max_new_tokens,
                      dataclasses.asdict(ev.sampling), ev.prompt)

    def choose(self, name: str, value: str, reasons: dict) -> str | None:
        """Set strategy, backend or fast path for the next run; if `reasons` (choice → None
        or why it cannot run here) refuses it, change nothing and say why."""
        reason = reasons.get(value, f"not one of: {', '.join(map(repr, reasons))}")
        if reason:
            return f"{name.replace('fast', 'fast path')} {value!r} is unavailable here: {reason}"
        setattr(self, name, value)
        return None

    def next(self, name: str, reasons: dict) -> str:
        """The next choice of `name` that can run here, wrapping round."""
        return next_choice([c for c, reason in reasons.items() if reason is None],
                           getattr(self, name))

    @property
    def remote_label(self) -> str:
        """The remote lane's name ("remote/127.0.0.1:8000"), or "" without --endpoint."""
        if not self.endpoint:
            return ""
        return RunRequest(self.prompt, remote=Remote(self.endpoint)).label

    @property
    def comparison_key(self) -> tuple:
        """Two greedy runs with the same key must produce the same tokens."""
        return (self.prompt, tuple(sorted(self.sampling.items())), self.max_new_tokens)

    @property
    def greedy(self) -> bool:
        return not self.sampling.get("temperature")

    def adopt(self, ready) -> list[str]:
        """The model is `ready` and says what can run here: a backend or fast path chosen on
        the command line that cannot is replaced by the default; returns what to tell."""
        backends, fast = choices("backend", ready), choices("fast", ready)
        said = []
        if backends.get(self.backend, "unknown backend"):
            said.append(f"backend {self.backend!r} is unavailable here: "
                        f"{backends.get(self.backend, 'unknown backend')}; using sdpa")
            self.backend = "sdpa"
        if fast and fast.get(self.fast, "not one of the app's choices"):
            said.append(f"fast path {self.fast!r} is unavailable here: "
                        f"{fast.get(self.fast, 'not one of the choices')}; using the plain model")
            self.fast = ""
        return said

    def race(self, race_id: int, run_ids, ready) -> RaceRequest:
        """The race `R` starts: every strategy on sdpa, every other backend that can run here
        on kv, then kv with the exact fast-path options that can run here (same tokens, only
        faster) — and the fast-path option chosen with `f`, if it is another one (a lossy one
        shows its divergence); last, the server given with --endpoint, if any (the engine
        streams it and compares its tokens with the first contestant's). `run_ids`: an
        iterator of fresh run ids."""
        if ready is None:
            raise ConfigError("the model is still loading, and a race needs to know which "
                              "backends run here: press R again once it is ready")
        backends, fast = choices("backend", ready), choices("fast", ready)
        combos = [(s, "sdpa", "") for s in STRATEGIES]
        combos += [("kv", name, "") for name, reason in backends.items()
                   if name != "sdpa" and reason is None]
        exact = ("c", "c+gguf", "fuse+cols")
        combos += [("kv", "sdpa", spec) for spec in dict.fromkeys((*exact, self.fast))
                   if spec and fast.get(spec, "unknown") is None]
        base = self.config()
        runs = [RunRequest(self.prompt, dataclasses.replace(base, strategy=s, backend=b,
                                                            fast=FastPathConfig.from_spec(f)),
                           next(run_ids)) for s, b, f in combos]
        if self.endpoint:
            runs.append(RunRequest(self.prompt, dataclasses.replace(base, attention_rows=False),
                                   next(run_ids), remote=Remote(self.endpoint,
                                                                self.endpoint_model)))
        return RaceRequest(race_id, tuple(runs))

    def error(self) -> str | None:
        """What is wrong with settings given on the command line, said plainly; None if
        nothing."""
        if self.strategy not in STRATEGIES:
            return f"unknown strategy {self.strategy!r}; choose one of: {', '.join(STRATEGIES)}"
        if self.flash_tile <= 0:
            return f"--flash-tile must be a positive number of keys, got {self.flash_tile}"
        if self.prompts is not None:
            from engine.workload import read_prompts
            try:
                read_prompts(self.prompts)
            except ConfigError as exc:
                return f"--prompts: {exc}"
        if self.fast not in FAST_CHOICES:
            return (f"--fast {self.fast!r} is not one of the app's fast-path choices: "
                    f"{', '.join(repr(c) for c in FAST_CHOICES)} ('' = the plain model; the "
                    f"bench takes any combination)")
        if self.endpoint_model and not self.endpoint:
            return "--endpoint-model needs --endpoint URL (the server it names a model of)"
        if self.endpoint:
            try:
                Endpoint.base_url(self.endpoint)
            except ConfigError as exc:
                return str(exc)
        return None


def choices(name: str, ready) -> dict[str, str | None]:
    """The choices of strategy, backend or fast path → None if it can run here, else why not
    (known once the model is `ready`: engine.events.Ready)."""
    if name == "strategy":
        return dict.fromkeys(STRATEGIES)
    known = getattr(ready, "backends" if name == "backend" else "fast", None)
    return known or dict.fromkeys(BACKENDS if name == "backend" else FAST_CHOICES)


def fork_race(request: RunRequest, forces, run_ids) -> RaceRequest:
    """A step-mode fork (`forces`: its forced (index, token) pairs) against the same request
    unforced, neither stepping: the race shows where and why their texts part."""
    plain = dataclasses.replace(request, step=False, run_id=next(run_ids))
    fork = dataclasses.replace(plain, forces=tuple(forces), run_id=next(run_ids))
    return RaceRequest(next(run_ids), (plain, fork))


def race_started(race: RaceRequest) -> RaceStarted:
    """What the engine will say when `race` starts, for drawing its lanes at once."""
    return RaceStarted(race.prompt, tuple(Contestant(r.run_id, r.label) for r in race.runs),
                       max(r.config.max_new_tokens for r in race.runs))


def next_choice(choices, current):
    """The choice after `current`, wrapping round; the first one if `current` is not among them."""
    choices = list(choices)
    i = choices.index(current) if current in choices else -1
    return choices[(i + 1) % len(choices)]


def fast_description(spec: str) -> str:
    return FAST_TEXT.get(spec, spec)


def sampling_text(sampling: dict, max_new: int) -> str:
    """The sampling settings in a few words: "greedy max 50", "T=0.7 top-k=40 seed=3 max 50"."""
    t = sampling.get("temperature") or 0.0
    parts = ["greedy" if t == 0 else f"T={t:g}"]
    for key, short in (("top_k", "top-k"), ("top_p", "top-p"), ("min_p", "min-p"),
                       ("seed", "seed")):
        if sampling.get(key) is not None:
            parts.append(f"{short}={sampling[key]:g}")
    if sampling.get("repetition_penalty", 1.0) != 1.0:
        parts.append(f"rep={sampling['repetition_penalty']:g}")
    parts.append(f"max {max_new}")
    return " ".join(parts)


def force_truecolor(settings: Settings) -> bool:
    """--truecolor or MINILLM_TRUECOLOR=1: draw 24-bit colour whatever the terminal claims.

    Rich reads COLORTERM when the app's console is created; over SSH it is often not forwarded,
    and the app would fall back to 256 colours on a terminal that has millions.
    """
    if settings.truecolor or os.environ.get("MINILLM_TRUECOLOR", "") not in ("", "0"):
        os.environ["COLORTERM"] = "truecolor"
        return True
    return False
