"""A decoder-only transformer, written out step by step.

One file holds the whole model, for three families that differ in small, named ways:

    family   norm        positions            MLP        attention
    llama    RMSNorm     rotary (RoPE)        SwiGLU     grouped-query, no biases
    qwen2    RMSNorm     rotary (RoPE)        SwiGLU     grouped-query, biases on Q, K, V
    gpt2     LayerNorm   learned embeddings   GELU       multi-head, fused QKV, biases

Data flows: token ids → embedding → N × [norm → attention → add, norm → MLP → add] → norm →
LM head → logits. The attention *arithmetic* (softmax(QKᵀ/√d)·V) is not done here: each layer
hands its Q, K, V to an `attend(layer, q, k, v)` callable that the decoding strategy supplies.
That one narrow door is where the KV caches and the attention backends plug in, so neither ever
needs to touch this file.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig

# attend(layer_index, q, k, v) -> output
#   q: (B, n_heads, T, head_dim)  k, v: (B, n_kv_heads, T, head_dim)  output: like q
Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class RMSNorm(nn.Module):
    """Scale each vector to unit root-mean-square, then by a learned gain (no mean, no bias).

    Computed in float32 even for half-precision weights: squaring small numbers in bfloat16 loses
    most of their digits.
    """

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def rope_frequencies(cfg: ModelConfig) -> torch.Tensor:
    """The rotation speed θ_i of each pair of channels, after the checkpoint's scaling rule."""
    hd = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        # Position interpolation: positions are squeezed by `factor`, i.e. every speed slows.
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        # Llama 3.1: slow only the low frequencies (long wavelengths), keep the high ones,
        # and blend smoothly in between.
        factor = scaling["factor"]
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_len = scaling.get("original_max_position_embeddings", 8192)
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        mid = (wavelen <= old_len / low) & (wavelen >= old_len / high)
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = torch.where(mid, blended, scaled)
    elif kind not in (None, "default"):
        raise ValueError(f"unsupported rope scaling {kind!r}")
    return inv_freq.float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each channel pair (i, i + hd/2) by its angle: position enters as a rotation.

    x: (B, H, T, hd); cos, sin: (T, hd). The dot product of two rotated vectors depends only on
    the difference of their positions — that is why RoPE gives relative attention.
    """
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)  # "rotate_half"
    return x * cos + rotated * sin


class Attention(nn.Module):
    """Project to queries, keys and values; let `attend` mix them; project back."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv, self.hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.family = cfg.family
        # Sizes of Q, K and V along the output of a fused projection: (H·hd, n_kv·hd, n_kv·hd).
        self.qkv_sizes = (self.n_heads * self.hd, self.n_kv * self.hd, self.n_kv * self.hd)
        if cfg.family == "gpt2":
            # GPT-2 stores Q, K and V as one matrix: one matmul, then split.
            self.wqkv = nn.Linear(cfg.dim, 3 * cfg.n_heads * cfg.head_dim, bias=True)
            self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=True)
        else:
            # Grouped-query attention: fewer K/V heads than Q heads; each K/V head serves
            # n_heads / n_kv_heads query heads, which shrinks the KV cache by the same factor.
            self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
            self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
            self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
            self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
            # Separate matrices, as the checkpoint stores them. `engine.fast.fuse` may stack
            # them into one `wqkv` (one matmul reads one contiguous block of weights).
            self.wqkv = None

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                attend: Attend) -> torch.Tensor:
        B, T, _ = x.shape
        if self.wqkv is not None:
            q, k, v = self.wqkv(x).split(self.qkv_sizes, dim=-1)
        else:
            q, k, v = self.wq(x), self.wk(x), self.wv(x)
        q = q.view(B, T, self.n_heads, self.hd).transpose(1, 2)   # (B, H, T, hd)
        k = k.view(B, T, self.n_kv, self.hd).transpose(1, 2)      # (B, n_kv, T, hd)
        v = v.view(B, T, self.n_kv, self.hd).transpose(1, 2)      # (B, n_kv, T, hd)
        if rope is not None:
            cos, sin = rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = attend(self.layer, q, k, v)                           # (B, H, T, hd)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.hd)  # (B, T, H·hd)
        return self.wo(y)


class MLP(nn.Module):
    """The per-token feed-forward network: widen, apply a non-linearity, narrow again."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.family = cfg.family
        if cfg.family == "gpt2":
            self.w_fc = nn.Linear(cfg.dim, cfg.ffn_dim, bias=True)
            self.w_proj = nn.Linear(cfg.ffn_dim, cfg.dim, bias=True)
        else:
            # SwiGLU: a SiLU-activated "gate" multiplies a linear "up" projection.
            self.w_gate = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
            self.w_up = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
            self.w_down = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)
            self.w_gate_up = None      # [gate; up] stacked by `engine.fast.fuse`, if asked

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.family == "gpt2":
            # GPT-2's GELU is the tanh approximation ("gelu_new").
            return self.w_proj(F.gelu(self.w_fc(x), approximate="tanh"))
        if self.w_gate_up is not None:
            gate, up = self.w_gate_up(x).chunk(2, dim=-1)     # (B, T, ffn) each
        else:
            gate, up = self.w_gate(x), self.w_up(x)
        return self.w_down(F.silu(gate) * up)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        norm = (lambda: nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)) if cfg.family == "gpt2" \
            else (lambda: RMSNorm(cfg.dim, cfg.norm_eps))
        self.attn_norm = norm()
        self.attn = Attention(cfg, layer)
        self.mlp_norm = norm()
        self.mlp = MLP(cfg)

    def forward(self, x, rope, attend):
        x = x + self.attn(self.attn_norm(x), rope, attend)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        if cfg.family == "gpt2":
            self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.dim)   # learned positions
        else:
            self.register_buffer("rope_cos", torch.empty(0), persistent=False)
            self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps) if cfg.family == "gpt2" \
            else RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight   # one matrix reads and writes tokens
        self.init_rope()

    # RoPE tables are built for the positions runs reach, not for the whole context a checkpoint
    # claims: a file may claim 5·10^7 positions (9.9 GB of tables) it will never be run at.
    ROPE_START = 4096

    def init_rope(self, positions: int | None = None) -> None:
        """RoPE angles for positions 0 … n-1, computed once: angle[p, i] = p · θ_i.

        n is `positions`, else the context up to ROPE_START; `ensure_rope` grows the tables
        when a run needs more. Each row depends only on its position, so a grown table holds
        the very numbers a full-size one would."""
        if self.cfg.family == "gpt2":
            return
        device = self.device
        if device.type == "meta":      # built without storage; the loader calls this again
            return
        n = min(self.cfg.max_seq_len, positions or self.ROPE_START)
        inv_freq = rope_frequencies(self.cfg)
        angles = torch.outer(torch.arange(n, dtype=torch.float32), inv_freq)
        angles = torch.cat((angles, angles), dim=-1).to(device)        # (n, hd)
        # Kept in the model's dtype, so no step converts them again.
        dtype = self.dtype
        self.rope_cos, self.rope_sin = angles.cos().to(dtype), angles.sin().to(dtype)

    def ensure_rope(self, positions: int) -> None:
        """Make the RoPE tables cover positions 0 … positions-1 (at most the context).

        A step that reads the tables by address (the C step) or inside a captured graph cannot
        see them grow: whoever builds one calls this first, for every position it will use."""
        if self.cfg.family == "gpt2" or self.rope_cos.shape[0] >= min(positions,
                                                                      self.cfg.max_seq_len):
            return
        self.init_rope(max(positions, 2 * self.rope_cos.shape[0]))   # doubling: few rebuilds

    # The final norm's gain tells where the model lives and in which dtype it computes: every
    # family has one, and unlike the embedding it is never stored quantised (engine/fast).
    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.norm.weight.dtype

    def forward(self, tokens: torch.Tensor, start_pos: int | torch.Tensor, attend: Attend,
                last_only: bool = False, positions: torch.Tensor | None = None,
                rows: torch.Tensor | None = None, residuals: list | None = None) -> torch.Tensor:
        """tokens: (B, T) ids at positions start_pos … start_pos+T-1. Returns float32 logits,
        (B, T, vocab), or (B, 1, vocab) with `last_only` — during generation only the last
        position's prediction is used, and the LM head is the largest matmul in a small model.

        `start_pos` may also be a one-element integer tensor on the model's device: then no
        Python number depends on the position, which is what a captured CUDA graph or a
        compiled decode step needs to replay at every position (the caller checks the length).

        A packed batch (engine/runner.py) lays several sequences' new tokens side by side in one
        row, tokens (1, T): then `positions` (T,) gives each token its own position (start_pos
        is ignored), and `rows` (R,) picks the tokens whose predictions are wanted — logits
        (1, R, vocab). Everything but attention treats tokens independently, so only the
        positions and the `attend` door need to know where one sequence ends.

        `residuals`: a list to collect the residual stream after each block, (B, T, dim) each —
        what the logit lens reads (engine/stepping.py). The blocks never modify x in place, so
        these are references to tensors the forward makes anyway; None (the default) costs one
        test per layer.
        """
        B, T = tokens.shape
        x = self.tok_emb(tokens)                                      # (B, T, dim)
        if positions is not None:
            pos = positions                                            # (T,) one per token
        elif isinstance(start_pos, torch.Tensor):
            pos = start_pos + torch.arange(T, device=tokens.device)    # (T,)
        else:
            if start_pos + T > self.cfg.max_seq_len:
                raise ValueError(f"sequence of {start_pos + T} tokens is longer than the model's "
                                 f"context of {self.cfg.max_seq_len}")
            pos = slice(start_pos, start_pos + T)
            if self.cfg.family != "gpt2":
                self.ensure_rope(start_pos + T)
        rope = None
        if self.cfg.family == "gpt2":
            x = x + self.pos_emb.weight[pos]                          # (T, dim) broadcast over B
        else:
            rope = (self.rope_cos[pos], self.rope_sin[pos])           # (T, hd) each
        for block in self.layers:
            x = block(x, rope, attend)
            if residuals is not None:
                residuals.append(x)
        if last_only:
            x = x[:, -1:, :]
        elif rows is not None:
            x = x[:, rows, :]                                         # (B, R, dim)
        return self.readout(x)                                        # (B, T, vocab)

    def readout(self, x: torch.Tensor) -> torch.Tensor:
        """Residual stream → float32 logits: the final norm, then the LM head. Applied to the
        last block's output it is the model's prediction; applied to an earlier block's, it is
        that layer's "logit lens" view of what comes next."""
        return self.lm_head(self.norm(x)).float()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def weight_bytes(self) -> int:
        """Bytes of distinct weight tensors (a tied head counts once)."""
        seen, total = set(), 0
        for p in self.parameters():
            if p.data_ptr() not in seen:
                seen.add(p.data_ptr())
                total += p.numel() * p.element_size()
        return total
