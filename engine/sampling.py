"""Choosing the next token from the logits: a ladder of small, pure steps.

    logits → repetition penalty → temperature → top-k → top-p → min-p → softmax → draw

Temperature 0 short-circuits to argmax (greedy). Sampling draws from a `torch.Generator` owned by
the run and always on the CPU, so a seed gives the same tokens on every device, strategy and
backend (as long as their logits agree).

`shape` walks the same ladder without drawing and keeps each stage, for step mode to show how
the settings shape the distribution: what the model said, what temperature made of it, which
tokens each cut removed, and what the draw finally uses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import SamplingConfig


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float):
    """CTRL-style: make already-seen tokens less likely (divide positive, multiply negative)."""
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    picked = logits[seen]
    logits = logits.clone()
    logits[seen] = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits


def top_k_filter(logits: torch.Tensor, k: int | None) -> torch.Tensor:
    """Keep the k highest logits; the rest become −∞."""
    if k is None or k >= logits.numel():
        return logits
    kth = torch.topk(logits, k).values[-1]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float | None) -> torch.Tensor:
    """Nucleus: keep the smallest set of most likely tokens whose probability sums to ≥ p."""
    if p is None or p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True)
    cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
    drop = cum - torch.softmax(sorted_logits, dim=-1) >= p   # mass *before* this token ≥ p
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(0, order, sorted_logits)


def min_p_filter(logits: torch.Tensor, min_p: float | None) -> torch.Tensor:
    """Drop tokens less likely than min_p × the most likely token's probability."""
    if not min_p:
        return logits
    probs = torch.softmax(logits, dim=-1)
    return logits.masked_fill(probs < min_p * probs.max(), float("-inf"))


def make_generator(seed: int | None) -> torch.Generator:
    gen = torch.Generator(device="cpu")
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


def sample(logits: torch.Tensor, cfg: SamplingConfig, seen: torch.Tensor,
           gen: torch.Generator) -> int:
    """Pick the next token id from float32 logits (vocab,)."""
    logits = apply_repetition_penalty(logits.float().cpu(), seen, cfg.repetition_penalty)
    if cfg.greedy:          # NumPy's argmax: the same index (the first maximum, or the first
        return int(logits.detach().numpy().argmax())  # NaN), ~10× faster for one vector here
    logits = logits / cfg.temperature
    logits = top_k_filter(logits, cfg.top_k)
    logits = top_p_filter(logits, cfg.top_p)
    logits = min_p_filter(logits, cfg.min_p)
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=gen))


def token_logprobs(logits: torch.Tensor, token: int, k: int) -> tuple[float, tuple]:
    """The chosen token's log-probability and the k most likely tokens as ((id, logprob), …),
    most likely first — from the model's raw logits (before penalty, temperature or filters:
    what the model thinks, as vLLM reports it by default)."""
    logp = torch.log_softmax(logits.double().cpu(), dim=-1)        # float64: no -inf from fp16
    top = torch.topk(logp, k) if k else None
    alternatives = tuple(zip(top.indices.tolist(), top.values.tolist())) if top else ()
    return float(logp[token]), alternatives


# What removed a token from the draw, in ladder order (0: kept). Greedy keeps only the argmax.
CUTS = ("", "top-k", "top-p", "min-p", "greedy")


@dataclass(frozen=True)
class Shaped:
    """One step's distribution at each stage of the ladder, over the whole vocabulary."""
    model: torch.Tensor      # softmax of the model's logits: what the model says
    tempered: torch.Tensor   # after repetition penalty and temperature (greedy: penalty only)
    final: torch.Tensor      # what the draw uses: the cuts applied, renormalised (greedy: one-hot)
    cut: torch.Tensor        # int8 index into CUTS: which stage removed each token (0: kept)


def shape(logits: torch.Tensor, cfg: SamplingConfig, seen: torch.Tensor) -> Shaped:
    """The ladder of `sample`, stage by stage, without drawing. A token's `cut` is the first
    filter that set it to −∞ (a later one would have too, perhaps, but it was already gone)."""
    logits = logits.float().cpu()
    model = torch.softmax(logits, dim=-1)
    logits = apply_repetition_penalty(logits, seen, cfg.repetition_penalty)
    cut = torch.zeros(logits.shape, dtype=torch.int8)
    if cfg.greedy:
        tempered = torch.softmax(logits, dim=-1)
        final = torch.zeros_like(tempered)
        final[torch.argmax(logits)] = 1.0
        cut[final == 0] = CUTS.index("greedy")
        return Shaped(model, tempered, final, cut)
    logits = logits / cfg.temperature
    tempered = torch.softmax(logits, dim=-1)
    for name, keep in (("top-k", lambda x: top_k_filter(x, cfg.top_k)),
                       ("top-p", lambda x: top_p_filter(x, cfg.top_p)),
                       ("min-p", lambda x: min_p_filter(x, cfg.min_p))):
        after = keep(logits)
        cut[(after == float("-inf")) & (logits != float("-inf"))] = CUTS.index(name)
        logits = after
    return Shaped(model, tempered, torch.softmax(logits, dim=-1), cut)
