"""Dequantization of the GGML block types that no MLX affine group represents, from their packed bytes, with MLX ops.

Q6_K, Q3_K and Q2_K scale 16-wide sub-blocks and IQ4_NL / IQ4_XS map 4-bit codes through a table, so the store keeps
their blocks byte for byte (one uint8 row per weight row) and every product dequantizes them on the fly, one block
of the model at a time, as the affine types are on the CPU path. Each function mirrors llama.cpp's block layout
(ggml-common.h) and computes in fp32 in the order of `gguf.quants.dequantize`; every product of a scale and a
level is exact in fp32 before its single rounding, so the results are equal bit for bit (tests/test_ggml_types.py).
"""
import mlx.core as mx

QK_K = 256
IQ4_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


def _f16(b):
    """Two little-endian bytes (..., 2) as one fp32 number (...,)."""
    return b.view(mx.float16).astype(mx.float32).squeeze(-1)


def _split(b, sizes):
    out, at = [], 0
    for s in sizes:
        out.append(b[..., at:at + s])
        at += s
    return out


def _bits(b, shifts, mask):
    """(..., n) bytes -> (..., len(shifts), n): each shifted right and masked."""
    sh = mx.array(shifts, dtype=b.dtype).reshape(len(shifts), 1)
    return (b[..., None, :] >> sh) & mask


def _q6_k(b):
    ql, qh, sc, d = _split(b, (QK_K // 2, QK_K // 4, QK_K // 16, 2))
    n = b.shape[0]
    dl = (_f16(d)[:, None] * sc.view(mx.int8).astype(mx.float32)).reshape(n, QK_K // 16, 1)
    lo = _bits(ql.reshape(n, 2, 64), (0, 4), 0x0F).reshape(n, -1, 32)
    hi = _bits(qh.reshape(n, 2, 32), (0, 2, 4, 6), 0x03).reshape(n, -1, 32)
    q = (lo | (hi << 4)).astype(mx.float32) - 32.0
    return (dl * q.reshape(n, QK_K // 16, 16)).reshape(n, QK_K)


def _q3_k(b):
    hmask, qs, scales, d = _split(b, (QK_K // 8, QK_K // 4, 12, 2))
    n = b.shape[0]
    lsc = _bits(scales[:, :8], (0, 4), 0x0F).reshape(n, 16)
    hsc = _bits(scales[:, 8:], (0, 2, 4, 6), 0x03).reshape(n, 16)
    sc = (lsc | (hsc << 4)).astype(mx.float32) - 32.0
    dl = (_f16(d)[:, None] * sc).reshape(n, 16, 1)
    ql = _bits(qs.reshape(n, 2, 32), (0, 2, 4, 6), 0x03).reshape(n, 16, 16)
    qh = _bits(hmask.reshape(n, 1, 32), tuple(range(8)), 0x01).reshape(n, 16, 16)
    q = ql.astype(mx.float32) - 4.0 * (1 - qh).astype(mx.float32)  # the offset is 0 where the mask bit is set
    return (dl * q).reshape(n, QK_K)


def _q2_k(b):
    scales, qs, d, dmin = _split(b, (QK_K // 16, QK_K // 4, 2, 2))
    n = b.shape[0]
    dl = (_f16(d)[:, None] * (scales & 0x0F).astype(mx.float32)).reshape(n, 16, 1)
    ml = (_f16(dmin)[:, None] * (scales >> 4).astype(mx.float32)).reshape(n, 16, 1)
    q = _bits(qs.reshape(n, 2, 32), (0, 2, 4, 6), 0x03).reshape(n, 16, 16).astype(mx.float32)
    return (dl * q - ml).reshape(n, QK_K)


def _iq4_codes(qs, n):
    """4-bit codes of 32-wide sub-blocks (low nibbles, then high) through IQ4_NL's table."""
    codes = _bits(qs.reshape(n, -1, 16), (0, 4), 0x0F).reshape(n, -1, 32)
    return mx.take(mx.array(IQ4_VALUES, dtype=mx.float32), codes.astype(mx.uint32))


def _iq4_nl(b):
    d, qs = _split(b, (2, 16))
    return _f16(d)[:, None] * _iq4_codes(qs, b.shape[0]).reshape(b.shape[0], 32)


def _iq4_xs(b):
    d, sh, sl, qs = _split(b, (2, 2, QK_K // 64, QK_K // 2))
    n = b.shape[0]
    lo = _bits(sl.reshape(n, 4), (0, 4), 0x0F).swapaxes(1, 2).reshape(n, 8)
    hi = (sh.view(mx.uint16) >> mx.array([2 * i for i in range(8)], dtype=mx.uint16)) & 0x03
    ls = (lo.astype(mx.uint16) | (hi << 4)).astype(mx.float32) - 32.0
    dl = (_f16(d)[:, None] * ls).reshape(n, 8, 1)
    return (dl * _iq4_codes(qs, n)).reshape(n, QK_K)


# (bytes per block, weights per block, dequantizer) by GGML type name
PACKED = {"Q6_K": (210, QK_K, _q6_k), "Q3_K": (110, QK_K, _q3_k), "Q2_K": (84, QK_K, _q2_k),
          "IQ4_NL": (18, 32, _iq4_nl), "IQ4_XS": (136, QK_K, _iq4_xs)}

# MLX peak of `dequantize_packed` to fp32 beyond its (rows x cols) result, in bytes per weight element: its uint8
# fields, fp32 levels and sub-block scales alive at once. Measured on the CPU by tools/bench_ggml_dequant.py, the same
# at 2048x2048, 4096x1024 and 512x4096 (BENCHMARKS.md, "--memory-budget on GGML-kept types"); the memory model
# (engines/mesp.py) counts them through `dequant_temp_bytes`.
DEQUANT_TEMP_BYTES = {"Q6_K": 2.27, "Q3_K": 6.40, "Q2_K": 1.67, "IQ4_NL": 5.19, "IQ4_XS": 5.34}


def dequant_temp_bytes(ggml_type, dtype=mx.float32):
    """Bytes per weight element that dequantizing `ggml_type` to `dtype` holds beyond its result: the fp32
    temporaries above, plus the fp32 result itself (4 bytes) when it is then cast to another dtype (measured: 6.27
    for Q6_K to bfloat16 against 2.27 + 4). A product with the weight adds its dense copy, dtype.size per element."""
    return DEQUANT_TEMP_BYTES[ggml_type] + (0 if dtype == mx.float32 else 4)


def dequantize_packed(packed, ggml_type, dtype=mx.float32):
    """(rows, row bytes) uint8 blocks of `ggml_type` -> the (rows, cols) matrix in `dtype` (computed in fp32)."""
    size, width, fn = PACKED[ggml_type]
    rows = packed.shape[0]
    blocks = packed.reshape(-1, size)
    return fn(blocks).reshape(rows, -1).astype(dtype)
