"""Qwen2 / Qwen2.5: biases on q, k and v (never on o), head tied or not."""
from .base import Family, common

FAMILY = Family(("qwen2",), "qwen2", "Qwen2ForCausalLM", stop_tokens=("<|im_end|>", "<|endoftext|>"))


def model_args(config):
    return common(config, tie_word_embeddings=config.get("tie_word_embeddings", True))
