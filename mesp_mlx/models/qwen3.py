"""Qwen3 (dense): an RMSNorm on each head of q and of k before RoPE, explicit head_dim, no biases by default."""
from .base import Family, common

FAMILY = Family(("qwen3",), "qwen3", "Qwen3ForCausalLM", stop_tokens=("<|im_end|>", "<|endoftext|>"))


def model_args(config):
    return common(config, head_dim=config["head_dim"], tie_word_embeddings=config.get("tie_word_embeddings", True), qk_norm=True)
