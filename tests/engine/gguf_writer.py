"""Write tiny GGUF files from Hugging Face models, as llama.cpp's converter does — and break them.

Used by the loader tests: it exercises the GGUF metadata, the dequantiser (F32 and Q8_0), the
Q/K permutation (Llama) and the Conv1D transposes (GPT-2) without the 98 MB embedded file.
`gguf_parts` returns the metadata and tensors as plain dicts, so a test can make them lie (a
huge block_count, a missing head count, a float where an integer belongs) before `write_gguf`.
"""

from __future__ import annotations

import numpy as np
import torch


def permute_like_llama_cpp(w: torch.Tensor, n_heads: int) -> np.ndarray:
    """llama.cpp's convert script interleaves each head's rotary halves: (x0..,y0..) → (x0,y0,…)."""
    out_dim, in_dim = w.shape
    return (w.reshape(n_heads, 2, out_dim // n_heads // 2, in_dim).swapaxes(1, 2)
            .reshape(out_dim, in_dim).numpy())


def byte_tokens() -> list[str]:
    """The 256 byte-level tokens (no merges): every string can be encoded."""
    return sorted(__import__("tokenizers").pre_tokenizers.ByteLevel.alphabet())


def tokenizer_meta(tokens: list[str], merges: list[str] | None = None, eos: int = 1,
                   bos: int = 0) -> dict:
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt2",
            "tokenizer.ggml.tokens": list(tokens), "tokenizer.ggml.token_type": [1] * len(tokens),
            "tokenizer.ggml.bos_token_id": bos, "tokenizer.ggml.eos_token_id": eos}
    if merges:
        meta["tokenizer.ggml.merges"] = list(merges)
    return meta


def gguf_parts(hf_model, tokens: list[str], quantize_embeddings: bool = False):
    """(architecture, metadata, tensors) for a Llama or GPT-2 Hugging Face model, named and laid
    out as llama.cpp writes them. Tensors are float32 arrays, or (bytes, type) when quantised."""
    import gguf
    cfg = hf_model.config
    sd = {k: v.detach() for k, v in hf_model.state_dict().items()}
    tensors: dict = {}
    if cfg.model_type == "gpt2":
        arch = "gpt2"
        meta = {"gpt2.block_count": cfg.n_layer, "gpt2.context_length": cfg.n_positions,
                "gpt2.embedding_length": cfg.n_embd,
                "gpt2.feed_forward_length": cfg.n_inner or 4 * cfg.n_embd,
                "gpt2.attention.head_count": cfg.n_head,
                "gpt2.attention.layer_norm_epsilon": float(cfg.layer_norm_epsilon)}
        sd = {k.removeprefix("transformer."): v for k, v in sd.items()}
        tensors["token_embd.weight"] = sd["wte.weight"].numpy()
        tensors["position_embd.weight"] = sd["wpe.weight"].numpy()
        names = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output",
                 "ln_2": "ffn_norm", "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
        for i in range(cfg.n_layer):
            for hf, g in names.items():
                w = sd[f"h.{i}.{hf}.weight"]
                # Conv1D stores (in, out); llama.cpp writes every matrix as (out, in).
                tensors[f"blk.{i}.{g}.weight"] = (w.t() if "ln" not in hf else w).contiguous().numpy()
                tensors[f"blk.{i}.{g}.bias"] = sd[f"h.{i}.{hf}.bias"].numpy()
        tensors["output_norm.weight"] = sd["ln_f.weight"].numpy()
        tensors["output_norm.bias"] = sd["ln_f.bias"].numpy()
        tensors["output.weight"] = sd["wte.weight"].numpy()     # llama.cpp writes the tie twice
    else:
        arch = "llama"
        meta = {"llama.block_count": cfg.num_hidden_layers,
                "llama.context_length": cfg.max_position_embeddings,
                "llama.embedding_length": cfg.hidden_size,
                "llama.feed_forward_length": cfg.intermediate_size,
                "llama.attention.head_count": cfg.num_attention_heads,
                "llama.attention.head_count_kv": cfg.num_key_value_heads,
                "llama.attention.layer_norm_rms_epsilon": float(cfg.rms_norm_eps),
                "llama.rope.freq_base": 10000.0}
        names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                 "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                 "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
                 "post_attention_layernorm": "ffn_norm"}
        emb = sd["model.embed_tokens.weight"].numpy()
        if quantize_embeddings:
            q = gguf.quants.quantize(emb, gguf.GGMLQuantizationType.Q8_0)
            tensors["token_embd.weight"] = (q, gguf.GGMLQuantizationType.Q8_0)
        else:
            tensors["token_embd.weight"] = emb
        for i in range(cfg.num_hidden_layers):
            for hf, g in names.items():
                t = sd[f"model.layers.{i}.{hf}.weight"]
                if g == "attn_q":
                    arr = permute_like_llama_cpp(t, cfg.num_attention_heads)
                elif g == "attn_k":
                    arr = permute_like_llama_cpp(t, cfg.num_key_value_heads)
                else:
                    arr = t.numpy()
                tensors[f"blk.{i}.{g}.weight"] = np.ascontiguousarray(arr)
        tensors["output_norm.weight"] = sd["model.norm.weight"].numpy()
    meta.update(tokenizer_meta(tokens))
    return arch, meta, tensors


def write_gguf(path, arch: str, meta: dict, tensors: dict) -> None:
    """Write metadata (ints as uint32, floats as float32, str, bool, lists) and tensors."""
    import gguf
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in meta.items():
        if key == "general.architecture":
            continue                                  # the writer adds it from `arch`
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            (w.add_uint64 if value >= 2**32 else w.add_uint32)(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, list):
            w.add_array(key, value)
        else:
            raise TypeError(f"cannot write {key}={value!r}")
    for name, t in tensors.items():
        if isinstance(t, tuple):
            data, kind = t
            w.add_tensor(name, data, raw_dtype=kind)
        else:
            w.add_tensor(name, np.ascontiguousarray(t, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_tiny_llama_gguf(path, hf_model, tokens: list[str], quantize_embeddings=False) -> None:
    arch, meta, tensors = gguf_parts(hf_model, tokens, quantize_embeddings)
    write_gguf(path, arch, meta, tensors)
