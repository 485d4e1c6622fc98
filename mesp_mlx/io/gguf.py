"""GGUF files (llama.cpp) into mlx-lm-named arrays and a Hugging Face style config.

Q4_0, Q4_1 and Q8_0 tensors are repacked losslessly into MLX's affine format with group size 32 (what `mx.load`
gives for them); every other type is dequantized with the `gguf` package and re-quantized to MLX 4-bit, group 64.
We read tensors one at a time from the memory-mapped file, so a conversion never holds the whole model, and every
tensor the header lists is accounted for (`mx.load` silently drops some types).

What differs between architectures (llama.cpp's name for each, tensor names, q/k permutation, norm storage, the
config fields a file records its own way) is each family's record (`models/<family>.py`, `FAMILY`); this module
reads those records and holds no family knowledge of its own.
"""
import numpy as np

import mlx.core as mx

from ..models import GGUF_ARCHITECTURES
from . import SourceError


class _Meta:
    """What a family's gguf_config reads: "<arch>.<key>" metadata, the tensor names, one tensor as numpy."""

    def __init__(self, reader, arch):
        self.reader, self.arch = reader, arch
        self.names = {t.name for t in reader.tensors}

    def get(self, key, default=None):
        return field(self.reader, f"{self.arch}.{key}", default)

    def array(self, name):
        return np.asarray(next(t for t in self.reader.tensors if t.name == name).data)


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


def file_family(reader, path):
    """The family record of a GGUF file's general.architecture."""
    arch = field(reader, "general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise SourceError(f"{path}: GGUF architecture {arch!r} is not supported (supported: "
                          f"{', '.join(GGUF_ARCHITECTURES)})")
    return GGUF_ARCHITECTURES[arch]


def hf_name(gguf_name, family):
    parts = gguf_name.split(".")
    names = family.gguf_to_hf()
    if parts[0] == "blk":
        return f"model.layers.{parts[1]}.{names.get(parts[2], parts[2])}.{parts[3]}"
    return f"{names.get(parts[0], parts[0])}.{parts[1]}"


def norm_shift(reader, path=None):
    """What llama.cpp added to the norm weights of this file's architecture (Gemma: 1)."""
    return file_family(reader, path).gguf_norm_shift


def config_from_gguf(reader, path):
    family = file_family(reader, path)
    meta = _Meta(reader, family.llamacpp_arch)
    g = meta.get
    tokens = field(reader, "tokenizer.ggml.tokens") or []
    names = {t.name for t in reader.tensors}
    heads = g("attention.head_count")
    config = {
        "model_type": family.model_type,
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
        # with the traditional (interleaved) rope, the rows llama.cpp's converter permuted give the original model
        # exactly
        "rope_traditional": family.permutes_qk,
    }
    if g("attention.key_length"):
        config["head_dim"] = g("attention.key_length")
    if family.gguf_config is not None:
        try:
            config.update(family.gguf_config(meta, config))
        except ValueError as e:
            raise SourceError(f"{path}: {e}") from None
    if None in config.values():
        missing = [k for k, v in config.items() if v is None]
        raise SourceError(f"{path}: GGUF metadata lacks {missing}")
    return config


def _pack(q, bits):
    """Unsigned integer levels (rows, cols) -> MLX's packed uint32 (rows, cols * bits / 32), low bits first."""
    per = 32 // bits
    q = q.astype(np.uint32).reshape(q.shape[0], -1, per)
    shifts = (np.arange(per, dtype=np.uint32) * bits)
    return np.bitwise_or.reduce(q << shifts, axis=-1).astype(np.uint32)


def _repack(raw, qtype, rows, cols):
    """Q4_0 / Q4_1 / Q8_0 blocks of 32 -> (packed, scales, biases) in MLX affine format, group 32, exact."""
    Q = _gguf().GGMLQuantizationType
    nblk = cols // 32
    if qtype == Q.Q8_0:
        blk = np.frombuffer(raw, dtype=np.uint8).reshape(rows, nblk, 34)
        d = blk[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
        q = blk[..., 2:].copy().view(np.int8).astype(np.int16) + 128
        bits, scale, bias = 8, d, -128.0 * d
    else:
        head = 2 if qtype == Q.Q4_0 else 4
        blk = np.frombuffer(raw, dtype=np.uint8).reshape(rows, nblk, head + 16)
        d = blk[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
        qs = blk[..., head:]
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)
        bits = 4
        if qtype == Q.Q4_0:
            scale, bias = d, -8.0 * d
        else:
            scale, bias = d, blk[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    packed = _pack(q.reshape(rows, cols), bits)
    return (mx.array(packed), mx.array(scale.astype(np.float16)), mx.array(bias.astype(np.float16)), bits)


def read_tensor(tensor, path, quantize_to=(64, 4)):
    """One GGUF tensor -> ({suffix: array}, quant) where quant is (group_size, bits) or None for dense."""
    gguf = _gguf()
    Q = gguf.GGMLQuantizationType
    shape = [int(s) for s in reversed(tensor.shape)]  # GGUF lists the fastest dim first
    qtype = tensor.tensor_type
    try:
        if qtype in (Q.Q4_0, Q.Q4_1, Q.Q8_0) and len(shape) == 2:
            w, s, b, bits = _repack(np.asarray(tensor.data).tobytes(), qtype, shape[0], shape[1])
            return {"weight": w, "scales": s, "biases": b}, (32, bits)
        if qtype in (Q.F32, Q.F16, Q.BF16) or qtype == getattr(Q, "F64", -1):
            arr = np.asarray(tensor.data)
            if qtype == Q.BF16:
                arr = gguf.quants.dequantize(arr, qtype)
            dense = mx.array(arr.astype(np.float32)).reshape(shape)
        else:
            dense = mx.array(gguf.quants.dequantize(np.asarray(tensor.data), qtype).astype(np.float32))
            dense = dense.reshape(shape)
    except (NotImplementedError, KeyError, ValueError) as e:
        raise SourceError(f"{path}: tensor {tensor.name} has GGUF type {getattr(qtype, 'name', qtype)}, "
                          f"which cannot be read ({e})") from None
    if quantize_to and dense.ndim == 2 and dense.shape[1] % quantize_to[0] == 0:
        group, bits = quantize_to
        w, s, b = mx.quantize(dense, group_size=group, bits=bits)
        return {"weight": w, "scales": s.astype(mx.float16), "biases": b.astype(mx.float16)}, (group, bits)
    return {"weight": dense}, None


def gguf_tensors(reader, path):
    """Yields (hf module path, tensor) in the file's architecture's naming; checks the tensor count against the
    header first."""
    family = file_family(reader, path)
    declared = field(reader, "GGUF.tensor_count")
    if declared is not None and int(declared) != len(reader.tensors):
        raise SourceError(f"{path}: header declares {declared} tensors but {len(reader.tensors)} were found "
                          "(truncated file?)")
    for t in reader.tensors:
        if t.name in family.gguf_config_tensors:  # read into the config (config_from_gguf)
            continue
        if not t.name.endswith((".weight", ".bias")):
            raise SourceError(f"{path}: unexpected tensor {t.name}")
        yield hf_name(t.name, family), t
