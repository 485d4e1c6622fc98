"""The gated delta rule of one linear-attention layer, ours against mlx-lm's, at a real shape: seconds, MLX peak and
kernels of a forward that keeps what the backward needs plus the backward, per chunk length.

    python tools/bench_gated_delta.py [--shape 4b] [--seqs 128 512 2048] [--chunks 32 64 128] [--mlx-lm-max 512]
                                      [--sync auto|chunk|block]

Ours: ops/gated_delta.py (chunked forward saving the chunk-boundary states, hand-derived backward; on the CPU by
groups of value heads, Compute.delta_group). mlx-lm's: `gated_delta_ops`, the per-token loop its trainer runs, under
MLX autodiff (mx.vjp), up to --mlx-lm-max tokens (it keeps every token's state). Inputs are random with the layer's
real head counts and widths (Qwen3.5: Hk 16, Dk = Dv = 128; Hv 16 for 0.8B/2B, 32 for 4B/9B), batch 1. Each figure
is the second of two runs (the first warms up); the kernel count is the number of primitives evaluated
(tools/count_kernels.py's KernelCounter), a device-independent proxy for GPU launch cost.
"""
import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

SHAPES = {"0.8b": (16, 16, 128, 128), "2b": (16, 16, 128, 128), "4b": (16, 32, 128, 128), "9b": (16, 32, 128, 128)}


def inputs(t, hk, hv, dk, dv):
    import mlx.core as mx
    key = mx.random.key(0)
    ks = mx.random.split(key, 5)
    q, k = mx.random.normal((1, t, hk, dk), key=ks[0]), mx.random.normal((1, t, hk, dk), key=ks[1])
    q = q / mx.linalg.norm(q, axis=-1, keepdims=True) * dk ** -0.5
    k = k / mx.linalg.norm(k, axis=-1, keepdims=True)
    v = mx.random.normal((1, t, hv, dv), key=ks[2])
    log_g = -mx.random.uniform(0.01, 1.0, (1, t, hv), key=ks[3])
    beta = mx.random.uniform(0, 1, (1, t, hv), key=ks[4])
    out = [q, k, v, log_g, beta]
    mx.eval(out)
    return out


def measure(fn):
    """(seconds, MLX peak bytes beyond what was active, kernels) of fn's second run; fn evaluates its own work."""
    import mlx.core as mx
    from count_kernels import KernelCounter
    fn()
    active = mx.get_active_memory()
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    fn()
    seconds = time.perf_counter() - t0
    peak = mx.get_peak_memory() - active
    with KernelCounter() as k:
        fn()
    return seconds, peak, k.summary()["compute_prims"]


def ours(args, x, chunk, compute):
    import mlx.core as mx
    from mesp_mlx.ops.gated_delta import gated_delta_backward, gated_delta_forward
    t, hv, hk = x[2].shape[1], x[2].shape[2], x[1].shape[2]
    group = compute.delta_group(1, hv, hv // hk, t, max(x[1].shape[3], x[2].shape[3], chunk))
    dy = mx.ones(x[2].shape)

    def run():
        y, _, states = gated_delta_forward(*x, chunk, save=True, group=group)
        mx.eval(y, states)
        mx.eval(gated_delta_backward(dy, *x, states, chunk, group=group))
    return run


def theirs(x):
    import mlx.core as mx
    from mlx_lm.models.gated_delta import gated_delta_ops
    dy = mx.ones(x[2].shape)

    def run():
        fn = lambda q, k, v, lg, b: gated_delta_ops(q, k, v, mx.exp(lg), b)[0]
        mx.eval(mx.vjp(fn, x, [dy]))
    return run


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="4b", choices=sorted(SHAPES))
    p.add_argument("--seqs", type=int, nargs="+", default=[128, 512, 2048])
    p.add_argument("--chunks", type=int, nargs="+", default=[32, 64, 128])
    p.add_argument("--mlx-lm-max", type=int, default=512)
    p.add_argument("--sync", default="auto")
    a = p.parse_args(argv)
    from mesp_mlx.blas import ensure_fast_blas
    ensure_fast_blas()
    import mlx.core as mx
    from mesp_mlx.ops.linear import Compute
    compute = Compute(sync=a.sync)
    hk, hv, dk, dv = SHAPES[a.shape]
    print(f"# {a.shape}: Hk {hk}, Hv {hv}, Dk {dk}, Dv {dv}, batch 1, device {mx.default_device()}")
    print("| T | method | chunk | seconds | MLX peak MB | kernels |\n|---|---|---|---|---|---|")
    rows = []
    for t in a.seqs:
        x = inputs(t, hk, hv, dk, dv)
        runs = [("ours", c, ours(a, x, c, compute)) for c in a.chunks]
        if t <= a.mlx_lm_max:
            runs.append(("mlx-lm loop + autodiff", "-", theirs(x)))
        for name, c, fn in runs:
            s, peak, kernels = measure(fn)
            rows.append(dict(t=t, method=name, chunk=c, seconds=s, peak_mb=peak / 2 ** 20, kernels=kernels))
            print(f"| {t} | {name} | {c} | {s:.2f} | {peak / 2 ** 20:.0f} | {kernels} |", flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
