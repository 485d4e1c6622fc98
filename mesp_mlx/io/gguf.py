"""GGUF files (llama.cpp) into mlx-lm-named arrays and a Hugging Face style config.

GGML-quantized tensors are kept exactly (ggml_types.py: repacked into MLX's affine format where a group of 32
represents the blocks, else kept as packed blocks); plain float matrices follow the run's precision choice.
We read tensors one at a time from the memory-mapped file, so a conversion never holds the whole model, and every
tensor the header lists is accounted for (`mx.load` silently drops some types).

Architectures: llama (also what llama.cpp makes of Mistral), qwen2, qwen3, gemma3, phi3 (also Phi-4-mini) and
smollm3. llama.cpp's Gemma 3 files name the pre-MLP norm `ffn_norm` (post_attention_layernorm in Llama files) and
store every norm weight as 1 + w, the multiplier itself; we store w, as the Hugging Face checkpoint and mlx-lm's
model have it.

Phi-3 files keep Hugging Face's fused projections as they are (`attn_qkv`: q, k, v rows; `ffn_up`: gate rows, then
up rows), with no q/k permutation (llama.cpp runs Phi-3 with the NeoX rope, as Hugging Face does). The rotated share
of each head is `phi3.rope.dimension_count`; LongRoPE's long and short factors are the tensors `rope_factors_long` /
`rope_factors_short`, which we read back into the config's rope_scaling (type longrope) instead of storing them as
weights. SmolLM3 files are written by llama.cpp's Llama converter, q/k rows permuted (read with the traditional rope,
as for Llama); they do not record which layers go without RoPE: llama.cpp fixes every fourth layer (1-based), and so
do we (`no_rope_layer_interval` 4).
"""
import numpy as np

import mlx.core as mx

from . import SourceError

NAMES = {
    "token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
# where an architecture's block tensors differ from the table above
ARCH_NAMES = {"gemma3": {"ffn_norm": "pre_feedforward_layernorm", "post_attention_norm": "post_attention_layernorm",
                         "post_ffw_norm": "post_feedforward_layernorm"},
              "phi3": {"attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"}}
ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma3", "phi3", "smollm3")
# architectures whose q/k rows llama.cpp's converter permutes for its interleaved ("normal") rope
PERMUTED = ("llama", "smollm3")
# llama.cpp's fixed choices for Gemma 3 that its files do not record: five sliding layers in six, local RoPE base
GEMMA3_PATTERN, GEMMA3_LOCAL_BASE = 6, 10000.0
# llama.cpp's fixed choice for SmolLM3 that its files do not record: layers 4, 8, ... (1-based) go without RoPE
SMOLLM3_NO_ROPE_INTERVAL = 4
# tensors read into the config rather than stored as weights: Phi-3's LongRoPE factors (long, short)
ROPE_FACTORS = ("rope_factors_long.weight", "rope_factors_short.weight")


def _gguf():
    """The gguf package, imported on first use so importing this module never needs it."""
    try:
        import gguf
    except ImportError:
        raise SourceError("reading GGUF files needs the 'gguf' package: pip install gguf") from None
    return gguf


def open_gguf(path):
    gguf = _gguf()
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:
        raise SourceError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


def field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    v = f.contents()
    return v


def hf_name(gguf_name, arch="llama"):
    parts = gguf_name.split(".")
    names = dict(NAMES, **ARCH_NAMES.get(arch, {}))
    if parts[0] == "blk":
        return f"model.layers.{parts[1]}.{names.get(parts[2], parts[2])}.{parts[3]}"
    return f"{names.get(parts[0], parts[0])}.{parts[1]}"


def norm_shift(reader):
    """What llama.cpp added to the norm weights of this file's architecture (Gemma: 1)."""
    return 1.0 if field(reader, "general.architecture") == "gemma3" else 0.0


def config_from_gguf(reader, path):
    arch = field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise SourceError(f"{path}: GGUF architecture {arch!r} is not supported (supported: "
                          f"{', '.join(ARCHITECTURES)})")
    g = lambda k, d=None: field(reader, f"{arch}.{k}", d)
    tokens = field(reader, "tokenizer.ggml.tokens") or []
    names = {t.name for t in reader.tensors}
    heads = g("attention.head_count")
    config = {
        "model_type": arch,
        "hidden_size": g("embedding_length"),
        "num_hidden_layers": g("block_count"),
        "intermediate_size": g("feed_forward_length"),
        "num_attention_heads": heads,
        "num_key_value_heads": g("attention.head_count_kv", heads),
        "rms_norm_eps": g("attention.layer_norm_rms_epsilon", 1e-6),
        "rope_theta": g("rope.freq_base", 10000.0),
        "max_position_embeddings": g("context_length", 4096),
        "vocab_size": g("vocab_size", len(tokens)) or len(tokens),
        "tie_word_embeddings": "output.weight" not in names,
        # llama.cpp's converter permutes Llama's (and SmolLM3's) q/k rows for its interleaved rope; with the
        # traditional layout the permuted weights give the original model exactly. Qwen and Phi-3 files are not
        # permuted.
        "rope_traditional": arch in PERMUTED,
    }
    if g("attention.key_length"):
        config["head_dim"] = g("attention.key_length")
    if arch == "gemma3":
        config.update(_gemma3_config(g, config))
    elif arch == "phi3":
        config.update(_phi3_config(reader, g, config, path))
    elif arch == "smollm3":
        config.update(_smollm3_config(g, config, path))
    if None in config.values():
        missing = [k for k, v in config.items() if v is None]
        raise SourceError(f"{path}: GGUF metadata lacks {missing}")
    return config


def _gemma3_config(g, config):
    """The Gemma 3 fields of a gemma3 GGUF. llama.cpp scales attention by 1/sqrt(key_length), except for the 27B
    model (62 blocks), whose query_pre_attn_scalar is hidden_size / heads."""
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    out = {"model_type": "gemma3_text", "head_dim": head_dim, "sliding_window": g("attention.sliding_window", 4096),
           "sliding_window_pattern": GEMMA3_PATTERN, "rope_local_base_freq": GEMMA3_LOCAL_BASE,
           "query_pre_attn_scalar": (config["hidden_size"] // config["num_attention_heads"]
                                     if config["num_hidden_layers"] == 62 else head_dim),
           "rope_traditional": False, "hidden_activation": "gelu_pytorch_tanh"}
    kind, factor = g("rope.scaling.type"), g("rope.scaling.factor")
    if kind and kind != "none":
        out["rope_scaling"] = {"rope_type": kind, "factor": float(factor)}
    return out


def _linear_scaling(g, path):
    """The rope_scaling of a file whose only other scaling llama.cpp records as metadata is linear; None if none."""
    kind, factor = g("rope.scaling.type"), g("rope.scaling.factor")
    if not kind or kind == "none":
        return None
    if kind != "linear":
        raise SourceError(f"{path}: GGUF rope scaling {kind!r} is not supported for this architecture "
                          "(supported: linear)")
    return {"type": "linear", "factor": float(factor)}


def _phi3_config(reader, g, config, path):
    """The Phi-3 fields of a phi3 GGUF (llama.cpp's Phi3MiniModel converter): the head size is hidden / heads, the
    rotated features per head are rope.dimension_count, LongRoPE's factors are the rope_factors_* tensors."""
    names = {t.name for t in reader.tensors}
    if "blk.0.attn_qkv.weight" not in names and "blk.0.attn_q.weight" in names:
        raise SourceError(f"{path}: phi3 GGUF with separate attn_q/attn_k/attn_v tensors is not supported "
                          "(llama.cpp's converter writes the fused attn_qkv)")
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    rope_dims = int(g("rope.dimension_count", head_dim))
    if rope_dims > head_dim or rope_dims % 2 or int(head_dim * (rope_dims / head_dim)) != rope_dims:
        raise SourceError(f"{path}: phi3 rope.dimension_count {rope_dims} does not fit the head size {head_dim}")
    out = {"partial_rotary_factor": rope_dims / head_dim,
           "original_max_position_embeddings": g("rope.scaling.original_context_length",
                                                 config["max_position_embeddings"]),
           "rope_scaling": _linear_scaling(g, path)}
    window = g("attention.sliding_window")
    if window:  # Phi-3-mini's (llama.cpp writes 0 for none); mlx-lm's Phi-3 and ours attend to every key anyway
        out["sliding_window"] = int(window)
    factors = {t.name: t for t in reader.tensors if t.name in ROPE_FACTORS}
    if factors:
        if len(factors) != 2:
            raise SourceError(f"{path}: phi3 GGUF has {sorted(factors)} but not both {', '.join(ROPE_FACTORS)}")
        long, short = (np.asarray(factors[n].data).astype(np.float32).reshape(-1).tolist() for n in ROPE_FACTORS)
        if len(long) != rope_dims // 2 or len(short) != rope_dims // 2:
            raise SourceError(f"{path}: phi3 rope factors have {len(long)} / {len(short)} entries, expected "
                              f"{rope_dims // 2}")
        scaling = {"type": "longrope", "long_factor": long, "short_factor": short}
        # llama.cpp's attention factor is sqrt(1 + ln(s) / ln(original)) for s = max / original, which is what
        # mlx-lm (and we) compute from the config; a file that says otherwise is followed
        attn, orig = g("rope.scaling.attn_factor"), out["original_max_position_embeddings"]
        s = config["max_position_embeddings"] / orig
        expected = float(np.sqrt(1 + np.log(s) / np.log(orig))) if s > 1 else 1.0
        if attn is not None and abs(float(attn) - expected) > 1e-6 * expected:
            scaling["long_mscale"] = float(attn)
        out["rope_scaling"] = scaling
    if out["rope_scaling"] is None:
        del out["rope_scaling"]
    return out


def _smollm3_config(g, config, path):
    """The SmolLM3 fields of a smollm3 GGUF: llama.cpp's fixed NoPE interval (not recorded in the file)."""
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    rope_dims = g("rope.dimension_count")
    if rope_dims is not None and int(rope_dims) != head_dim:
        raise SourceError(f"{path}: smollm3 rope.dimension_count {rope_dims} is not the head size {head_dim}")
    out = {"no_rope_layer_interval": SMOLLM3_NO_ROPE_INTERVAL}
    scaling = _linear_scaling(g, path)
    if scaling:
        out["rope_scaling"] = scaling
    return out


def read_tensor(tensor, path, quantize_to=(64, 4), requantize=None):
    """One GGUF tensor -> ({suffix: array}, quant): quant is (group_size, bits) for affine weights, a GGML type name
    for blocks kept packed (ggml_types.py), None for dense. GGML-quantized tensors are kept exactly as the file has
    them unless `requantize` (a list) asks for them to follow `quantize_to` too: it then receives (squared error,
    squared norm) of each re-quantized tensor against the file's values. Dense matrices follow `quantize_to`."""
    from .ggml_types import convert
    from ..ops.linear import Frozen, dense as dense_of
    shape = [int(s) for s in reversed(tensor.shape)]  # GGUF lists the fastest dim first
    qtype = tensor.tensor_type
    arrays, quant = convert(np.asarray(tensor.data), getattr(qtype, "name", str(qtype)), shape,
                            f"{path}: tensor {tensor.name}")
    arrays = {k: mx.array(v) for k, v in arrays.items()}
    if quant is not None and requantize is not None and quantize_to:
        w = (Frozen(arrays["weight"], ggml=quant) if isinstance(quant, str) else
             Frozen(arrays["weight"], arrays["scales"], arrays["biases"], group_size=quant[0], bits=quant[1]))
        arrays, quant = {"weight": dense_of(w)}, None
    dense = arrays["weight"]
    if quant is None and dense.ndim != 2:  # norms, biases in fp32: Gemma's (1 + w) - 1 in fp16 would round w
        return {"weight": dense.astype(mx.float32)}, None
    if quant is None and quantize_to and dense.ndim == 2 and dense.shape[1] % quantize_to[0] == 0:
        group, bits = quantize_to
        w, s, b = mx.quantize(dense.astype(mx.float32), group_size=group, bits=bits)
        s, b = s.astype(mx.float16), b.astype(mx.float16)
        if requantize is not None:
            ref = dense.astype(mx.float32)
            err = mx.dequantize(w, s.astype(mx.float32), b.astype(mx.float32), group_size=group, bits=bits) - ref
            requantize.append((mx.sum(err * err).item(), mx.sum(ref * ref).item()))
        return {"weight": w, "scales": s, "biases": b}, (group, bits)
    return arrays, quant


def gguf_tensors(reader, path):
    """Yields (hf module path, tensor) in the file's architecture's naming; checks the tensor count against the
    header first."""
    declared = field(reader, "GGUF.tensor_count")
    if declared is not None and int(declared) != len(reader.tensors):
        raise SourceError(f"{path}: header declares {declared} tensors but {len(reader.tensors)} were found "
                          "(truncated file?)")
    for t in reader.tensors:
        if t.name in ROPE_FACTORS:  # read into the config (config_from_gguf)
            continue
        if not t.name.endswith((".weight", ".bias")):
            raise SourceError(f"{path}: unexpected tensor {t.name}")
        yield hf_name(t.name, field(reader, "general.architecture")), t
