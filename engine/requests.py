"""What a session is asked to do: run one prompt, or race several settings on the same prompt.

A request carries `GenerationConfig` as it is (no mirror of its fields), and converts to and
from JSON for a process boundary, a recording's header or an HTTP body. No torch: the app builds
requests in a process that never loads a model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .config import ConfigError, GenerationConfig


@dataclass(frozen=True, slots=True)
class RunRequest:
    """Generate from `prompt` with `config`; every event of the run carries `run_id`."""
    prompt: str
    config: GenerationConfig = field(default_factory=GenerationConfig)
    run_id: int = 1

    def to_json(self) -> dict:
        return {"prompt": self.prompt, "config": self.config.to_dict(), "run_id": self.run_id}

    @classmethod
    def from_json(cls, d: dict) -> "RunRequest":
        if not isinstance(d, dict) or not isinstance(d.get("prompt"), str):
            raise ConfigError("a run request needs a 'prompt' string")
        run_id = d.get("run_id", 1)
        if not isinstance(run_id, int) or isinstance(run_id, bool):
            raise ConfigError("a run request's 'run_id' must be an integer")
        return cls(prompt=d["prompt"], config=GenerationConfig.from_dict(d.get("config", {})),
                   run_id=run_id)


@dataclass(frozen=True, slots=True)
class RaceRequest:
    """The same prompt through each run in turn; the first that finishes without an error is
    the reference the others are compared with (engine/compare.py)."""
    race_id: int
    runs: tuple[RunRequest, ...]

    def __post_init__(self) -> None:
        if not self.runs:
            raise ConfigError("a race needs at least one contestant")
        if len({r.prompt for r in self.runs}) != 1:
            raise ConfigError("every contestant of a race runs the same prompt")
        if len({r.run_id for r in self.runs}) != len(self.runs):
            raise ConfigError("each contestant of a race needs its own run id")

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
