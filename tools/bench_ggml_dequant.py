"""MLX peak of dequantizing one GGML weight kept as packed bytes, and of one product with it, per type: the factors
of the memory model's `ops.ggml.DEQUANT_TEMP_BYTES` table.

    python tools/bench_ggml_dequant.py [--out 2048] [--in 2048] [--tokens 64] [--dtype float32 bfloat16]

For each type that `ops.ggml` dequantizes from its packed bytes (Q6_K, Q3_K, Q2_K, IQ4_NL, IQ4_XS), a random (out x in)
weight of valid blocks is made resident, then, from a cleared cache and a reset peak, MLX's peak beyond what was
active is measured for
    dequant   W = dequantize_packed(packed): peak minus the (out x in) result, over out*in
    x @ W^T   the forward product with x (tokens x in): peak minus the (tokens x out) output, over out*in
    g @ W     the transposed product with g (tokens x out): peak minus the (tokens x in) output, over out*in
so each column is bytes per weight element beyond the output: the unpacking intermediates (uint8 fields, fp32
levels and sub-block scales) and, for the products, the dense copy the product reads. Memory only: these runs time
nothing. The last column is the row-blocked product (ops.linear, Compute.dequant_rows) at --rows rows per block,
in bytes per weight of one block.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402


def packed_weight(type_name, rows, cols, seed=0):
    """(rows, row bytes) uint8 of random blocks of `type_name` whose fp16 fields are finite normals."""
    from mesp_mlx.io.ggml_types import TYPES
    spec = TYPES[type_name]
    rng = np.random.default_rng(seed)
    n = rows * cols // spec.block_size
    raw = rng.integers(0, 256, (n, spec.block_bytes), dtype=np.uint8)
    for off in spec.f16_fields:
        raw[:, off:off + 2] = (rng.standard_normal(n) * 1e-2).astype(np.float16).view(np.uint8).reshape(n, 2)
    return mx.array(raw.reshape(rows, -1))


def extra_peak(fn):
    """(MLX peak of evaluating fn() beyond what was active before, bytes of its result)."""
    mx.synchronize()
    mx.clear_cache()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    out = fn()
    mx.eval(out)
    peak = mx.get_peak_memory() - base
    return peak, out.nbytes


def measure(type_name, rows, cols, tokens, dtype, block_rows):
    """{column: bytes per weight element beyond the output} for one type."""
    from mesp_mlx.ops.ggml import dequantize_packed
    from mesp_mlx.ops.linear import Compute, Frozen, frozen_matmul, frozen_matmul_t
    w = Frozen(packed_weight(type_name, rows, cols), ggml=type_name)
    x = mx.random.normal((tokens, cols)).astype(dtype)
    g = mx.random.normal((tokens, rows)).astype(dtype)
    mx.eval(w.weight, x, g)
    whole, chunked = Compute(dtype=dtype, matmul="dequantize"), Compute(dtype=dtype, matmul="dequantize",
                                                                        dequant_rows=block_rows, sync="chunk")
    cases = {"dequant": lambda: dequantize_packed(w.weight, type_name, dtype),
             "x @ W^T": lambda: frozen_matmul(x, w, whole),
             "g @ W": lambda: frozen_matmul_t(g, w, whole),
             "blocked x @ W^T": lambda: frozen_matmul(x, w, chunked)}
    out = {}
    for name, fn in cases.items():
        extra_peak(fn)  # warm-up: MLX's first evaluation of a graph allocates once-only buffers
        peak, result = extra_peak(fn)
        out[name] = (peak - result) / (rows * cols if name != "blocked x @ W^T" else min(block_rows, rows) * cols)
    return out


def main(argv=None):
    from mesp_mlx.ops.ggml import PACKED
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=int, default=2048)
    p.add_argument("--in", dest="cols", type=int, default=2048)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--rows", type=int, default=256, help="rows per block of the row-blocked product")
    p.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    a = p.parse_args(argv)
    mx.set_default_device(mx.cpu)
    print(f"MLX peak beyond the output, bytes per weight element; W {a.out} x {a.cols}, {a.tokens} tokens, "
          f"device {mx.default_device()}")
    cols = ["dequant", "x @ W^T", "g @ W", "blocked x @ W^T"]
    print(f"{'type':8} {'dtype':9} " + " ".join(f"{c:>16}" for c in cols))
    for dtype in a.dtype:
        for type_name in PACKED:
            m = measure(type_name, a.out, a.cols, a.tokens, getattr(mx, dtype), a.rows)
            print(f"{type_name:8} {dtype:9} " + " ".join(f"{m[c]:16.2f}" for c in cols))


if __name__ == "__main__":
    main()
