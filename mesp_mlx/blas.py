"""Which BLAS MLX's CPU backend calls, and a switch to a fast one on Linux.

The Linux `mlx[cpu]` wheel links a reference BLAS: fp32 GEMM measured 29x slower than OpenBLAS (DESIGN.md §4).
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


if __name__ == "__main__":
    ensure_fast_blas()
    print(blas_status())
