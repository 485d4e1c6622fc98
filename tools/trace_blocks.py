"""MLX memory block by block inside one mesp step: where a step's peak comes from.

    python tools/trace_blocks.py --model preset:qwen3.5-4b,layers=4,vocab=4096 --seq 2048 --plan 6

One training step (batch 1 of random tokens, rank 8 on every projection, the update fused per block as the trainer
runs it) under one of the memory planner's plans (mesp_mlx.plan.PLANS, 0 the fastest), printing for every block's
forward, the head and every block's recompute + backward: MLX active memory before it, its peak and active memory
after it (MB above the step's start) and the process's peak RSS (MiB). Blocks of one kind peaking alike means
nothing grows with depth; the largest row names the phase to bound. `--model` takes what bench_memory.py takes
(a path, a name, or `preset:NAME[,layers=N,vocab=V]`). `--json FILE` writes the rows.
"""
import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--plan", type=int, default=0, help="index into mesp_mlx.plan.PLANS (0: fastest)")
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    from mesp_mlx.blas import ensure_fast_blas
    ensure_fast_blas()
    import mlx.core as mx
    from bench_inputs import resolve_model
    from mesp_mlx.config import TrainConfig
    from mesp_mlx.engines import make_engine
    from mesp_mlx.io.sources import load_model
    from mesp_mlx.lora import LoRAConfig, init_lora
    from mesp_mlx.objectives import SFT
    from mesp_mlx.plan import PLANS, engine_settings
    from mesp_mlx.resident import rss_mb

    store = load_model(resolve_model(a.model))
    params = init_lora(store.args, LoRAConfig(), 0)
    engine = make_engine("mesp", store, 20.0, **engine_settings(TrainConfig().compute(), PLANS[a.plan]))
    ids = mx.random.randint(0, store.args.vocab_size, (1, a.seq + 1), key=mx.random.key(0))
    batch = SFT().batch(ids[:, :-1], ids[:, 1:], mx.ones((1, a.seq)))
    mx.eval(params, batch)
    mx.clear_cache()
    base = mx.get_active_memory()
    mb = lambda v: round((v - base) / 1e6, 1)
    rows = []

    def traced(name):
        inner = getattr(engine, name)

        def call(*args, **kw):
            before = mx.get_active_memory()
            mx.reset_peak_memory()
            out = inner(*args, **kw)
            mx.eval(out)
            rows.append(dict(phase=name, before_mb=mb(before), peak_mb=mb(mx.get_peak_memory()),
                             after_mb=mb(mx.get_active_memory()), rss_mib=round(rss_mb())))
            print(f"{name:15s} before {rows[-1]['before_mb']:8.1f}  peak {rows[-1]['peak_mb']:8.1f}  "
                  f"after {rows[-1]['after_mb']:8.1f}  RSS {rows[-1]['rss_mib']} MiB", flush=True)
            return out
        setattr(engine, name, call)  # the instance's attribute, looked up by loss_and_grad at each call

    for name in ("block_forward", "head_loss", "block_backward"):
        traced(name)
    t = time.perf_counter()
    mx.eval(engine.loss_and_grad(params, batch, on_block=lambda i, g: None))
    print(f"step {time.perf_counter() - t:.1f} s; largest block peak {max(r['peak_mb'] for r in rows):.1f} MB")
    if a.json:
        Path(a.json).write_text(json.dumps(dict(model=a.model, seq=a.seq, plan=a.plan, rows=rows), indent=1))
    return rows


if __name__ == "__main__":
    main()
