"""What a session is asked to do: run one prompt, race several settings on the same prompt or
serve many prompts at once (a batch) — and, to a run in step mode that has paused before a
token, what to do next.

A request carries `GenerationConfig` as it is (no mirror of its fields), and converts to and
from JSON for a process boundary, a recording's header or an HTTP body. No torch: the app builds
requests in a process that never loads a model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import urlsplit

from .config import ConfigError, GenerationConfig
from .events import run_label


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


REMOTE = "remote"    # the strategy a remote run is named by: "remote/127.0.0.1:8000"


@dataclass(frozen=True, slots=True)
class Remote:
    """Run on an OpenAI-compatible server instead of the local model (engine/remote.py): its
    URL and, if not the one it lists, its model id. The API key is not part of a request (a
    request goes into recordings): the engine reads it from the environment."""
    url: str
    model: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.url, str) or not self.url.strip():
            raise ConfigError("a remote run needs the server's URL")
        if self.model is not None and not isinstance(self.model, str):
            raise ConfigError("a remote run's model must be a string")

    @property
    def name(self) -> str:
        """How the lane is named: the server's host:port ("127.0.0.1:8000")."""
        url = self.url.strip()
        return urlsplit(url if "://" in url else "http://" + url).netloc or url


@dataclass(frozen=True, slots=True)
class RunRequest:
    """Generate from `prompt` with `config`; every event of the run carries `run_id`.

    step: pause before each token (emitting StepPoint and LogitLens) until a `StepCommand`
    for this run says what to do. forces: ((token index, token id), …) — take these tokens at
    these indices whatever the sampler chooses, without pausing: a fork made reproducible (the
    app races one against the unforced run). remote: run it on that server instead
    (engine/remote.py) — the config's sampling and length go with it; strategy, backend and
    fast path are the server's business."""
    prompt: str
    config: GenerationConfig = field(default_factory=GenerationConfig)
    run_id: int = 1
    step: bool = False
    forces: tuple[tuple[int, int], ...] = ()
    remote: Remote | None = None

    def __post_init__(self) -> None:
        pairs = tuple(tuple(p) for p in self.forces) if isinstance(self.forces, (list, tuple)) \
            else None
        if pairs is None or any(len(p) != 2 or not all(_is_int(x) and x >= 0 for x in p)
                                for p in pairs):
            raise ConfigError("forced tokens must be (token index, token id) pairs of "
                              "non-negative integers")
        if len({i for i, _ in pairs}) != len(pairs):
            raise ConfigError("a token index can be forced only once")
        if self.step and pairs:
            raise ConfigError("a step-mode run takes its forced tokens as it goes, not in "
                              "advance")
        object.__setattr__(self, "forces", tuple(sorted(pairs)))
        if self.remote is not None and (self.step or pairs):
            raise ConfigError("a remote run cannot pause or force tokens: the server samples")

    @property
    def label(self) -> str:
        """"kv/sdpa +c"; a fork (forced tokens) adds where it forks first: "kv/sdpa fork@3";
        a remote run: "remote/127.0.0.1:8000"."""
        if self.remote is not None:
            return run_label(REMOTE, self.remote.name)
        cfg = self.config
        fork = f" fork@{self.forces[0][0]}" if self.forces else ""
        return run_label(cfg.strategy, cfg.backend, cfg.fast.spec()) + fork

    def to_json(self) -> dict:
        d = {"prompt": self.prompt, "config": self.config.to_dict(), "run_id": self.run_id,
             "step": self.step, "forces": [list(p) for p in self.forces]}
        if self.remote is not None:
            d["remote"] = {"url": self.remote.url, "model": self.remote.model}
        return d

    @classmethod
    def from_json(cls, d: dict) -> "RunRequest":
        if not isinstance(d, dict) or not isinstance(d.get("prompt"), str):
            raise ConfigError("a run request needs a 'prompt' string")
        run_id = d.get("run_id", 1)
        if not _is_int(run_id):
            raise ConfigError("a run request's 'run_id' must be an integer")
        if not isinstance(d.get("step", False), bool):
            raise ConfigError("a run request's 'step' must be true or false")
        forces = d.get("forces", [])
        if not isinstance(forces, list) or not all(isinstance(p, list) for p in forces):
            raise ConfigError("a run request's 'forces' must be a list of [index, token] pairs")
        remote = d.get("remote")
        if remote is not None and not isinstance(remote, dict):
            raise ConfigError("a run request's 'remote' must be {\"url\": …, \"model\": …}")
        return cls(prompt=d["prompt"], config=GenerationConfig.from_dict(d.get("config", {})),
                   run_id=run_id, step=d.get("step", False),
                   forces=tuple(tuple(p) for p in forces),
                   remote=None if remote is None else Remote(remote.get("url"),
                                                             remote.get("model")))


STEP_ACTIONS = ("next", "force", "run", "cancel")
WAKE_UP = -1         # the run id of a cancel that wakes any paused run (run ids are ≥ 0)


@dataclass(frozen=True, slots=True)
class StepCommand:
    """What a step-mode run that paused before a token does next.

    next    take the sampler's choice — `count` tokens, then pause again
    force   take `token` instead (the run becomes a fork), then pause again
    run     take the sampler's choices to the end without pausing
    cancel  stop the run. Session.cancel sends one with run_id WAKE_UP (no run's id) to wake
            whichever run is paused; it sets the cancel flag first, and the flag decides.
    """
    run_id: int
    action: str = "next"
    token: int | None = None
    count: int = 1

    def __post_init__(self) -> None:
        if self.action not in STEP_ACTIONS:
            raise ConfigError(f"unknown step action {self.action!r}; choose one of: "
                              f"{', '.join(STEP_ACTIONS)}")
        if not _is_int(self.run_id):
            raise ConfigError("a step command's 'run_id' must be an integer")
        if self.action == "force" and not (_is_int(self.token) and self.token >= 0):
            raise ConfigError("forcing needs a token id (a non-negative integer)")
        if not _is_int(self.count) or self.count < 1:
            raise ConfigError(f"a step count must be a positive integer, got {self.count!r}")

    def to_json(self) -> dict:
        return {"run_id": self.run_id, "action": self.action, "token": self.token,
                "count": self.count}

    @classmethod
    def from_json(cls, d: dict) -> "StepCommand":
        if not isinstance(d, dict):
            raise ConfigError("a step command must be a JSON object")
        return cls(run_id=d.get("run_id"), action=d.get("action", "next"),
                   token=d.get("token"), count=d.get("count", 1))


@dataclass(frozen=True, slots=True)
class RaceRequest:
    """The same prompt through each run in turn; the first local run that finishes without an
    error is the reference the others are compared with (engine/compare.py) — a remote run
    (`RunRequest.remote`) is compared with it, never the reference itself."""
    race_id: int
    runs: tuple[RunRequest, ...]

    def __post_init__(self) -> None:
        if not self.runs:
            raise ConfigError("a race needs at least one contestant")
        if len({r.prompt for r in self.runs}) != 1:
            raise ConfigError("every contestant of a race runs the same prompt")
        if len({r.run_id for r in self.runs}) != len(self.runs):
            raise ConfigError("each contestant of a race needs its own run id")
        if any(r.step for r in self.runs):
            raise ConfigError("a race's contestants run without pausing (no step mode)")

    @property
    def prompt(self) -> str:
        return self.runs[0].prompt

    def to_json(self) -> dict:
        return {"race_id": self.race_id, "runs": [r.to_json() for r in self.runs]}

    @classmethod
    def from_json(cls, d: dict) -> "RaceRequest":
        if not isinstance(d, dict) or not isinstance(d.get("runs"), list):
            raise ConfigError("a race request needs a 'runs' list")
        return cls(race_id=int(d.get("race_id", 0)),
                   runs=tuple(RunRequest.from_json(r) for r in d["runs"]))


@dataclass(frozen=True, slots=True)
class BatchRequest:
    """Many prompts served at once by the batching engine (engine/batch.py): every prompt is a
    request with `config` (request i samples with seed + i when a seed is given, so requests
    differ yet repeat); all the batch's events carry `batch_id`.

    max_batch, max_step_tokens, prefix_caching: the scheduler's limits (engine/scheduler.py).
    num_blocks: the pool; None sizes it as a contiguous reservation (prompt + max new tokens)
    for `reserve_for` of the longest requests (default: max_batch of them, as `batch` does) — a
    pool smaller than the batch needs, so the paged cache has to earn its keep.
    arrival_rate: requests per second, Poisson (None: all at once), seeded by arrival_seed."""
    prompts: tuple[str, ...]
    config: GenerationConfig = field(default_factory=GenerationConfig)
    batch_id: int = 1
    max_batch: int = 8
    max_step_tokens: int = 512
    num_blocks: int | None = None
    reserve_for: int | None = None
    prefix_caching: bool = True
    arrival_rate: float | None = None
    arrival_seed: int = 0

    def __post_init__(self) -> None:
        prompts = self.prompts
        if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
            raise ConfigError("a batch request's 'prompts' must be a list of strings")
        if not prompts:
            raise ConfigError("a batch needs at least one prompt")
        object.__setattr__(self, "prompts", tuple(prompts))
        for name in ("batch_id", "max_batch", "max_step_tokens", "arrival_seed"):
            if not _is_int(getattr(self, name)):
                raise ConfigError(f"a batch request's {name!r} must be an integer")
        for name in ("num_blocks", "reserve_for"):
            value = getattr(self, name)
            if value is not None and not (_is_int(value) and value > 0):
                raise ConfigError(f"a batch request's {name!r} must be a positive integer")
        rate = self.arrival_rate
        if rate is not None and not (isinstance(rate, (int, float)) and not isinstance(rate, bool)
                                     and 0 < rate < float("inf")):
            raise ConfigError(f"the arrival rate must be a positive number of requests per "
                              f"second, got {rate!r}")

    def to_json(self) -> dict:
        return {"prompts": list(self.prompts), "config": self.config.to_dict(),
                "batch_id": self.batch_id, "max_batch": self.max_batch,
                "max_step_tokens": self.max_step_tokens, "num_blocks": self.num_blocks,
                "reserve_for": self.reserve_for, "prefix_caching": self.prefix_caching,
                "arrival_rate": self.arrival_rate, "arrival_seed": self.arrival_seed}

    @classmethod
    def from_json(cls, d: dict) -> "BatchRequest":
        if not isinstance(d, dict) or not isinstance(d.get("prompts"), list):
            raise ConfigError("a batch request needs a 'prompts' list")
        if not isinstance(d.get("prefix_caching", True), bool):
            raise ConfigError("a batch request's 'prefix_caching' must be true or false")
        keys = ("batch_id", "max_batch", "max_step_tokens", "num_blocks", "reserve_for",
                "prefix_caching", "arrival_rate", "arrival_seed")
        return cls(prompts=tuple(d["prompts"]),
                   config=GenerationConfig.from_dict(d.get("config", {})),
                   **{k: d[k] for k in keys if k in d})
