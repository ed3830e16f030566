"""What one bench run measures, as a validated dataclass (the CLI flags map onto its fields)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..config import DTYPES, STRATEGIES, ConfigError, FastPathConfig

FIRST_PROMPT = "Deep learning is"       # the first version's experiment: it, 50 tokens, greedy
FIRST_NEW_TOKENS = 50


@dataclass(slots=True)
class BenchSettings:
    model: str | None = None            # None = the embedded SmolLM2-135M
    device: str = "auto"
    dtype: str = "float32"
    prompt: str = FIRST_PROMPT
    max_new_tokens: int = FIRST_NEW_TOKENS
    strategies: tuple[str, ...] = STRATEGIES
    backends: tuple[str, ...] | None = None   # None = every backend available on the device
    repeat: int = 3                     # timed repetitions per row (after the warm-up pass)
    warmup: int = 1                     # untimed passes before the timed ones
    baseline: bool = True               # Hugging Face transformers generate() rows
    sweep: bool = False                 # per-step latency against position
    sweep_max: int | None = None        # longest swept position; None = fits the device
    bandwidth: bool = True              # copy bandwidth, bytes per step, where the time goes
    quick: bool = False
    block_size: int = 16
    seed: int = 0                       # for the sweep's random prompts
    threads: int | None = None          # torch CPU threads for the run; None = torch's default
    fast: tuple[str, ...] = ()          # fast-path variants to add as rows, e.g. "fuse+cols"
    fast_table: bool = False            # only kv/sdpa and its fast-path variants (fast_paths.py)
    lockstep: bool = False              # … and their steps timed interleaved, one by one

    def __post_init__(self) -> None:
        if self.fast_table:                 # the fast-path table decodes on kv/sdpa only
            self.strategies, self.backends = ("kv",), ("sdpa",)
        if self.dtype not in DTYPES:
            raise ConfigError(f"unknown dtype {self.dtype!r}; choose one of: {', '.join(DTYPES)}")
        self.strategies = tuple(self.strategies)
        for s in self.strategies:
            if s not in STRATEGIES:
                raise ConfigError(f"unknown strategy {s!r}; choose from: {', '.join(STRATEGIES)}")
        if not self.strategies:
            raise ConfigError("--strategies needs at least one strategy")
        if self.backends is not None:
            self.backends = tuple(self.backends)
            if not self.backends:
                raise ConfigError("--backends needs at least one backend")
        if self.max_new_tokens < 2:
            raise ConfigError("the bench needs --max-new-tokens ≥ 2 (TPOT is undefined for one)")
        if self.repeat < 1:
            raise ConfigError(f"--repeat must be ≥ 1, got {self.repeat}")
        if self.warmup < 0:
            raise ConfigError(f"--warmup must be ≥ 0, got {self.warmup}")
        if self.block_size < 1:
            raise ConfigError(f"--block-size must be ≥ 1, got {self.block_size}")
        if self.sweep_max is not None and self.sweep_max < 8:
            raise ConfigError(f"--sweep-max must be ≥ 8, got {self.sweep_max}")
        self.fast = tuple(self.fast)
        for spec in self.fast:
            FastPathConfig.from_spec(spec)      # a bad name fails here, before anything loads
        if self.lockstep and not self.fast_table:
            raise ConfigError("--lockstep times the fast-path table's variants: add --fast-table")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"--threads must be ≥ 1, got {self.threads}")
        if not self.prompt:
            raise ConfigError("the prompt is empty")

    def reduced(self) -> "BenchSettings":
        """--quick: the same experiment, smaller — 16 tokens, one pass that both checks and
        times (no separate warm-up, so first-call costs land in its numbers), short sweep."""
        if not self.quick:
            return self
        out = BenchSettings(**asdict(self))
        out.max_new_tokens = min(self.max_new_tokens, 16)
        out.repeat, out.warmup = 1, 0
        out.sweep_max = min(self.sweep_max or 128, 128)
        return out

    def to_dict(self) -> dict:
        d = asdict(self)
        d["strategies"] = list(self.strategies)
        d["backends"] = list(self.backends) if self.backends is not None else None
        d["fast"] = {spec: FastPathConfig.from_spec(spec).__repr__() for spec in self.fast}
        return d
