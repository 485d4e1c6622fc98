"""SmolLM3: the Llama block, with RoPE left out of some layers ("NoPE"). `no_rope_layers[i]` is 1 where layer i
*uses* RoPE and 0 where it does not (the name notwithstanding); without the list, every `no_rope_layer_interval`-th
layer (1-based; default 4) goes without."""
from .base import common


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
                  attention_bias=config.get("attention_bias", False),
                  rope_layers=tuple(bool(u) for u in uses))
