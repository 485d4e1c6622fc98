"""What every supported architecture reduces to: dimensions, attention layout, norms, rope and tying.

An architecture file turns a Hugging Face / mlx-lm `config.json` into `ModelArgs`; the block math is shared
(`ops/block.py`) because Llama, Qwen2 and Qwen3 differ only in the switches held here.
"""
from dataclasses import dataclass, field
from typing import Optional

from ..ops.block import BlockSpec
from ..ops.linear import DEFAULT
from ..ops.rope import rope_spec


@dataclass
class ModelArgs:
    model_type: str
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    rms_norm_eps: float
    head_dim: Optional[int] = None
    rope_theta: float = 10000.0
    rope_traditional: bool = False
    rope_scaling: Optional[dict] = None
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    qk_norm: bool = False
    max_position_embeddings: int = 4096
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"{self.num_attention_heads} query heads do not group over "
                             f"{self.num_key_value_heads} key/value heads")

    def block_spec(self, compute=DEFAULT):
        rope = rope_spec(self.head_dim, self.rope_theta, self.rope_traditional, self.rope_scaling,
                         self.max_position_embeddings)
        return BlockSpec(self.num_attention_heads, self.num_key_value_heads, self.head_dim, self.rms_norm_eps,
                         rope, self.qk_norm, compute)

    def projection_shapes(self):
        """(in, out) of each projection a LoRA can adapt."""
        d, f, hd = self.hidden_size, self.intermediate_size, self.head_dim
        return {"self_attn.q_proj": (d, self.num_attention_heads * hd),
                "self_attn.k_proj": (d, self.num_key_value_heads * hd),
                "self_attn.v_proj": (d, self.num_key_value_heads * hd),
                "self_attn.o_proj": (self.num_attention_heads * hd, d),
                "mlp.gate_proj": (d, f), "mlp.up_proj": (d, f), "mlp.down_proj": (f, d)}


def common(config, **kw):
    """The fields every family spells the same way."""
    return ModelArgs(
        model_type=config["model_type"],
        hidden_size=config["hidden_size"],
        num_hidden_layers=config["num_hidden_layers"],
        intermediate_size=config["intermediate_size"],
        num_attention_heads=config["num_attention_heads"],
        num_key_value_heads=config.get("num_key_value_heads") or config["num_attention_heads"],
        vocab_size=config["vocab_size"],
        rms_norm_eps=config.get("rms_norm_eps", 1e-6),
        rope_theta=config.get("rope_theta", 10000.0),
        rope_traditional=config.get("rope_traditional", False),
        rope_scaling=config.get("rope_scaling"),
        max_position_embeddings=config.get("max_position_embeddings", 4096),
        **kw,
    )
