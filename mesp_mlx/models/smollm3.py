"""SmolLM3: the Llama block, with RoPE left out of some layers ("NoPE"). `no_rope_layers[i]` is 1 where layer i
*uses* RoPE and 0 where it does not (the name notwithstanding); without the list, every `no_rope_layer_interval`-th
layer (1-based; default 4) goes without."""
from .base import Family, common, linear_scaling


def model_args(config):
    if config.get("mlp_bias"):
        raise ValueError("smollm3 models with mlp_bias are not supported")
    n = config["num_hidden_layers"]
    uses = config.get("no_rope_layers")
    if uses is None:
        interval = config.get("no_rope_layer_interval", 4)
        uses = [int((i + 1) % interval != 0) for i in range(n)]
    if len(uses) != n:
        raise ValueError(f"no_rope_layers lists {len(uses)} layers, the model has {n}")
    return common(config, head_dim=config.get("head_dim"),
                  tie_word_embeddings=config.get("tie_word_embeddings", True),
                  rope_layers=tuple(bool(u) for u in uses))


# llama.cpp's fixed choice that its files do not record: layers 4, 8, ... (1-based) go without RoPE
GGUF_NO_ROPE_INTERVAL = 4


def gguf_config(meta, config):
    """The SmolLM3 fields of a smollm3 GGUF (written by llama.cpp's Llama converter, q/k rows permuted)."""
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    rope_dims = meta.get("rope.dimension_count")
    if rope_dims is not None and int(rope_dims) != head_dim:
        raise ValueError(f"smollm3 rope.dimension_count {rope_dims} is not the head size {head_dim}")
    out = {"no_rope_layer_interval": GGUF_NO_ROPE_INTERVAL}
    scaling = linear_scaling(meta)
    if scaling:
        out["rope_scaling"] = scaling
    return out


FAMILY = Family(("smollm3",), "smollm3", "SmolLM3ForCausalLM", permutes_qk=True,
                stop_tokens=("<|im_end|>", "<|end_of_text|>"), gguf_config=gguf_config)
