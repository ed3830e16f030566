"""Model and run settings as small dataclasses.

`ModelConfig` describes the shape of a checkpoint (it is built from a Hugging Face
`config.json` or from GGUF metadata). `GenerationConfig` describes one run: which decoding
strategy, which attention backend, how to sample, how many tokens. Both validate themselves in
`__post_init__`, so a bad value fails early with a one-line message instead of deep inside a
matrix multiply.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

FAMILIES = ("llama", "qwen2", "gpt2")
STRATEGIES = ("naive", "kv", "paged")
DTYPES = ("float32", "bfloat16", "float16", "float64")   # float64: exactness checks (tests)


class ConfigError(ValueError):
    """A setting that cannot work. The message is meant for the user, as is."""


class UnsupportedModel(ConfigError):
    """A well-formed checkpoint of an architecture this engine does not implement."""


# Bounds on a checkpoint's shape, checked before anything is allocated: metadata may lie (a GGUF
# claiming 10^9 layers, a context of 5·10^7). Far above any model this engine could run — Llama
# 3.1 405B has 126 layers, 128 heads, dim 16384, ffn 53248, a 128256-token vocabulary and a
# 131072-token context — yet small enough that nothing sized by them can exhaust memory before
# the tensors actually present are compared with them.
MODEL_LIMITS = {"vocab_size": 1 << 21, "dim": 1 << 16, "n_layers": 512, "n_heads": 1024,
                "n_kv_heads": 1024, "head_dim": 1024, "ffn_dim": 1 << 20, "max_seq_len": 1 << 24}


def check_size(value: Any, field: str, source: str | None = None) -> int:
    """`value` as a model size in 1…MODEL_LIMITS[field]; `source` names it as the file does."""
    name = source or field
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"model config: {name} must be an integer, got {value!r}"[:200])
    if not 1 <= value <= MODEL_LIMITS[field]:
        raise ConfigError(f"model config: {name} = {value} is out of range "
                          f"(1 … {MODEL_LIMITS[field]:,})")
    return value


def _positive(value: Any) -> bool:
    """A finite number > 0 (not a bool, not NaN)."""
    return (not isinstance(value, bool) and isinstance(value, (int, float))
            and math.isfinite(value) and value > 0)


@dataclass(slots=True)
class ModelConfig:
    """The architecture of one checkpoint. Field names follow the papers, not one library."""

    family: str = "llama"           # llama | qwen2 | gpt2
    vocab_size: int = 49152
    dim: int = 576                  # width of the residual stream (d_model)
    n_layers: int = 30
    n_heads: int = 9                # query heads
    n_kv_heads: int = 3             # key/value heads (< n_heads means grouped-query attention)
    head_dim: int = 64
    ffn_dim: int = 1536             # hidden width of the MLP
    max_seq_len: int = 8192         # the context the model was trained for
    norm_eps: float = 1e-5
    rope_theta: float = 100000.0
    rope_scaling: dict | None = None
    tie_embeddings: bool = True     # LM head shares the token-embedding matrix
    qkv_bias: bool = False          # Qwen2 adds biases to Q, K and V
    bos_token_id: int | None = 1
    eos_token_ids: tuple[int, ...] = (2,)

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise UnsupportedModel(
                f"unsupported architecture {self.family!r}; supported: {', '.join(FAMILIES)}")
        for name in MODEL_LIMITS:
            check_size(getattr(self, name), name)
        if self.n_heads % self.n_kv_heads:
            raise ConfigError("model config: n_heads must be a multiple of n_kv_heads")
        if self.family != "gpt2" and self.head_dim % 2:
            raise ConfigError(f"model config: head_dim must be even for rotary positions, "
                              f"got {self.head_dim}")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, dict):
            raise ConfigError(f"model config: rope_scaling must be an object, "
                              f"got {self.rope_scaling!r}"[:200])
        scaling = self.rope_scaling or {}
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind not in (None, "default", "linear", "llama3"):
            raise UnsupportedModel(f"RoPE scaling {kind!r} is not supported; supported: "
                                   f"linear, llama3"[:200])
        if kind in ("linear", "llama3") and not _positive(scaling.get("factor")):
            raise ConfigError(f"model config: rope_scaling factor must be a positive number, "
                              f"got {scaling.get('factor')!r}"[:200])
        for name in ("norm_eps", "rope_theta"):
            value = getattr(self, name)
            if not _positive(value):
                raise ConfigError(f"model config: {name} must be a positive number, "
                                  f"got {value!r}"[:200])
        self.eos_token_ids = tuple(int(t) for t in self.eos_token_ids)

    # ------------------------------------------------------------------ presets
    @classmethod
    def from_name(cls, name: str) -> "ModelConfig":
        """Named shapes, used for random-weight timing and tests."""
        presets = {
            "smollm2-135m": dict(),
            "tiny-llama": dict(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                               head_dim=16, ffn_dim=128, max_seq_len=512, rope_theta=10000.0),
            "tiny-qwen2": dict(family="qwen2", vocab_size=256, dim=64, n_layers=2, n_heads=4,
                               n_kv_heads=2, head_dim=16, ffn_dim=128, max_seq_len=512,
                               rope_theta=10000.0, qkv_bias=True, tie_embeddings=False),
            "tiny-gpt2": dict(family="gpt2", vocab_size=256, dim=64, n_layers=2, n_heads=4,
                              n_kv_heads=4, head_dim=16, ffn_dim=256, max_seq_len=512,
                              norm_eps=1e-5, bos_token_id=None, eos_token_ids=(255,)),
        }
        if name not in presets:
            raise ConfigError(f"unknown preset {name!r}; known: {', '.join(presets)}")
        return cls(**presets[name])

    # ------------------------------------------------------- Hugging Face config.json
    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "ModelConfig":
        """Read a Hugging Face `config.json` dictionary. Every size is checked for type and
        range here, named as the file names it, before anything is built from it."""
        if not isinstance(hf, dict):
            raise ConfigError(f"config.json must hold a JSON object, not a {type(hf).__name__}")
        mt = hf.get("model_type", "")
        if mt not in FAMILIES:
            raise UnsupportedModel(
                f"unsupported architecture {mt or hf.get('architectures')!r}; "
                f"supported: {', '.join(FAMILIES)}"[:300])
        family = mt

        def size(key: str, field: str, default: Any = None) -> int:
            value = hf.get(key)
            value = default if value is None else value
            if value is None:
                raise ConfigError(f"config.json has no {key!r} (needed for a {family} model)")
            return check_size(value, field, key)

        def number(key: str, default: float) -> float:
            value = hf.get(key)
            if value is None:
                return default
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"model config: {key} must be a number, got {value!r}"[:200])
            return float(value)

        eos = hf.get("eos_token_id")
        eos = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
        bos = hf.get("bos_token_id")
        for token in (*eos, bos):
            if token is not None and (isinstance(token, bool) or not isinstance(token, int)):
                raise ConfigError(f"model config: token ids must be integers, got {token!r}"[:200])
        if family == "gpt2":
            n_heads = size("n_head", "n_heads")
            dim = size("n_embd", "dim")
            if dim % n_heads:
                raise ConfigError(f"model config: n_embd ({dim}) is not a multiple of n_head "
                                  f"({n_heads})")
            return cls(family=family, vocab_size=size("vocab_size", "vocab_size"), dim=dim,
                       n_layers=size("n_layer", "n_layers"), n_heads=n_heads, n_kv_heads=n_heads,
                       head_dim=dim // n_heads, ffn_dim=size("n_inner", "ffn_dim", 4 * dim),
                       max_seq_len=size("n_positions", "max_seq_len"),
                       norm_eps=number("layer_norm_epsilon", 1e-5),
                       tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
                       bos_token_id=bos, eos_token_ids=eos)
        n_heads = size("num_attention_heads", "n_heads")
        dim = size("hidden_size", "dim")
        rope_theta = hf.get("rope_theta")
        scaling = hf.get("rope_scaling")
        params = hf.get("rope_parameters")   # newer transformers keep theta in here
        if isinstance(params, dict):
            rope_theta = rope_theta or params.get("rope_theta")
            if params.get("rope_type", "default") != "default":
                scaling = params
        if isinstance(scaling, dict) and scaling.get("rope_type", scaling.get("type")) == "default":
            scaling = None
        if scaling is not None and not isinstance(scaling, dict):
            raise ConfigError(f"model config: rope_scaling must be an object, got {scaling!r}"[:200])
        if rope_theta is not None and (isinstance(rope_theta, bool)
                                       or not isinstance(rope_theta, (int, float))):
            raise ConfigError(f"model config: rope_theta must be a number, got {rope_theta!r}"[:200])
        head_dim = hf.get("head_dim") or dim // n_heads
        return cls(family=family, vocab_size=size("vocab_size", "vocab_size"), dim=dim,
                   n_layers=size("num_hidden_layers", "n_layers"), n_heads=n_heads,
                   n_kv_heads=size("num_key_value_heads", "n_kv_heads", n_heads),
                   head_dim=check_size(head_dim, "head_dim", "head_dim"),
                   ffn_dim=size("intermediate_size", "ffn_dim"),
                   max_seq_len=size("max_position_embeddings", "max_seq_len", 2048),
                   norm_eps=number("rms_norm_eps", 1e-6),
                   rope_theta=float(rope_theta or 10000.0), rope_scaling=scaling,
                   tie_embeddings=bool(hf.get("tie_word_embeddings", family == "llama")),
                   qkv_bias=family == "qwen2" or bool(hf.get("attention_bias", False)),
                   bos_token_id=bos, eos_token_ids=eos)

    def to_hf(self) -> dict[str, Any]:
        """The inverse of `from_hf`: a `config.json` that transformers can load."""
        eos = list(self.eos_token_ids)
        eos_value = eos[0] if len(eos) == 1 else eos
        if self.family == "gpt2":
            return dict(model_type="gpt2", architectures=["GPT2LMHeadModel"],
                        vocab_size=self.vocab_size, n_embd=self.dim, n_layer=self.n_layers,
                        n_head=self.n_heads, n_inner=self.ffn_dim, n_positions=self.max_seq_len,
                        layer_norm_epsilon=self.norm_eps, activation_function="gelu_new",
                        bos_token_id=self.bos_token_id, eos_token_id=eos_value,
                        tie_word_embeddings=self.tie_embeddings)
        arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[self.family]
        out = dict(model_type=self.family, architectures=[arch], vocab_size=self.vocab_size,
                   hidden_size=self.dim, num_hidden_layers=self.n_layers,
                   num_attention_heads=self.n_heads, num_key_value_heads=self.n_kv_heads,
                   head_dim=self.head_dim, intermediate_size=self.ffn_dim,
                   max_position_embeddings=self.max_seq_len, rms_norm_eps=self.norm_eps,
                   rope_theta=self.rope_theta, rope_scaling=self.rope_scaling,
                   tie_word_embeddings=self.tie_embeddings, hidden_act="silu",
                   bos_token_id=self.bos_token_id, eos_token_id=eos_value)
        if self.family == "llama":
            out["attention_bias"] = self.qkv_bias
        return out

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """K and V for one token across all layers: 2 × layers × kv_heads × head_dim × bytes."""
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * dtype_bytes

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(slots=True)
class SamplingConfig:
    """How the next token is chosen from the logits. temperature 0 means greedy."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        # NaN compares false with everything, so "< 0" alone would let it through.
        for name, value in (("temperature", self.temperature), ("top-p", self.top_p),
                            ("min-p", self.min_p),
                            ("repetition penalty", self.repetition_penalty)):
            if value is not None and not math.isfinite(value):
                raise ConfigError(f"{name} must be a finite number, got {value}")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be ≥ 0 (0 = greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k <= 0:
            raise ConfigError(f"top-k must be a positive integer, got {self.top_k}")
        if self.top_p is not None and not (0.0 < self.top_p <= 1.0):
            raise ConfigError(f"top-p must be in (0, 1], got {self.top_p}")
        if self.min_p is not None and not (0.0 <= self.min_p <= 1.0):
            raise ConfigError(f"min-p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise ConfigError(
                f"repetition penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        if self.seed is not None and not (0 <= self.seed < 2**63):
            raise ConfigError(f"seed must be in [0, 2^63), got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


MAX_LOGPROBS = 20       # alternatives per token, as OpenAI's top_logprobs (and vLLM's default)

FAST_WEIGHTS = ("same", "bfloat16", "float16", "int8", "int8-dequant", "gguf")
# Weight formats that keep the model's numbers: the plain weights, and a GGUF file's own blocks
# decoded exactly.
EXACT_WEIGHTS = ("same", "gguf")
LAYOUTS = ("rows", "cols")
KERNELS = ("torch", "c")


@dataclass(slots=True)
class FastPathConfig:
    """Opt-in decode speed-ups (engine/fast/, docs/fast_path.md). The defaults change nothing.

    Exact options (same greedy tokens as the plain model): `fuse`, `layout`, `kernel`,
    `compile`, `cuda_graphs`, `threads`, and `weights="gguf"` (a GGUF model's own quantised
    blocks, read as they are: the float32 model's numbers at 4-bit traffic, engine/fast/
    gguf_weights.py). Lossy ones (bounded, reported divergence): the other `weights`.
    """

    fuse: bool = False              # one matmul for Q/K/V and one for gate/up
    layout: str = "rows"            # rows: nn.Linear's (out, in); cols: stored (in, out)
    weights: str = "same"           # same | bfloat16 | float16 | int8 | int8-dequant | gguf
    quantize_head: bool = True      # the LM head too (it is ~21% of the embedded model's bytes)
    compile: bool = False           # torch.compile the static decode step
    cuda_graphs: bool = False       # capture the decode step once per cache (CUDA only)
    threads: int | None = None      # torch.set_num_threads for the process; None = leave it
    kernel: str = "torch"           # torch: the PyTorch model; c: the decode step in C (CPU)

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ConfigError(f"unknown weight layout {self.layout!r}; choose one of: "
                              f"{', '.join(LAYOUTS)}")
        if self.weights not in FAST_WEIGHTS:
            raise ConfigError(f"unknown weight format {self.weights!r}; choose one of: "
                              f"{', '.join(FAST_WEIGHTS)}")
        if self.kernel not in KERNELS:
            raise ConfigError(f"unknown decode kernel {self.kernel!r}; choose one of: "
                              f"{', '.join(KERNELS)}")
        if self.kernel == "c":
            clash = [flag for flag, on in (("--layout cols", self.layout == "cols"),
                                           ("--weights " + self.weights,
                                            self.weights in ("float16", "bfloat16")),
                                           ("--compile", self.compile),
                                           ("--cuda-graphs", self.cuda_graphs)) if on]
            if clash:
                raise ConfigError(f"--kernel c runs its own decode step on float32, int8 or "
                                  f"GGUF-block weights; it cannot be combined with "
                                  f"{', '.join(clash)}")
        if self.weights == "gguf":
            clash = [flag for flag, on in (("--fuse", self.fuse), ("--layout cols",
                                           self.layout == "cols"),
                                           ("head-full", not self.quantize_head)) if on]
            if clash:
                raise ConfigError(f"--weights gguf reads the file's blocks as they are stored; "
                                  f"it cannot be combined with {', '.join(clash)}")
        if self.threads is not None and self.threads <= 0:
            raise ConfigError(f"threads must be a positive integer, got {self.threads}")

    @property
    def static_step(self) -> bool:
        """Decode through the fixed-shape step (what compile and CUDA graphs need)."""
        return self.compile or self.cuda_graphs

    @property
    def own_step(self) -> bool:
        """Decode steps go through a decoder object (fast.make_decoder), not the model's forward."""
        return self.static_step or self.kernel == "c"

    @property
    def lossy(self) -> bool:
        """Weights in fewer bits: the tokens may differ from the plain model's (a race marks
        such a contestant "expected to differ"). Every other option is exact."""
        return self.weights not in EXACT_WEIGHTS

    @property
    def changes_model(self) -> bool:
        return self.fuse or self.layout != "rows" or self.weights != "same"

    def key(self) -> tuple:
        return (self.fuse, self.layout, self.weights, self.quantize_head)

    def spec(self) -> str:
        """The inverse of from_spec (thread count aside): "c+int8", "" for the plain model.
        Each setting is named by its first word in FAST_WORDS, in that table's order."""
        words, named = [], set()
        for word, (key, value) in FAST_WORDS.items():
            if (key, value) not in named and getattr(self, key) == value:
                words.append(word)
            named.add((key, value))
        return "+".join(words)

    @classmethod
    def from_spec(cls, spec: str) -> "FastPathConfig":
        """Options as words joined by "+", as the bench and the app name them:
        "c+int8" → FastPathConfig(kernel="c", weights="int8"); "" → the plain model."""
        kw = {}
        for word in (w.strip() for w in spec.split("+") if w.strip()):
            if word not in FAST_WORDS:
                raise ConfigError(f"unknown fast-path option {word!r} in {spec!r}; choose from: "
                                  f"{', '.join(FAST_WORDS)} (joined with +)")
            key, value = FAST_WORDS[word]
            kw[key] = value
        return cls(**kw)


# The words of FastPathConfig.from_spec: word → (field, value). The first word of a setting is
# the one spec() writes, and this order is spec()'s order.
FAST_WORDS = {
    "fuse": ("fuse", True), "cols": ("layout", "cols"), "c": ("kernel", "c"),
    "bf16": ("weights", "bfloat16"), "bfloat16": ("weights", "bfloat16"),
    "fp16": ("weights", "float16"), "float16": ("weights", "float16"),
    "int8": ("weights", "int8"), "int8-dequant": ("weights", "int8-dequant"),
    "gguf": ("weights", "gguf"),
    "head-full": ("quantize_head", False),
    "compile": ("compile", True), "graphs": ("cuda_graphs", True),
}


@dataclass(slots=True)
class GenerationConfig:
    """One run: strategy, backend, sampling, length, and what to record."""

    strategy: str = "kv"
    backend: str = "sdpa"
    max_new_tokens: int = 50
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    block_size: int = 16            # tokens per block of the paged cache
    num_blocks: int | None = None   # paged pool size; None = just enough for this run
    capacity: int | None = None     # contiguous cache size; None = prompt + max_new_tokens
    stop: tuple[str, ...] = ()      # stop strings
    stop_at_eos: bool = True
    attention_rows: bool = True     # emit the new token's attention row (off for benchmarks)
    keep_logits: bool = False       # attach each step's logits to its Token event (tests, bench)
    logprobs: int | None = None     # each token's log-probability and the k most likely (0…20)
    flash_tile: int = 64            # key/value tile size of the flash backend
    fast: FastPathConfig = field(default_factory=FastPathConfig)   # decode speed-ups (opt-in)

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ConfigError(
                f"unknown strategy {self.strategy!r}; choose one of: {', '.join(STRATEGIES)}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"max new tokens must be at least 1, got {self.max_new_tokens}")
        if self.block_size <= 0:
            raise ConfigError(f"block size must be a positive integer, got {self.block_size}")
        if self.num_blocks is not None and self.num_blocks <= 0:
            raise ConfigError(f"number of blocks must be positive, got {self.num_blocks}")
        if self.flash_tile <= 0:
            raise ConfigError(f"flash tile size must be positive, got {self.flash_tile}")
        if self.logprobs is not None and (isinstance(self.logprobs, bool) or
                                          not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise ConfigError(f"logprobs must be an integer from 0 to {MAX_LOGPROBS} (the most "
                              f"likely alternatives to show per token), got {self.logprobs}")
        self.stop = tuple(self.stop)
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ConfigError("a stop string must not be empty (it would stop before the first "
                              "token)")

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        """Plain values only (nested dicts for sampling and fast): what a recording's header
        and a request sent over a pipe or HTTP carry. `from_dict` reads it back equal."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GenerationConfig":
        """The inverse of to_dict. An unknown key or a value of the wrong kind is a ConfigError."""
        if not isinstance(d, dict):
            raise ConfigError("generation settings must be a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown generation setting(s): {', '.join(unknown)}")
        kw = dict(d)
        try:
            if "sampling" in kw:
                kw["sampling"] = SamplingConfig(**kw["sampling"])
            if "fast" in kw:
                kw["fast"] = FastPathConfig(**kw["fast"])
            return cls(**kw)
        except TypeError as exc:
            raise ConfigError(f"generation settings: {exc}") from None


# The fast-path choices the app cycles through with `f` and a session reports on (from_spec
# words; "" is the plain model). Exact ones first: they change the speed, never the tokens.
FAST_CHOICES = ("", "c", "c+gguf", "gguf", "fuse+cols", "c+int8", "int8", "fp16")
