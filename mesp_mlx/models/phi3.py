"""Phi-3 / Phi-3.5-mini / Phi-4-mini: the Llama block with merged projections, `self_attn.qkv_proj` (q rows, then k,
then v) and `mlp.gate_up_proj` (gate rows, then up), which are what a LoRA adapts, as in mlx-lm. The head size is
always hidden_size / heads; RoPE may rotate only part of each head (`partial_rotary_factor`) and may be LongRoPE
(`longrope` / `su` scaling, read as mlx-lm reads it) or linear."""
import numpy as np

from .base import Family, common, linear_scaling


def model_args(config):
    scaling = config.get("rope_scaling")
    kind = (scaling or {}).get("type") or (scaling or {}).get("rope_type")
    if scaling and kind not in ("longrope", "su", "linear"):
        raise ValueError(f"phi3 rope_scaling type {kind!r} is not supported (supported: longrope, su, linear)")
    if scaling and kind in ("longrope", "su") and "long_factor" not in scaling:
        raise ValueError("phi3 rope_scaling of type longrope needs long_factor")
    heads = config["num_attention_heads"]
    config = dict(config, max_position_embeddings=config.get("max_position_embeddings", 131072))
    return common(config, head_dim=config["hidden_size"] // heads,
                  tie_word_embeddings=config.get("tie_word_embeddings", False),
                  original_max_position_embeddings=config.get("original_max_position_embeddings", 4096),
                  partial_rotary_factor=config.get("partial_rotary_factor", 1.0), merged_projections=True)


# tensors of a phi3 GGUF read into the config rather than stored as weights: LongRoPE's factors (long, short)
ROPE_FACTORS = ("rope_factors_long.weight", "rope_factors_short.weight")


def gguf_config(meta, config):
    """The Phi-3 fields of a phi3 GGUF (llama.cpp's Phi3MiniModel converter keeps the merged projections, unpermuted:
    it runs Phi-3 with the NeoX rope): the head size is hidden / heads, the rotated features per head are
    rope.dimension_count, LongRoPE's factors are the rope_factors_* tensors."""
    if "blk.0.attn_qkv.weight" not in meta.names and "blk.0.attn_q.weight" in meta.names:
        raise ValueError("phi3 GGUF with separate attn_q/attn_k/attn_v tensors is not supported "
                         "(llama.cpp's converter writes the merged attn_qkv)")
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    rope_dims = int(meta.get("rope.dimension_count", head_dim))
    if rope_dims > head_dim or rope_dims % 2 or int(head_dim * (rope_dims / head_dim)) != rope_dims:
        raise ValueError(f"phi3 rope.dimension_count {rope_dims} does not fit the head size {head_dim}")
    out = {"partial_rotary_factor": rope_dims / head_dim,
           "original_max_position_embeddings": meta.get("rope.scaling.original_context_length",
                                                        config["max_position_embeddings"]),
           "rope_scaling": linear_scaling(meta)}
    window = meta.get("attention.sliding_window")
    if window:  # Phi-3-mini's (llama.cpp writes 0 for none); mlx-lm's Phi-3 and ours attend to every key anyway
        out["sliding_window"] = int(window)
    factors = [n for n in ROPE_FACTORS if n in meta.names]
    if factors:
        if len(factors) != 2:
            raise ValueError(f"phi3 GGUF has {factors} but not both {', '.join(ROPE_FACTORS)}")
        long, short = (meta.array(n).astype(np.float32).reshape(-1).tolist() for n in ROPE_FACTORS)
        if len(long) != rope_dims // 2 or len(short) != rope_dims // 2:
            raise ValueError(f"phi3 rope factors have {len(long)} / {len(short)} entries, expected {rope_dims // 2}")
        scaling = {"type": "longrope", "long_factor": long, "short_factor": short}
        # llama.cpp's attention factor is sqrt(1 + ln(s) / ln(original)) for s = max / original, which is what
        # mlx-lm (and we) compute from the config; a file that says otherwise is followed
        attn, orig = meta.get("rope.scaling.attn_factor"), out["original_max_position_embeddings"]
        s = config["max_position_embeddings"] / orig
        expected = float(np.sqrt(1 + np.log(s) / np.log(orig))) if s > 1 else 1.0
        if attn is not None and abs(float(attn) - expected) > 1e-6 * expected:
            scaling["long_mscale"] = float(attn)
        out["rope_scaling"] = scaling
    if out["rope_scaling"] is None:
        del out["rope_scaling"]
    return out


# the merged projections keep their Hugging Face layout in llama.cpp's files: attn_qkv (q, k, v rows) and ffn_up
# (gate rows, then up rows)
FAMILY = Family(("phi3",), "phi3", "Phi3ForCausalLM",
                gguf_names={"attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"},
                stop_tokens=("<|end|>", "<|endoftext|>"), gguf_config=gguf_config, gguf_config_tensors=ROPE_FACTORS)
