"""Llama family (Llama 2/3.x, SmolLM2, TinyLlama): optional attention bias, optional tied head, and, as mlx-lm
reads it, per-layer `layer_types` with a `sliding_window` for the sliding ones."""
from .base import SLIDING, Family, common, layer_types_from

# llama.cpp's Llama converter permutes q/k rows for its interleaved rope; Llama 3 ends a turn with <|eot_id|>,
# SmolLM2 (ChatML) with <|im_end|>
FAMILY = Family(("llama",), "llama", "LlamaForCausalLM", permutes_qk=True,
                stop_tokens=("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|im_end|>", "<|endoftext|>"))


def model_args(config):
    if config.get("mlp_bias"):
        raise ValueError("llama models with mlp_bias are not supported")
    types = layer_types_from(config, config["num_hidden_layers"])
    return common(config, head_dim=config.get("head_dim"),
                  tie_word_embeddings=config.get("tie_word_embeddings", True),
                  sliding_window=config.get("sliding_window") if types and SLIDING in types else None,
                  layer_types=types)
