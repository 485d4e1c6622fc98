"""Time of a training step's optimizer updates, block by block as the trainer applies them: the trainer's
`OptimizerUpdate` (one element-wise update of each block's parameters laid end to end) beside the optimizer applied
one parameter at a time (`apply_gradients` of the block, what a per-parameter update does), on the LoRA tree of a
model (rank 8, all seven projections), with fixed random gradients. Both run in one process, alternating, and must
end at the same parameters (printed: the largest difference; bit-identical is expected).

    python tools/bench_update.py MODEL [--steps 8] [--optimizer adam] [--compiled]     (from the project root)

MODEL: a store path or a tools/bench_memory.py model spec. Prints one JSON line: the median seconds of a whole
step's updates (warm-up steps dropped) for each, per round.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def run(store, fused, compiled, optimizer, steps):
    import mlx.core as mx
    from mesp_mlx.lora import LoRAConfig, from_flat, init_lora, to_flat
    from mesp_mlx.optimizer import OPTIMIZERS, OptimizerUpdate, make_optimizer
    mx.random.seed(0)
    params = init_lora(store.args, LoRAConfig(rank=8), 0)
    grads = {i: {p: (mx.random.normal(a.shape), mx.random.normal(b.shape)) for p, (a, b) in m.items()}
             for i, m in params.items()}
    mx.eval(params, grads)
    opt = make_optimizer(optimizer, 1e-3)
    opt.init(to_flat(params))
    updates = OptimizerUpdate(opt, OPTIMIZERS[optimizer].elementwise)
    plain = mx.compile(opt.apply_gradients, inputs=opt.state, outputs=opt.state) if compiled else opt.apply_gradients
    times = []
    for _ in range(steps):
        t0, step0 = time.perf_counter(), opt.state["step"]
        for i in reversed(sorted(params)):
            if fused:
                flat = updates(compiled, opt.state["step"] is step0)(to_flat({i: grads[i]}), to_flat({i: params[i]}))
            else:  # every block advancing the count would change the arithmetic: keep one count a step
                opt.state["step"] = step0
                flat = plain(to_flat({i: grads[i]}), to_flat({i: params[i]}))
            params[i] = from_flat(flat)[i]
            mx.eval(flat, opt.state)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[2:]), to_flat(params)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--optimizer", default="adam")
    ap.add_argument("--compiled", action="store_true")
    a = ap.parse_args(argv)
    import mlx.core as mx
    from bench_inputs import resolve_model
    from mesp_mlx.io.sources import load_model
    store = load_model(resolve_model(a.model))
    out = {"model": store.path.name, "optimizer": a.optimizer, "compiled": a.compiled, "fused_s": [],
           "per_parameter_s": []}
    ends = {}
    for _ in range(2):
        for fused in (False, True):
            t, ends[fused] = run(store, fused, a.compiled, a.optimizer, a.steps)
            out["fused_s" if fused else "per_parameter_s"].append(round(t, 4))
    out["max_abs_diff"] = max(float(mx.max(mx.abs(ends[True][k] - ends[False][k]))) for k in ends[True])
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
