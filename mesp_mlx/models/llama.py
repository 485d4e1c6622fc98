"""Llama family (Llama 2/3.x, SmolLM2, TinyLlama): optional attention bias, optional tied head."""
from .base import common


def model_args(config):
    if config.get("mlp_bias"):
        raise ValueError("llama models with mlp_bias are not supported")
    return common(config, head_dim=config.get("head_dim"),
                  tie_word_embeddings=config.get("tie_word_embeddings", True),
                  attention_bias=config.get("attention_bias", False))
