"""Cosine and relative error of each method's LoRA gradient against full autodiff, per tensor and overall.

    python tools/bench_gradients.py [--model M] [--seq 64] [--rank 8] [--num-layers 4] [--text FILE]
        [--methods mesp mebp mezo] [--mezo-samples 1 10 100] [--dtype float32|float64] [--json out.json]

The batch is the first seq+1 tokens of --text (default: this file's own source) repeated as needed, or random ids. The LoRA
parameters are initialised as the trainer does, then perturbed so that lora_b is not zero (at init every lora_a
gradient is exactly zero). Relative error is max|g - ref| / max|ref| per tensor, and ||g - ref|| / ||ref|| overall.
MeZO is reported as the mean of n SPSA estimates for each n in --mezo-samples (the papers compare one estimate).
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def compare(grads, ref):
    import mlx.core as mx
    rows, dot, n_g, n_r, n_d = [], 0.0, 0.0, 0.0, 0.0
    for i in sorted(ref):
        for p in sorted(ref[i]):
            for k, name in enumerate(("lora_a", "lora_b")):
                with mx.stream(mx.cpu):  # float64 exists only on the CPU (not on Metal or CUDA)
                    g, r = grads[i][p][k].astype(mx.float64), ref[i][p][k].astype(mx.float64)
                    gg, rr, gr = (float(mx.sum(g * g)), float(mx.sum(r * r)), float(mx.sum(g * r)))
                    dd = float(mx.sum((g - r) ** 2))
                    rel = float(mx.max(mx.abs(g - r))) / max(float(mx.max(mx.abs(r))), 1e-30)
                rows.append({"tensor": f"model.layers.{i}.{p}.{name}", "cosine": gr / max((gg * rr) ** 0.5, 1e-300),
                             "rel_err": rel})
                dot, n_g, n_r, n_d = dot + gr, n_g + gg, n_r + rr, n_d + dd
    overall = {"cosine": dot / max((n_g * n_r) ** 0.5, 1e-300), "rel_err": (n_d / max(n_r, 1e-300)) ** 0.5}
    return rows, overall


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model dir, .gguf file or hub id (default: SmolLM2-135M-Instruct)")
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--num-layers", type=int, default=4, help="adapt the top N layers (-1: all)")
    p.add_argument("--text", help="text file the batch is tokenized from")
    p.add_argument("--random", action="store_true", help="random token ids instead of text")
    p.add_argument("--methods", nargs="+", default=["mesp", "mebp", "mezo"])
    p.add_argument("--mezo-samples", type=int, nargs="+", default=[1, 10, 100])
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--per-tensor", action="store_true", help="print every tensor, not only the worst three")
    p.add_argument("--json", help="write the results here")
    a = p.parse_args(argv)

    from mesp_mlx.blas import ensure_fast_blas
    ensure_fast_blas()
    import mlx.core as mx
    from mesp_mlx.engines import make_engine
    from mesp_mlx.objectives import SFT
    from mesp_mlx.io.sources import load_model
    from mesp_mlx.lora import LoRAConfig, init_lora, tree_map
    from mesp_mlx.ops.linear import Compute

    dtype = getattr(mx, a.dtype)
    if dtype == mx.float64:
        mx.set_default_device(mx.cpu)
    compute = Compute(dtype=dtype)
    store = load_model(a.model)
    if a.random:
        ids = mx.random.randint(0, store.args.vocab_size, (1, a.seq + 1), key=mx.random.key(0))
    else:
        ids = store.tokenizer().encode(Path(a.text or __file__).read_text(errors="replace"))
        if not ids:
            sys.exit(f"{a.text}: no tokens")
        ids = mx.array([(ids * (1 + (a.seq + 1) // len(ids)))[:a.seq + 1]])
    batch = SFT().batch(ids[:, :-1], ids[:, 1:], mx.ones((1, a.seq)))
    params = init_lora(store.args, LoRAConfig(rank=a.rank, num_layers=a.num_layers), 0)
    params = tree_map(lambda t: (t + 0.02 * mx.random.normal(t.shape, key=mx.random.key(t.size))).astype(dtype),
                      params)
    print(f"{store.path.name}: T={a.seq}, rank {a.rank} on {len(params)} layers, {a.dtype}")
    ref_stats, ref = make_engine("autodiff", store, 20.0, compute=compute).loss_and_grad(params, batch)
    ref_loss = ref_stats["loss"]
    results = []
    for method in a.methods:
        runs = ([(f"mezo n={n}", make_engine("mezo", store, 20.0, compute=compute, n_samples=n)) for n in a.mezo_samples]
                if method == "mezo" else [(method, make_engine(method, store, 20.0, compute=compute))])
        for label, engine in runs:
            stats, grads = engine.loss_and_grad(params, batch)
            loss = stats["loss"]
            rows, overall = compare(grads, ref)
            results.append({"method": label, "loss_diff": abs(loss.item() - ref_loss.item()), **overall,
                            "tensors": rows})
            print(f"{label:12s} overall cosine {overall['cosine']:.6f}  rel err {overall['rel_err']:.2e}  "
                  f"|loss - autodiff| {abs(loss.item() - ref_loss.item()):.2e}")
            shown = rows if a.per_tensor else sorted(rows, key=lambda r: -r["rel_err"])[:3]
            for r in shown:
                print(f"    {r['tensor']:48s} cosine {r['cosine']:.6f}  rel err {r['rel_err']:.2e}")
    if a.json:
        Path(a.json).write_text(json.dumps({"model": store.path.name, "seq": a.seq, "rank": a.rank,
                                            "dtype": a.dtype, "results": results}, indent=1))
    return results


if __name__ == "__main__":
    main()
