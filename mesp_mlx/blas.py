"""Which BLAS MLX's CPU backend calls, and a switch to a fast one on Linux.

The Linux `mlx[cpu]` wheel links a reference BLAS: fp32 GEMM measured 29x slower than OpenBLAS (docs/platform.md).
MLX calls `cblas_sgemm` through the dynamic linker, so preloading OpenBLAS replaces it. `ensure_fast_blas()`
re-executes the current command once with LD_PRELOAD set when OpenBLAS is installed and not yet loaded;
MESP_MLX_NO_BLAS_PRELOAD=1 turns that off. It never fails: without OpenBLAS it says so and how to fix it.
"""
import ctypes.util
import os
import sys
from pathlib import Path

CANDIDATES = ("/usr/lib/x86_64-linux-gnu/libopenblas.so.0", "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
              "/usr/lib64/libopenblas.so.0", "/usr/lib/libopenblas.so.0")
FIX = "install it with `apt-get install libopenblas0-pthread` (Debian/Ubuntu)"


def find_openblas():
    for c in CANDIDATES:
        if Path(c).exists():
            return c
    name = ctypes.util.find_library("openblas")
    return name and (name if os.path.isabs(name) else None)


def loaded_openblas():
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return False
    return "libopenblas" in maps


def blas_status():
    """A one-line description of the BLAS in use, for the start of a run."""
    if sys.platform == "darwin":
        return "BLAS: Apple Accelerate / Metal"
    if loaded_openblas():
        return "BLAS: OpenBLAS (preloaded)"
    lib = find_openblas()
    if lib:
        return f"BLAS: reference BLAS (slow); OpenBLAS is at {lib} but preloading is off (MESP_MLX_NO_BLAS_PRELOAD)"
    return f"BLAS: reference BLAS (slow: ~29x slower matmuls); OpenBLAS not found, {FIX}"


def ensure_fast_blas():
    """Re-exec once with OpenBLAS preloaded (Linux only). Returns only if no re-exec happened."""
    if not sys.platform.startswith("linux") or os.environ.get("MESP_MLX_NO_BLAS_PRELOAD"):
        return
    if loaded_openblas() or os.environ.get("_MESP_MLX_REEXEC"):
        return
    lib = find_openblas()
    if not lib:
        return
    env = dict(os.environ, _MESP_MLX_REEXEC="1")
    env["LD_PRELOAD"] = ":".join(p for p in (lib, os.environ.get("LD_PRELOAD")) if p)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, list(getattr(sys, "orig_argv", [sys.executable] + sys.argv)), env)


def check():
    """What `make test` runs first: the BLAS MLX will use, whether the preload took effect, and one GEMM checked
    against numpy and timed. Returns a process status: 1 when OpenBLAS is installed but not in use, or the GEMM is
    wrong; 0 otherwise (without OpenBLAS everything works, ~29x slower, and the message says how to fix it)."""
    import time

    import mlx.core as mx
    import numpy as np
    print(blas_status())
    if sys.platform.startswith("linux") and find_openblas() and not loaded_openblas() \
            and not os.environ.get("MESP_MLX_NO_BLAS_PRELOAD"):
        print(f"error: OpenBLAS is at {find_openblas()} but the preload did not take effect", file=sys.stderr)
        return 1
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((512, 512), np.float32), rng.standard_normal((512, 512), np.float32)
    with mx.stream(mx.cpu):
        x, y = mx.array(a), mx.array(b)
        mx.eval(x @ y)
        t = time.perf_counter()
        z = x @ y
        mx.eval(z)
        dt = time.perf_counter() - t
    # fp32 sums of 512 products: rounding stays far below 1e-4 of the largest entry
    err = np.abs(np.array(z) - a.astype(np.float64) @ b).max() / np.abs(a.astype(np.float64) @ b).max()
    print(f"CPU fp32 GEMM 512^3: {2 * 512 ** 3 / dt / 1e9:.1f} GFLOP/s, max rel err vs numpy {err:.1e}")
    if not err < 1e-4:
        print("error: MLX's CPU matmul disagrees with numpy", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    ensure_fast_blas()
    if "--check" in sys.argv[1:]:
        sys.exit(check())
    print(blas_status())
