"""Gemma 3 text (`gemma3_text`, and the language model inside a multimodal `gemma3` config).

Against Llama: norms multiply by 1 + w (the final norm too); four norms per block (input, post-attention on the
attention output, pre- and post-feedforward); per-head q/k norms; a GELU(tanh)-gated MLP; embeddings scaled by
sqrt(d), rounded to bf16 as mlx-lm rounds it; the attention scale from query_pre_attn_scalar; a tied head. Five of
every six layers (sliding_window_pattern) attend over a local window with their own RoPE base
(rope_local_base_freq, unscaled); the others are global with rope_theta and its scaling. Defaults are those of
mlx-lm's reading of a config (Gemma 3 1B's values), so both read a sparse config the same way.
"""
import mlx.core as mx

from .base import FULL, SLIDING, Family, ModelArgs, layer_types_from

DEFAULTS = dict(hidden_size=1152, num_hidden_layers=26, intermediate_size=6912, num_attention_heads=4,
                head_dim=256, rms_norm_eps=1e-6, vocab_size=262144, num_key_value_heads=1, rope_theta=1_000_000.0,
                rope_local_base_freq=10_000.0, query_pre_attn_scalar=256, sliding_window=512,
                sliding_window_pattern=6, max_position_embeddings=32768, rope_scaling=None)
GELU_NAMES = ("gelu_pytorch_tanh", "gelu_tanh", "gelu_approx")


def text_config(config):
    """A multimodal `gemma3` config's language model as a `gemma3_text` config (mlx-lm's defaults for the fields
    it leaves out: 8 heads, 4 key/value heads, vocabulary 262208 from the top level)."""
    if config.get("model_type") != "gemma3":
        return config
    text = dict(config.get("text_config") or {})
    text.setdefault("num_attention_heads", 8)
    text.setdefault("num_key_value_heads", 4)
    text["vocab_size"] = config.get("vocab_size", 262208)
    text["model_type"] = "gemma3_text"
    if "quantization" in config:  # an mlx-lm quantized checkpoint: its group size and bits hold for the text model
        text["quantization"] = config["quantization"]
    return text


def text_weight(name):
    """A multimodal checkpoint's tensor name in the text model's naming, or None for the vision parts."""
    for prefix, repl in (("language_model.model.", "model."), ("model.language_model.", "model."),
                         ("language_model.lm_head.", "lm_head."), ("language_model.", "")):
        if name.startswith(prefix):
            return repl + name[len(prefix):]
    if name.startswith(("vision_tower", "multi_modal_projector", "model.vision_tower",
                        "model.multi_modal_projector")):
        return None
    return name


def model_args(config):
    c = dict(DEFAULTS, **{k: v for k, v in text_config(config).items() if v is not None or k == "rope_scaling"})
    for cap in ("final_logit_softcapping", "attn_logit_softcapping"):
        if c.get(cap) is not None:
            raise ValueError(f"{cap}={c[cap]} is not supported for gemma3 (Gemma 3 checkpoints set none)")
    act = c.get("hidden_activation") or c.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in GELU_NAMES:
        raise ValueError(f"hidden_activation {act!r} is not supported for gemma3 (supported: gelu_pytorch_tanh)")
    n, pattern = c["num_hidden_layers"], c["sliding_window_pattern"]
    by_pattern = tuple(SLIDING if (i + 1) % pattern else FULL for i in range(n))
    listed = layer_types_from(c, n)
    if listed is not None and "sliding_window_pattern" in text_config(config) and listed != by_pattern:
        raise ValueError(f"layer_types disagree with sliding_window_pattern {pattern}")
    d = c["hidden_size"]
    return ModelArgs(
        model_type="gemma3_text", hidden_size=d, num_hidden_layers=n, intermediate_size=c["intermediate_size"],
        num_attention_heads=c["num_attention_heads"], num_key_value_heads=c["num_key_value_heads"],
        vocab_size=c["vocab_size"], rms_norm_eps=c["rms_norm_eps"], head_dim=c["head_dim"],
        rope_theta=c["rope_theta"], rope_scaling=c["rope_scaling"],
        max_position_embeddings=c["max_position_embeddings"], tie_word_embeddings=c.get("tie_word_embeddings", True),
        qk_norm=True, norm_offset=1.0, sandwich_norms=True, activation="gelu_tanh",
        attn_scale=c["query_pre_attn_scalar"] ** -0.5,
        embed_scale=mx.array(d ** 0.5, dtype=mx.bfloat16).item(),
        sliding_window=c["sliding_window"], layer_types=listed or by_pattern,
        rope_local_theta=c["rope_local_base_freq"])


# llama.cpp's fixed choices for Gemma 3 that its files do not record: five sliding layers in six, local RoPE base
GGUF_PATTERN, GGUF_LOCAL_BASE = 6, 10000.0


def gguf_config(meta, config):
    """The Gemma 3 fields of a gemma3 GGUF. llama.cpp scales attention by 1/sqrt(key_length), except for the 27B
    model (62 blocks), whose query_pre_attn_scalar is hidden_size / heads."""
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    out = {"head_dim": head_dim, "sliding_window": meta.get("attention.sliding_window", 4096),
           "sliding_window_pattern": GGUF_PATTERN, "rope_local_base_freq": GGUF_LOCAL_BASE,
           "query_pre_attn_scalar": (config["hidden_size"] // config["num_attention_heads"]
                                     if config["num_hidden_layers"] == 62 else head_dim),
           "hidden_activation": "gelu_pytorch_tanh"}
    kind, factor = meta.get("rope.scaling.type"), meta.get("rope.scaling.factor")
    if kind and kind != "none":
        out["rope_scaling"] = {"rope_type": kind, "factor": float(factor)}
    return out


# llama.cpp calls the text model `gemma3` (a multimodal checkpoint's too), names the pre-MLP norm ffn_norm and stores
# norms as 1 + w; mlx-lm unties the head when the checkpoint has one
FAMILY = Family(("gemma3_text", "gemma3"), "gemma3", "Gemma3ForCausalLM",
                gguf_names={"ffn_norm": "pre_feedforward_layernorm", "post_attention_norm": "post_attention_layernorm",
                            "post_ffw_norm": "post_feedforward_layernorm"},
                gguf_norm_shift=1.0, head_from_weights=True, stop_tokens=("<end_of_turn>", "<eos>"),
                gguf_config=gguf_config)
