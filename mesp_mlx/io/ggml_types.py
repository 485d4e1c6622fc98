"""GGML tensor types, one table entry per type: how each is kept in the weight store, exactly.

"affine" types are blocks that MLX's affine quantization (w = scale * q + bias per group of 32) represents exactly:
their integer levels are repacked into MLX's bit layout and their scales and biases computed once (for the K-quants
scale = d * sc and bias = -dmin * m, exact in fp32 and not in fp16; a tensor's scales stay fp16 where every one of
them is an fp16 number, as for Q4_0/Q8_0 in practice). "packed" types fit no affine group (16-wide sub-blocks,
lookup tables): the store keeps their blocks byte for byte and `ops.ggml` dequantizes them on the fly. "dense"
types are plain floats, which the run's precision choice (`quantize`) governs as it does a Hugging Face model's.
Any other type is refused with one line naming it. Every conversion here equals `gguf.quants.dequantize` bit for
bit (tests/test_ggml_types.py).
"""
from typing import NamedTuple, Optional

import numpy as np

from ..ops.ggml import PACKED
from . import SourceError


class GGMLType(NamedTuple):
    how: str                       # "affine", "packed" or "dense"
    block_bytes: int = 0
    block_size: int = 0            # weights per block
    bits: int = 0                  # affine: MLX bits per level (group 32)
    levels: Optional[object] = None  # affine: blocks (n, block_bytes) uint8 -> (q, scales, biases), 32-wide groups
    store_bits: float = 0.0        # bits per weight as stored (packed: the file's own)
    f16_fields: tuple = ()         # byte offsets of each block's fp16 scales (a corrupt file shows there)


def _f16(b):
    return b.copy().view(np.float16).astype(np.float32)[..., 0]


def _nibbles(qs):
    """16 bytes per 32 weights: low nibbles are weights 0..15, high nibbles 16..31 (per 16-byte run)."""
    qs = qs.reshape(qs.shape[0], -1, 16)
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(qs.shape[0], -1)


def _high_bits(qh):
    """Q5_0/Q5_1: bit j of the little-endian uint32 is the fifth bit of weight j."""
    qh = qh.copy().view(np.uint32)
    return ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)


def _q4_0(b):
    d = _f16(b[:, :2])
    return _nibbles(b[:, 2:]), d[:, None], -8.0 * d[:, None]


def _q4_1(b):
    return _nibbles(b[:, 4:]), _f16(b[:, :2])[:, None], _f16(b[:, 2:4])[:, None]


def _q5_0(b):
    d = _f16(b[:, :2])
    return _nibbles(b[:, 6:]) | (_high_bits(b[:, 2:6]) << 4), d[:, None], -16.0 * d[:, None]


def _q5_1(b):
    q = _nibbles(b[:, 8:]) | (_high_bits(b[:, 4:8]) << 4)
    return q, _f16(b[:, :2])[:, None], _f16(b[:, 2:4])[:, None]


def _q8_0(b):
    d = _f16(b[:, :2])
    return (b[:, 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8), d[:, None], -128.0 * d[:, None]


def _k_scales(s):
    """Q4_K/Q5_K's 12 bytes of eight 6-bit scales and eight 6-bit mins."""
    s = s.reshape(-1, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc.astype(np.float32), mn.astype(np.float32)


def _k_affine(b, q):
    sc, mn = _k_scales(b[:, 4:16])
    return q, _f16(b[:, :2])[:, None] * sc, -(_f16(b[:, 2:4])[:, None] * mn)


def _k_low(qs):
    """128 bytes per 256 weights: each 32-byte run gives one sub-block's low nibbles, then the next's high ones."""
    qs = qs.reshape(qs.shape[0], -1, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    return (qs & 0x0F).reshape(qs.shape[0], -1)


def _q4_k(b):
    return _k_affine(b, _k_low(b[:, 16:]))


def _q5_k(b):
    qh = b[:, 16:48].reshape(-1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)
    return _k_affine(b, _k_low(b[:, 48:]) | ((qh & 1).reshape(b.shape[0], -1) << 4))


def _packed(name, f16_fields):
    size, width, _ = PACKED[name]
    return GGMLType("packed", size, width, store_bits=8.0 * size / width, f16_fields=f16_fields)


TYPES = {
    "F32": GGMLType("dense", 4, 1), "F16": GGMLType("dense", 2, 1), "BF16": GGMLType("dense", 2, 1),
    "Q4_0": GGMLType("affine", 18, 32, 4, _q4_0, f16_fields=(0,)),
    "Q4_1": GGMLType("affine", 20, 32, 4, _q4_1, f16_fields=(0, 2)),
    "Q5_0": GGMLType("affine", 22, 32, 5, _q5_0, f16_fields=(0,)),
    "Q5_1": GGMLType("affine", 24, 32, 5, _q5_1, f16_fields=(0, 2)),
    "Q8_0": GGMLType("affine", 34, 32, 8, _q8_0, f16_fields=(0,)),
    "Q4_K": GGMLType("affine", 144, 256, 4, _q4_k, f16_fields=(0, 2)),
    "Q5_K": GGMLType("affine", 176, 256, 5, _q5_k, f16_fields=(0, 2)),
    "Q6_K": _packed("Q6_K", (208,)), "Q3_K": _packed("Q3_K", (108,)), "Q2_K": _packed("Q2_K", (80, 82)),
    "IQ4_NL": _packed("IQ4_NL", (0,)), "IQ4_XS": _packed("IQ4_XS", (0,)),
}
GROUP = 32  # every affine type above, as MLX groups


def pack_levels(q, bits):
    """Integer levels (rows, cols) -> MLX's packed uint32 (rows, cols * bits / 32): one little-endian bit stream,
    lowest bits first, which is MLX's layout for every width (2..8, including 3, 5 and 6)."""
    rows = q.shape[0]
    if 32 % bits == 0:
        per = 32 // bits
        q = q.astype(np.uint32).reshape(rows, -1, per)
        return np.bitwise_or.reduce(q << (np.arange(per, dtype=np.uint32) * bits), axis=-1).astype(np.uint32)
    stream = ((q[..., None] >> np.arange(bits, dtype=np.uint8)) & 1).astype(np.uint8).reshape(rows, -1)
    return np.packbits(stream, axis=-1, bitorder="little").view(np.uint32)


def _scale_dtype(*arrays):
    """fp16 where it holds every value exactly, else fp32."""
    with np.errstate(over="ignore"):
        exact = all(np.array_equal(a.astype(np.float16).astype(np.float32), a) for a in arrays)
    return np.float16 if exact else np.float32


def convert(raw, type_name, shape, where):
    """A GGML tensor's bytes -> ({suffix: numpy array}, quant): quant is (32, bits) for affine types, the type name
    for packed ones, None for dense (floats shaped `shape`: F16 as it is, F32 and BF16 as fp32, exactly)."""
    spec = TYPES.get(type_name)
    if spec is None:
        raise SourceError(f"{where} has GGUF type {type_name}, which is not supported (supported: "
                          f"{', '.join(TYPES)})")
    raw = np.ascontiguousarray(raw).view(np.uint8).reshape(-1)
    if spec.how == "dense":
        dtype = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}[type_name]
        arr = raw.view(dtype)
        if type_name == "BF16":
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        return {"weight": arr.astype(np.float16 if type_name == "F16" else np.float32).reshape(shape)}, None
    rows, cols = (1, shape[0]) if len(shape) == 1 else (int(np.prod(shape[:-1])), shape[-1])
    if len(shape) != 2 or cols % spec.block_size:
        raise SourceError(f"{where} is {type_name} of shape {shape}: expected a matrix with rows of whole "
                          f"{spec.block_size}-weight blocks")
    row_bytes = cols // spec.block_size * spec.block_bytes
    if raw.size != rows * row_bytes:
        raise SourceError(f"{where} has {raw.size} bytes of {type_name} data, expected {rows * row_bytes} for "
                          f"shape {shape} (truncated or corrupt file?)")
    blocks = raw.reshape(-1, spec.block_bytes)
    for off in spec.f16_fields:
        bad = ~np.isfinite(blocks[:, off:off + 2].copy().view(np.float16))
        if bad.any():
            raise SourceError(f"{where}: {type_name} block {int(np.argmax(bad))} has a non-finite scale "
                              "(corrupt file?)")
    if spec.how == "packed":
        return {"weight": raw.reshape(rows, row_bytes).copy()}, type_name
    # filled a chunk of rows at a time: the output and one chunk's temporaries are all this holds besides `raw`
    q = np.empty((rows, cols * spec.bits // 32), np.uint32)
    scales, biases = np.empty((rows, cols // GROUP), np.float32), np.empty((rows, cols // GROUP), np.float32)
    step = max(1, (1 << 22) // row_bytes)  # rows per chunk: bounds the bit-level temporaries of 5-bit packing
    for r in range(0, rows, step):
        lv, s, b = spec.levels(raw[r * row_bytes:min(rows, r + step) * row_bytes].reshape(-1, spec.block_bytes))
        n = min(rows, r + step) - r
        q[r:r + n] = pack_levels(lv.reshape(n, cols), spec.bits)
        scales[r:r + n] = s.reshape(n, cols // GROUP)
        biases[r:r + n] = b.reshape(n, cols // GROUP)
    dt = _scale_dtype(scales, biases)
    return ({"weight": q, "scales": scales.astype(dt, copy=False), "biases": biases.astype(dt, copy=False)},
            (GROUP, spec.bits))

