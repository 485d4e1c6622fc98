"""Qwen3.5 (dense): three linear-attention blocks (the gated delta rule, ops/gated_delta.py) in every four, then one
full-attention block with per-head q/k norms, RoPE on a part of each head and an output gate (q_proj gives per
head [q | gate]). Layer i is full attention when (i + 1) % full_attention_interval == 0.

Checkpoints come in three forms, all read here: Hugging Face's multimodal `qwen3_5` (the language model under
`text_config`, tensors `model.language_model.*` beside a vision tower and an MTP head, norms stored zero-centred,
conv1d [C, 1, K]), its text-only `qwen3_5_text`, and mlx-lm's (`language_model.model.*`, or a flat config as our own
stores write it, norms already the multiplier, conv1d [C, K, 1]). As mlx-lm's sanitize does, a conv1d whose last
axis is not 1 marks the Hugging Face form, whose norms get their 1 added (all but the gated norm
`linear_attn.norm`, which multiplies as it is). Stores keep mlx-lm's form under a flat config of model_type
`qwen3_5` (mlx-lm has no `qwen3_5_text` module). RoPE comes from `rope_parameters`; its multimodal sections rotate
every axis by the same position for text, which is 1-D RoPE, as mlx-lm reads it. Defaults are mlx-lm's, so both
read a sparse config the same way. MoE checkpoints (`num_experts`) are not this family.

A store converted from a GGUF whose ssm_out blocks are wider than a value head (a K-quant's 256 weights, Dv = 128)
keeps that matrix's columns in llama.cpp's tiled value-head order, which no block format lets us regroup exactly;
its config says so (TILED_KEY) and the block permutes out_proj's input to match (DeltaSpec.out_tiled). mlx-lm
cannot read such a store; adapters leave it in mlx-lm's order (io/adapters.py).
"""
from .base import FULL, LINEAR, Family, ModelArgs

# mlx-lm's TextModelArgs defaults, for the fields a config may leave out
DEFAULTS = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                rms_norm_eps=1e-6, vocab_size=151936, num_key_value_heads=8, max_position_embeddings=131072,
                linear_num_value_heads=64, linear_num_key_heads=16, linear_key_head_dim=192,
                linear_value_head_dim=128, linear_conv_kernel_dim=4, tie_word_embeddings=False,
                full_attention_interval=4)
DEFAULT_ROPE = {"type": "default", "rope_theta": 100000.0, "partial_rotary_factor": 0.25}
ROPE_TYPES = ("default", "mrope", "linear")
# the norms Hugging Face stores as w for a multiplier 1 + w (the gated norm linear_attn.norm is not one of them)
SHIFTED_NORMS = ("input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_norm.weight",
                 "self_attn.k_norm.weight")
# mlx-lm's module tree: Model.language_model (TextModel) .model (the blocks) .layers
MLX_LM_PREFIX = "language_model."
# a store's config key: out_proj's columns are in llama.cpp's tiled value-head order (see the module docstring)
TILED_KEY = "value_heads_tiled_out_proj"


def text_weight(name):
    """A checkpoint's tensor name in the store's naming (`model.layers.N...`, `model.norm`, `lm_head`), or None
    for the vision tower and the multi-token-prediction head."""
    if name.startswith(("model.visual.", "visual.", "vision_tower.", "model.vision_tower.")) \
            or "mtp" in name.split("."):
        return None
    for prefix, repl in (("model.language_model.", "model."), ("language_model.model.", "model."),
                         ("language_model.", "")):
        if name.startswith(prefix):
            return repl + name[len(prefix):]
    return name


def text_config(config):
    """Any of the three configs as the flat `qwen3_5` config a store keeps (mlx-lm reads it as its own). The head's
    tying is the language model's (mlx-lm reads text_config's), else the top level's; mlx-lm's quantization entry
    (top level) comes along with its per-module keys in the store's naming."""
    if "text_config" in config:
        text = dict(config["text_config"] or {})
        if "tie_word_embeddings" not in text and "tie_word_embeddings" in config:
            text["tie_word_embeddings"] = config["tie_word_embeddings"]
    else:
        text = dict(config)
    text["model_type"] = FAMILY.model_type
    for key in ("quantization", "quantization_config"):
        if isinstance(config.get(key), dict):
            text[key] = _quant_entries(config[key])
    return text


def _quant_entries(q):
    """mlx-lm's quantization entry with its per-module keys (dict or bool values) in the store's naming; the
    vision tower's and MTP head's dropped."""
    out = {}
    for k, v in q.items():
        if isinstance(v, (dict, bool)):
            name = text_weight(k + ".weight")
            if name is None:
                continue
            k = name[:-len(".weight")]
        out[k] = v
    return out


def sanitizer(shapes):
    """f(store name, array) -> the array in mlx-lm's form, for a checkpoint whose tensors (store naming) have
    `shapes`: conv1d [C, 1, K] -> [C, K, 1], and the norms of a Hugging Face checkpoint (told by such a conv1d)
    shifted by 1 in their own dtype, as mlx-lm's sanitize computes them."""
    hf = any(n.endswith("conv1d.weight") and s[-1] != 1 for n, s in shapes.items())

    def fix(name, arr):
        if name.endswith("conv1d.weight") and arr.shape[-1] != 1:
            return arr.swapaxes(1, 2)
        if hf and arr.ndim == 1 and (name == "model.norm.weight" or name.endswith(SHIFTED_NORMS)):
            return arr + 1.0
        return arr
    return fix


def rope_parameters(c):
    """(rope_theta, partial_rotary_factor, rope_scaling) from `rope_parameters`, which is all mlx-lm reads."""
    params = c.get("rope_parameters")
    if params is None:
        if c.get("rope_theta") is not None:  # mlx-lm would ignore it and rotate with base 100000
            raise ValueError("rope_theta without rope_parameters: qwen3_5 configs give rope_theta inside "
                             "rope_parameters (mlx-lm reads it only there)")
        params = DEFAULT_ROPE
    kind = params.get("type") or params.get("rope_type") or "default"
    if kind not in ROPE_TYPES:
        raise ValueError(f"rope_parameters type {kind!r} is not supported for qwen3_5 "
                         f"(supported: {', '.join(ROPE_TYPES)})")
    if kind == "mrope" and len(params.get("mrope_section", [])) != 3:
        raise ValueError("rope_parameters of type mrope need three mrope_section entries")
    scaling = {"type": "linear", "factor": params["factor"]} if kind == "linear" else None
    return params.get("rope_theta", 100000.0), params.get("partial_rotary_factor", 0.25), scaling


def model_args(config):
    given = text_config(config)
    c = dict(DEFAULTS, **{k: v for k, v in given.items() if v is not None})
    if c.get("num_experts"):
        raise ValueError(f"num_experts {c['num_experts']}: mixture-of-experts Qwen3.5 models are not supported "
                         "(dense ones only)")
    n, interval = c["num_hidden_layers"], c["full_attention_interval"]
    kinds = tuple(FULL if (i + 1) % interval == 0 else LINEAR for i in range(n))
    listed = c.get("layer_types")
    if listed is not None and tuple(listed) != kinds:  # mlx-lm builds its layers from the interval alone
        raise ValueError(f"layer_types disagree with full_attention_interval {interval}")
    if c.get("attention_bias"):
        raise ValueError("qwen3_5 models with attention_bias are not supported")
    if c.get("attn_output_gate") is False:
        raise ValueError("qwen3_5 models without attn_output_gate are not supported (mlx-lm has none)")
    theta, factor, scaling = rope_parameters(c)
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    if int(head_dim * factor) % 2:
        raise ValueError(f"partial_rotary_factor {factor} of head_dim {head_dim} is an odd number of features")
    return ModelArgs(
        model_type=FAMILY.model_type, hidden_size=c["hidden_size"], num_hidden_layers=n,
        intermediate_size=c["intermediate_size"], num_attention_heads=c["num_attention_heads"],
        num_key_value_heads=c["num_key_value_heads"], vocab_size=c["vocab_size"], rms_norm_eps=c["rms_norm_eps"],
        head_dim=head_dim, rope_theta=theta, rope_scaling=scaling, partial_rotary_factor=factor,
        max_position_embeddings=c["max_position_embeddings"], tie_word_embeddings=c["tie_word_embeddings"],
        qk_norm=True, attn_output_gate=True, layer_types=kinds,
        linear_num_key_heads=c["linear_num_key_heads"], linear_num_value_heads=c["linear_num_value_heads"],
        linear_key_head_dim=c["linear_key_head_dim"], linear_value_head_dim=c["linear_value_head_dim"],
        linear_conv_kernel_dim=c["linear_conv_kernel_dim"], linear_out_tiled=bool(c.get(TILED_KEY)))


# llama.cpp's qwen35 names (its attn_q holds each head's query and gate rows, as q_proj does); its GGUF bases and
# LoRAs carry the value heads reordered (io/qwen35_gguf.py reads and writes them); transformers' multimodal class
# keeps the language model's layers under model.language_model
FAMILY = Family(("qwen3_5", "qwen3_5_text"), "qwen35", "Qwen3_5ForConditionalGeneration",
                gguf_names={"attn_qkv": "linear_attn.in_proj_qkv", "attn_gate": "linear_attn.in_proj_z",
                            "ssm_beta": "linear_attn.in_proj_b", "ssm_alpha": "linear_attn.in_proj_a",
                            "ssm_out": "linear_attn.out_proj", "post_attention_norm": "post_attention_layernorm"},
                stop_tokens=("<|im_end|>",), mlx_lm_prefix=MLX_LM_PREFIX, gguf_io="qwen35_gguf",
                hf_layers="model.language_model.layers.")
