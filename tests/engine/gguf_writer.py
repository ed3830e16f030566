"""Write a tiny llama-architecture GGUF from a Hugging Face model, as llama.cpp's converter does.

Used by the loader tests: it exercises the GGUF metadata, the dequantiser (F32 and Q8_0) and the
Q/K permutation without the 98 MB embedded file.
"""

from __future__ import annotations

import numpy as np
import torch


def permute_like_llama_cpp(w: torch.Tensor, n_heads: int) -> np.ndarray:
    """llama.cpp's convert script interleaves each head's rotary halves: (x0..,y0..) → (x0,y0,…)."""
    out_dim, in_dim = w.shape
    return (w.reshape(n_heads, 2, out_dim // n_heads // 2, in_dim).swapaxes(1, 2)
            .reshape(out_dim, in_dim).numpy())


def write_tiny_llama_gguf(path, hf_model, tokens: list[str], quantize_embeddings=False) -> None:
    import gguf
    cfg = hf_model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([1] * len(tokens))
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_merges([])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    sd = hf_model.state_dict()
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
             "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    emb = sd["model.embed_tokens.weight"].numpy()
    if quantize_embeddings:
        q = gguf.quants.quantize(emb, gguf.GGMLQuantizationType.Q8_0)
        w.add_tensor("token_embd.weight", q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    else:
        w.add_tensor("token_embd.weight", emb)
    for i in range(cfg.num_hidden_layers):
        for hf, g in names.items():
            t = sd[f"model.layers.{i}.{hf}.weight"]
            if g == "attn_q":
                arr = permute_like_llama_cpp(t, cfg.num_attention_heads)
            elif g == "attn_k":
                arr = permute_like_llama_cpp(t, cfg.num_key_value_heads)
            else:
                arr = t.numpy()
            w.add_tensor(f"blk.{i}.{g}.weight", np.ascontiguousarray(arr))
    w.add_tensor("output_norm.weight", sd["model.norm.weight"].numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
