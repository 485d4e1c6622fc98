"""What every supported architecture reduces to: dimensions, attention layout, norms, rope, windows and tying.

An architecture file turns a Hugging Face / mlx-lm `config.json` into `ModelArgs`; the block math is shared
(`ops/block.py`) because the families differ only in the switches held here. Some switches vary by layer (Gemma 3's
sliding-window layers with their own RoPE base, SmolLM3's layers without RoPE): `block_spec(compute, layer)` gives
the spec of one block and `block_specs(compute)` those of all of them.
"""
from dataclasses import dataclass, field
from typing import Callable, Optional

from ..ops.block import DELTA_PROJECTIONS, MERGED_PROJECTIONS, PROJECTIONS, BlockSpec
from ..ops.gated_delta import DeltaSpec
from ..ops.linear import DEFAULT
from ..ops.rope import rope_spec

SLIDING, FULL, LINEAR = "sliding_attention", "full_attention", "linear_attention"

# llama.cpp's names of the tensors (GGUF) -> mlx-lm / Hugging Face module paths, as its Llama converter writes them;
# a family lists only where its files differ (Family.gguf_names)
GGUF_NAMES = {
    "token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


@dataclass(frozen=True)
class Family:
    """What is true of one architecture outside its block math, in one place: every reader and writer of a foreign
    format (GGUF bases and LoRAs, PEFT, fused folders) asks this record and keeps no family knowledge of its own.
        model_types       the config model_type values the family's file reads; the first is the one it writes
        llamacpp_arch     general.architecture of llama.cpp's files for it, and of any LoRA llama.cpp applies to them
        hf_architecture   config.json's "architectures" entry (transformers, convert_hf_to_gguf.py and vLLM read it)
        gguf_names        llama.cpp tensor names where the family's GGUF differs from GGUF_NAMES
        permutes_qk       llama.cpp's converter permutes q/k rows for its interleaved rope (its Llama converter)
        gguf_norm_shift   llama.cpp stores every norm weight as shift + w (Gemma: the multiplier 1 + w)
        head_from_weights the head is tied exactly when the checkpoint has no lm_head.weight (mlx-lm's reading),
                          whatever tie_word_embeddings says
        stop_tokens       end-of-turn tokens a chat stops on besides eos (those absent from a vocabulary are skipped)
        gguf_config       family fields of a config read from a GGUF: f(meta, config) -> dict, where meta.get(key)
                          reads "<arch>.<key>", meta.names holds the tensor names, meta.array(name) one tensor;
                          raises ValueError on what it cannot read
        gguf_config_tensors  tensors gguf_config reads into the config (not weights)
        reads_gguf        our GGUF reader converts this family's base files (False: a file of its llamacpp_arch is
                          refused as unsupported)
        gguf_io           the module of mesp_mlx.io (by name) that knows this family's GGUF files where they need more
                          than renaming (Qwen3.5's `qwen35_gguf`: reordered value heads, A stored as -exp(A_log)):
                          its store_config, store_name, store_layout and store_transform read base files, its
                          write_lora / lora_from_gguf write and read GGUF LoRAs; None: io/gguf.py's generic reading
        peft              PEFT adapters of this family are written and read (False: refused in one line)
        hf_layers         where transformers' class (hf_architecture) keeps the decoder layers: PEFT's tensor names
                          start with it (Qwen3.5's multimodal class: `model.language_model.layers.`)
        mlx_lm_prefix     what mlx-lm's module tree puts before a store's module paths (Qwen3.5's `language_model.`):
                          adapter names carry it (mlx-lm loads adapters with strict=False, so a name without it
                          would be ignored silently)"""
    model_types: tuple
    llamacpp_arch: str
    hf_architecture: str
    gguf_names: dict = field(default_factory=dict)
    permutes_qk: bool = False
    gguf_norm_shift: float = 0.0
    head_from_weights: bool = False
    stop_tokens: tuple = ()
    gguf_config: Optional[Callable] = None
    gguf_config_tensors: tuple = ()
    reads_gguf: bool = True
    peft: bool = True
    mlx_lm_prefix: str = ""
    gguf_io: Optional[str] = None
    hf_layers: str = "model.layers."

    @property
    def model_type(self):
        return self.model_types[0]

    def gguf_to_hf(self):
        """llama.cpp tensor name -> module path, for this family's files."""
        return dict(GGUF_NAMES, **self.gguf_names)

    def hf_to_gguf(self):
        """module path -> llama.cpp tensor name (a Phi-3's gate_up_proj is its ffn_up)."""
        return {hf: g for g, hf in self.gguf_to_hf().items()}


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
    qk_norm: bool = False
    max_position_embeddings: int = 4096
    original_max_position_embeddings: Optional[int] = None  # LongRoPE's pre-extension length (Phi-3)
    partial_rotary_factor: float = 1.0  # the share of each head's features RoPE rotates (Phi-4-mini: 0.75)
    norm_offset: float = 0.0  # Gemma: norms multiply by 1 + w (the final norm too)
    sandwich_norms: bool = False  # Gemma: post-attention and post-MLP norms
    activation: str = "silu"
    attn_scale: Optional[float] = None  # None: head_dim ** -0.5
    embed_scale: float = 1.0  # Gemma: embeddings times sqrt(d), rounded as the reference rounds it
    sliding_window: Optional[int] = None
    layer_types: Optional[tuple] = None  # per layer SLIDING or FULL; None: all full
    rope_local_theta: Optional[float] = None  # Gemma: RoPE base of the sliding layers (unscaled there)
    rope_layers: Optional[tuple] = None  # per layer whether RoPE applies (SmolLM3); None: everywhere
    merged_projections: bool = False  # Phi-3: qkv_proj and gate_up_proj
    attn_output_gate: bool = False  # Qwen3.5's full-attention layers: q_proj gives per head [q | gate]
    # Qwen3.5's linear-attention layers (layer_types LINEAR): the gated delta rule's heads, head sizes, conv taps
    linear_num_key_heads: Optional[int] = None
    linear_num_value_heads: Optional[int] = None
    linear_key_head_dim: Optional[int] = None
    linear_value_head_dim: Optional[int] = None
    linear_conv_kernel_dim: int = 4
    # out_proj reads the value heads in llama.cpp's tiled order (a store from a GGUF whose ssm_out blocks are wider
    # than a value head, so its columns stay as the file has them; DeltaSpec.out_tiled)
    linear_out_tiled: bool = False

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"{self.num_attention_heads} query heads do not group over "
                             f"{self.num_key_value_heads} key/value heads")
        for name in ("layer_types", "rope_layers"):
            per_layer = getattr(self, name)
            if per_layer is not None and len(per_layer) != self.num_hidden_layers:
                raise ValueError(f"{name} lists {len(per_layer)} layers, the model has {self.num_hidden_layers}")
        if self.layer_types is not None and SLIDING in self.layer_types and not self.sliding_window:
            raise ValueError("sliding_attention layers need a sliding_window")
        if self.layer_types is not None and LINEAR in self.layer_types:
            hk, hv = self.linear_num_key_heads, self.linear_num_value_heads
            if not (hk and hv and self.linear_key_head_dim and self.linear_value_head_dim):
                raise ValueError("linear_attention layers need linear_num_key_heads, linear_num_value_heads, "
                                 "linear_key_head_dim and linear_value_head_dim")
            if hv % hk:
                raise ValueError(f"linear_num_value_heads {hv} is not a multiple of linear_num_key_heads {hk}")

    def sliding(self, layer):
        return self.layer_types is not None and self.layer_types[layer] == SLIDING

    def linear(self, layer):
        """Whether block `layer` mixes tokens by the gated delta rule (Qwen3.5's linear attention)."""
        return self.layer_types is not None and self.layer_types[layer] == LINEAR

    def delta_spec(self, compute=DEFAULT):
        return DeltaSpec(self.linear_num_key_heads, self.linear_num_value_heads, self.linear_key_head_dim,
                         self.linear_value_head_dim, self.linear_conv_kernel_dim, compute.delta_chunk,
                         self.linear_out_tiled)

    def block_spec(self, compute=DEFAULT, layer=0):
        """The spec of block `layer` (blocks differ in window, rope and mixer)."""
        if self.linear(layer):  # the head fields are the attention layers'; a delta block reads only `delta`
            return BlockSpec(self.num_attention_heads, self.num_key_value_heads, self.head_dim, self.rms_norm_eps,
                             None, compute=compute, delta=self.delta_spec(compute))
        dims = int(self.head_dim * self.partial_rotary_factor)
        sliding = self.sliding(layer)
        if self.rope_layers is not None and not self.rope_layers[layer]:
            rope = None
        elif sliding and self.rope_local_theta is not None:
            rope = rope_spec(dims, self.rope_local_theta, self.rope_traditional)
        else:
            rope = rope_spec(dims, self.rope_theta, self.rope_traditional, self.rope_scaling,
                             self.max_position_embeddings, self.original_max_position_embeddings)
        return BlockSpec(self.num_attention_heads, self.num_key_value_heads, self.head_dim, self.rms_norm_eps,
                         rope, self.qk_norm, compute, norm_offset=self.norm_offset, sandwich=self.sandwich_norms,
                         activation=self.activation, window=self.sliding_window if sliding else None,
                         scale=self.attn_scale, merged=self.merged_projections, output_gate=self.attn_output_gate)

    def block_specs(self, compute=DEFAULT):
        """One spec per block (the specs of equal blocks are shared)."""
        cache = {}
        out = []
        for i in range(self.num_hidden_layers):
            key = (self.layer_types[i] if self.layer_types is not None else FULL,
                   self.rope_layers[i] if self.rope_layers is not None else True)
            if key not in cache:
                cache[key] = self.block_spec(compute, i)
            out.append(cache[key])
        return tuple(out)

    def projections(self, layer=None):
        """The module paths a LoRA can adapt in block `layer`, in mlx-lm's naming; no layer: those of any block
        (Qwen3.5's linear and full-attention blocks have different ones), in a fixed order."""
        if layer is not None:
            return DELTA_PROJECTIONS if self.linear(layer) else \
                MERGED_PROJECTIONS if self.merged_projections else PROJECTIONS
        out = []
        for i in range(self.num_hidden_layers):
            out += [p for p in self.projections(i) if p not in out]
        return tuple(out)

    def projection_shapes(self, layer=None):
        """(in, out) of each projection a LoRA can adapt in block `layer`; no layer: of any block (a path two
        kinds of block share has the same shape in both)."""
        if layer is None:
            out = {}
            for i in range(self.num_hidden_layers):
                out.update(self.projection_shapes(i))
            return out
        d, f, hd = self.hidden_size, self.intermediate_size, self.head_dim
        mlp = {"mlp.gate_proj": (d, f), "mlp.up_proj": (d, f), "mlp.down_proj": (f, d)}
        if self.linear(layer):
            hk, hv = self.linear_num_key_heads, self.linear_num_value_heads
            keys, values = hk * self.linear_key_head_dim, hv * self.linear_value_head_dim
            return {"linear_attn.in_proj_qkv": (d, 2 * keys + values), "linear_attn.in_proj_z": (d, values),
                    "linear_attn.in_proj_b": (d, hv), "linear_attn.in_proj_a": (d, hv),
                    "linear_attn.out_proj": (values, d), **mlp}
        hq, hkv = self.num_attention_heads * hd, self.num_key_value_heads * hd
        if self.merged_projections:
            return {"self_attn.qkv_proj": (d, hq + 2 * hkv), "self_attn.o_proj": (hq, d),
                    "mlp.gate_up_proj": (d, 2 * f), "mlp.down_proj": (f, d)}
        q = 2 * hq if self.attn_output_gate else hq  # the gate's rows follow each head's query rows
        return {"self_attn.q_proj": (d, q), "self_attn.k_proj": (d, hkv), "self_attn.v_proj": (d, hkv),
                "self_attn.o_proj": (hq, d), **mlp}


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


def layer_types_from(config, n):
    """Hugging Face's per-layer `layer_types` (mlx-lm's Llama reads it too), validated; None when absent."""
    types = config.get("layer_types")
    if types is None:
        return None
    bad = sorted(set(types) - {SLIDING, FULL})
    if bad:
        raise ValueError(f"layer_types {bad} are not supported (supported: {SLIDING}, {FULL})")
    return tuple(types)


def linear_scaling(meta):
    """The rope_scaling of a GGUF whose only scaling llama.cpp records as metadata is linear; None if none."""
    kind, factor = meta.get("rope.scaling.type"), meta.get("rope.scaling.factor")
    if not kind or kind == "none":
        return None
    if kind != "linear":
        raise ValueError(f"GGUF rope scaling {kind!r} is not supported for this architecture (supported: linear)")
    return {"type": "linear", "factor": float(factor)}
