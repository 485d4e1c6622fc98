"""Qwen2 / Qwen2.5: biases on q, k and v (never on o), head tied or not."""
from .base import common


def model_args(config):
    return common(config, tie_word_embeddings=config.get("tie_word_embeddings", True), attention_bias=True)
