"""Where a MeSP step's time goes on the CPU: the rate of each GEMM shape of a Qwen2.5-0.5B step at T=256, the cost
of dequantizing one 4-bit weight and of one exp per element, for the bound in BENCHMARKS.md ("CPU step").

    python tools/profile_cpu_step.py
"""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mesp_mlx.blas import ensure_fast_blas  # noqa: E402

ensure_fast_blas()
import mlx.core as mx  # noqa: E402

def t(f, n=5):
    f(); best = 1e9
    for _ in range(n):
        s = time.perf_counter(); f(); best = min(best, time.perf_counter() - s)
    return best
T, d, f, V = 256, 896, 4864, 151936
shapes = {"q/o (Txd @ dxd)": (T, d, d), "k/v (Txd @ dx128)": (T, d, 128), "gate/up (Txd @ dxf)": (T, d, f),
          "down (Txf @ fxd)": (T, f, d), "head chunk (Txd @ dx4096)": (T, d, 4096)}
tot = 0
for name, (m, k, n) in shapes.items():
    a, b = mx.random.normal((m, k)), mx.random.normal((k, n)); mx.eval(a, b)
    s = t(lambda: mx.eval(a @ b))
    print(f"{name:28s} {2*m*k*n/s/1e9:6.1f} GFLOP/s  {s*1e3:6.2f} ms")
w = mx.random.normal((f, d)); wq, sc, bi = mx.quantize(w, 64, 4); mx.eval(wq, sc, bi)
s = t(lambda: mx.eval(mx.dequantize(wq, sc, bi, 64, 4)))
print(f"dequantize {f}x{d} 4-bit: {s*1e3:.2f} ms ({f*d/s/1e9:.2f} Gweights/s)")
x = mx.random.normal((14, T, T)); mx.eval(x)
s = t(lambda: mx.eval(mx.exp(x)))
print(f"exp over {x.size} elements: {s*1e3:.2f} ms ({s/x.size*1e9:.1f} ns/element)")
