"""Phi-3 / Phi-3.5-mini / Phi-4-mini: the Llama block with fused projections, `self_attn.qkv_proj` (q rows, then k,
then v) and `mlp.gate_up_proj` (gate rows, then up), which are what a LoRA adapts, as in mlx-lm. The head size is
always hidden_size / heads; RoPE may rotate only part of each head (`partial_rotary_factor`) and may be LongRoPE
(`longrope` / `su` scaling, read as mlx-lm reads it) or linear."""
from .base import common


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
                  partial_rotary_factor=config.get("partial_rotary_factor", 1.0), fused_projections=True)
