"""Products with a frozen, possibly quantized, weight: the one place that knows how to multiply by the base model.

On Metal and CUDA `mx.quantized_matmul` is the fast kernel; on the CPU it is a slow loop, and dequantizing into a
transient fp32 matrix followed by a BLAS GEMM is ~20x faster (DESIGN.md §4). `matmul_path()` picks per device and
`set_matmul_path` overrides it. The dequantized copy lives only for one product.
"""
from typing import NamedTuple, Optional

import mlx.core as mx

_DTYPE = mx.float32
_PATH = "auto"
PATHS = ("auto", "quantized", "dequantize")


class Frozen(NamedTuple):
    """A frozen (out x in) weight, quantized (affine, with scales/biases) or dense, plus an optional bias."""

    weight: mx.array
    scales: Optional[mx.array] = None
    biases: Optional[mx.array] = None
    bias: Optional[mx.array] = None
    group_size: int = 64
    bits: int = 4

    @property
    def quantized(self):
        return self.scales is not None

    @property
    def out_dims(self):
        return self.weight.shape[0]

    def rows(self, start, stop):
        """Rows [start, stop) of the weight (output units), still quantized: groups run along the input dim."""
        sl = lambda a: None if a is None else a[start:stop]
        return Frozen(sl(self.weight), sl(self.scales), sl(self.biases), sl(self.bias), self.group_size, self.bits)


def set_compute_dtype(dtype):
    """The dtype dequantized weights and activations are computed in: float32 (default), bfloat16 or float16 (the
    fast choice on Metal), float64 (CPU only; what the exactness tests of the real models use)."""
    global _DTYPE
    _DTYPE = dtype


def compute_dtype():
    return _DTYPE


def accum_dtype(dtype):
    """At least fp32 for softmax and loss sums."""
    return mx.float64 if dtype == mx.float64 else mx.float32


def set_matmul_path(path):
    global _PATH
    if path not in PATHS:
        raise ValueError(f"matmul path must be one of {PATHS}, got {path!r}")
    _PATH = path


def matmul_path():
    if _PATH != "auto":
        return _PATH
    return "dequantize" if mx.default_device() == mx.cpu else "quantized"


def dense(w: Frozen):
    """The weight as a (out x in) matrix in the compute dtype."""
    if w.quantized:
        # fp32 scales: dequantizing with fp16 scales would round every weight to fp16 first
        return mx.dequantize(w.weight, w.scales.astype(_DTYPE), w.biases.astype(_DTYPE),
                             group_size=w.group_size, bits=w.bits)
    return w.weight.astype(_DTYPE)


def prepared(w: Frozen):
    """w in the form the products use: on the dequantize path one dense copy that several products can share."""
    if w.quantized and matmul_path() == "dequantize":
        return Frozen(dense(w), bias=w.bias)
    return w


def frozen_matmul(x, w: Frozen):
    """x @ W^T (+ bias): the forward product."""
    if w.quantized and matmul_path() == "quantized":
        y = mx.quantized_matmul(x, w.weight, w.scales, w.biases, transpose=True,
                                group_size=w.group_size, bits=w.bits).astype(x.dtype)
    else:
        y = x @ dense(w).T
    if w.bias is not None:
        y = y + w.bias.astype(y.dtype)
    return y


def frozen_matmul_t(g, w: Frozen):
    """g @ W: the product that carries a gradient back through the frozen weight."""
    if w.quantized and matmul_path() == "quantized":
        return mx.quantized_matmul(g, w.weight, w.scales, w.biases, transpose=False,
                                   group_size=w.group_size, bits=w.bits).astype(g.dtype)
    return g @ dense(w)


def embedding_rows(table: Frozen, ids):
    """Rows of an embedding table for token ids, dequantizing only the rows gathered."""
    if table.quantized:
        return mx.dequantize(table.weight[ids], table.scales[ids].astype(_DTYPE),
                             table.biases[ids].astype(_DTYPE), group_size=table.group_size, bits=table.bits)
    return table.weight[ids].astype(_DTYPE)
