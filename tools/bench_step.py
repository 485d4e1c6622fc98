"""One-step memory/time of each method on a model, each in a fresh process.
Usage: python tools/bench_step.py [--model M] [--seq 256] [--methods mesp mebp autodiff]"""
import argparse
import json
import subprocess
import sys
import time


def one(model, method, seq, rank):
    from mesp_mlx.blas import ensure_fast_blas
    ensure_fast_blas()
    import mlx.core as mx
    from mesp_mlx.engines import make_engine
    from mesp_mlx.io.sources import load_model
    from mesp_mlx.lora import LoRAConfig, init_lora
    store = load_model(model)
    params = init_lora(store.args, LoRAConfig(rank=rank), 0)
    ids = mx.random.randint(0, store.args.vocab_size, (1, seq + 1))
    batch = (ids[:, :-1], ids[:, 1:], mx.ones((1, seq)))
    engine = make_engine(method, store, 20.0)
    mx.eval(params)
    engine.loss_and_grad(params, batch)  # warm-up
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    t = time.perf_counter()
    steps = 2
    for _ in range(steps):
        engine.loss_and_grad(params, batch)
    from mesp_mlx.trainer import rss_mb
    return {"method": method, "seq": seq, "s_per_step": (time.perf_counter() - t) / steps,
            "peak_mb": mx.get_peak_memory() / 1e6, "resident_before_mb": base / 1e6, "rss_peak_mb": rss_mb()}


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--model")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--methods", nargs="+", default=["mesp", "mebp", "autodiff"])
    p.add_argument("--one", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        print(json.dumps(one(a.model, a.one, a.seq, a.rank)))
        sys.exit()
    rows = []
    for m in a.methods:
        cmd = [sys.executable, __file__, "--one", m, "--seq", str(a.seq), "--rank", str(a.rank)]
        if a.model:
            cmd += ["--model", a.model]
        out = subprocess.run(cmd, capture_output=True, text=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else
                    {"method": m, "error": out.stderr[-300:]})
    ref = next((r for r in rows if r["method"] == "mebp" and "peak_mb" in r), None)
    for r in rows:
        if "peak_mb" in r:
            ratio = f" ({r['peak_mb'] / ref['peak_mb']:.2f}x mebp peak, {r['s_per_step'] / ref['s_per_step']:.2f}x time)" if ref else ""
            print(f"{r['method']:9s} T={r['seq']}: peak {r['peak_mb']:.1f} MB, RSS {r['rss_peak_mb']:.0f} MB, "
                  f"{r['s_per_step']:.2f} s/step{ratio}")
        else:
            print(r)
