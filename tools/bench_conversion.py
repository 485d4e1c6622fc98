"""Peak resident set of converting a model into the weight store, beside the size of what is converted.

    python tools/bench_conversion.py [--before REPO] [--label NAME] SPEC [SPEC ...]

Each SPEC (a .gguf file, a model directory, `default` for the shipped SmolLM2, or a name load_model knows) is
converted in a fresh process per measurement, with MESP_MLX_CACHE pointing at a new temporary directory so the
conversion really runs (the store is deleted afterwards). That process reports its peak RSS (VmHWM: what the OS
charges, page-cache pages of mapped files included) once its imports are done ("fixed": Python, MLX, the package
and the libraries a conversion imports: gguf, tokenizers, transformers) and again after the conversion. With
--before, the same conversion also runs on another checkout's code (e.g. the main branch's worktree), its bytecode
not written there. Prints one markdown row per SPEC:

    | source | file size | fixed (imports) | peak RSS before (x file) | peak RSS after (x file) |
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CHILD = """
import json, sys
from mesp_mlx.resident import resident_bytes
from mesp_mlx.io.sources import load_model
import mlx.core as mx
import gguf, tokenizers, tqdm, transformers  # what every conversion imports: part of its fixed cost
fixed = resident_bytes(peak=True)
spec = sys.argv[1]
store = load_model(None if spec == "default" else spec)
print(json.dumps({"fixed": fixed, "peak": resident_bytes(peak=True), "store": str(store.path)}))
"""


def source_bytes(spec):
    """Bytes of the weights a spec names: the GGUF file, or a directory's *.safetensors; None if not a path."""
    if spec == "default":
        sys.path.insert(0, str(REPO))
        from mesp_mlx.io.sources import smollm2_gguf
        return smollm2_gguf(install=False).stat().st_size
    p = Path(spec).expanduser()
    if p.is_file():
        return p.stat().st_size
    if p.is_dir():
        return sum(f.stat().st_size for f in p.glob("*.safetensors"))
    return None


def measure(repo, spec):
    """{"fixed", "peak"} bytes of one conversion of `spec` by the code in `repo`, in a fresh process and cache."""
    with tempfile.TemporaryDirectory(prefix="mesp-conv-") as cache:
        env = dict(os.environ, PYTHONPATH=str(repo), MESP_MLX_CACHE=cache, PYTHONDONTWRITEBYTECODE="1")
        run = subprocess.run([sys.executable, "-c", CHILD, spec], env=env, cwd=str(repo), capture_output=True,
                             text=True)
        if run.returncode != 0:
            raise SystemExit(f"{spec} with {repo}: conversion failed\n{run.stderr[-3000:]}")
        return json.loads(run.stdout.strip().splitlines()[-1])


def gb(n):
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("specs", nargs="+")
    p.add_argument("--before", help="another checkout whose conversion is measured too (the code before)")
    p.add_argument("--label", action="append", help="a name for each SPEC's row (default: its path's name)")
    a = p.parse_args(argv)
    labels = a.label or []
    print("| source | file size | fixed (imports) | peak RSS before | peak RSS after |")
    print("|---|---:|---:|---:|---:|")
    for k, spec in enumerate(a.specs):
        size = source_bytes(spec)
        before = measure(Path(a.before), spec) if a.before else None
        after = measure(REPO, spec)
        name = labels[k] if k < len(labels) else Path(spec).name
        ratio = lambda m: f" ({m['peak'] / size:.2f}x)" if size else ""
        was = f"{gb(before['peak'])}{ratio(before)}" if before else "-"
        print(f"| {name} | {gb(size) if size else '?'} | {gb(after['fixed'])} | {was} | "
              f"{gb(after['peak'])}{ratio(after)} |", flush=True)

if __name__ == "__main__":
    main()
