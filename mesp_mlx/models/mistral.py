"""Mistral (7B v0.1-v0.3, Nemo, Small): the Llama block. `sliding_window`, where set (v0.1: 4096), limits every
layer's attention to that many latest keys, as Hugging Face's Mistral does; `layer_types` (mlx-lm's Llama reading)
may instead name the sliding layers one by one."""
from .base import SLIDING, Family, common, layer_types_from

# llama.cpp has no mistral architecture: its Llama converter writes these models as `llama`, q/k rows permuted
FAMILY = Family(("mistral",), "llama", "MistralForCausalLM", permutes_qk=True,
                stop_tokens=("</s>", "<|im_end|>"))  # ChatML fine-tunes keep model_type mistral


def model_args(config):
    if config.get("mlp_bias"):
        raise ValueError("mistral models with mlp_bias are not supported")
    n, window = config["num_hidden_layers"], config.get("sliding_window")
    types = layer_types_from(config, n)
    if types is None and window:
        types = (SLIDING,) * n
    return common(config, head_dim=config.get("head_dim"),
                  tie_word_embeddings=config.get("tie_word_embeddings", False),
                  sliding_window=window if types and SLIDING in types else None, layer_types=types)
