"""Cosine and relative error of each method's LoRA gradient against full autodiff, per tensor and overall.

    python tools/bench_gradients.py [--model M] [--seq 64] [--rank 8] [--num-layers 4] [--text FILE]
        [--methods mesp mebp mezo] [--mezo-samples 1 10 100] [--dtype float32|float64] [--json out.json]

The batch is the first seq+1 tokens of --text (default: this file's own source) repeated as needed, or random ids. The LoRA
parameters are initialised as the trainer does, then perturbed so that lora_b is not zero (at init every lora_a
gradient is exactly zero). Relative error is max|g - ref| / max|ref| per tensor, and ||g - ref|| / ||ref|| overall.
MeZO is reported as the mean of n SPSA estimates for each n in --mezo-samples (the papers compare one estimate).

--model takes what bench_memory takes, `preset:NAME[,layers=N,vocab=V]` too (a random-weight 4-bit model of a real
architecture's shape, tools/make_model.py, generated once into the cache); `--preset NAME --layers N [--vocab V]`
is the same spec spelled as flags.

--check is the suite's exactness test run at any shape (tests/test_engines.py's SmolLM2 test: everything in fp64 on
the CPU, where rounding cannot hide a wrong term): MeSP's gradient against one-graph autodiff's, both fp64, every
lora_a and lora_b within the suite's tolerances (tests/helpers.py: max|g - ref| / max|ref| <= 1e-4 and cosine >=
0.99999 per tensor) and the loss within LOSS_TOL_FP64 (below); it prints PASS or FAIL and exits 1 on a failure.
--check-fp32 adds the suite's fp32 test: MeSP's fp32 gradient is at most 2x (+1e-5) as far from the fp64 one as
autodiff's fp32 gradient is. Issue 32's 8B check (the full shape on 2 layers; autodiff holds the whole head and
T x V logits in fp64, ~10+ GB at T=1024 and V=128k):

    python tools/bench_gradients.py --preset llama-3.1-8b --layers 2 --seq 1024 --num-layers -1 --check
    python tools/bench_gradients.py --preset qwen3-8b --layers 2 --seq 1024 --num-layers -1 --check
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_inputs import resolve_model  # noqa: E402 (after the path)

# tests/helpers.py's CPU tolerances (fp64 runs on the CPU only): per tensor, and the fp64 loss's in nats, absolute
# (MLX's CPU exp computes in float32 whatever the dtype: helpers.py derives the bound; the same exp, in softmax and
# SiLU, is why fp64 gradients agree to ~1e-7, not 1e-15)
REL_TOL, COS_TOL, LOSS_TOL_FP64 = 1e-4, 0.99999, 1e-5


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


def model_spec(a):
    """The --model spec, or the --preset flags as a `preset:` spec."""
    if a.preset is None:
        if a.layers is not None or a.vocab is not None:
            raise SystemExit("error: --layers and --vocab go with --preset")
        return a.model
    if a.model:
        raise SystemExit("error: give --model or --preset, not both")
    return "preset:" + ",".join([a.preset] + [f"{k}={v}" for k, v in (("layers", a.layers), ("vocab", a.vocab))
                                             if v is not None])


def batch_ids(a, store):
    import mlx.core as mx
    if a.random:
        return mx.random.randint(0, store.args.vocab_size, (1, a.seq + 1), key=mx.random.key(0))
    ids = store.tokenizer().encode(Path(a.text or __file__).read_text(errors="replace"))
    if not ids:
        raise SystemExit(f"error: {a.text}: no tokens")
    return mx.array([(ids * (1 + (a.seq + 1) // len(ids)))[:a.seq + 1]])


def check(a, store, batch, params):
    """--check (and --check-fp32): -> (results, passed)."""
    import mlx.core as mx
    from mesp_mlx.engines import make_engine
    from mesp_mlx.lora import tree_map
    from mesp_mlx.ops.linear import Compute

    def grads(method, dtype):
        with mx.stream(mx.cpu):
            p = tree_map(lambda t: t.astype(dtype), params)
            compute = Compute(dtype=dtype, matmul="dequantize")
            stats, g = make_engine(method, store, 20.0, compute=compute).loss_and_grad(p, batch)
            return stats["loss"].item(), tree_map(lambda t: t.astype(mx.float64), g)

    truth_loss, truth = grads("autodiff", mx.float64)
    loss, g = grads("mesp", mx.float64)
    rows, overall = compare(g, truth)
    loss_diff = abs(loss - truth_loss)
    loss_rel = loss_diff / max(abs(truth_loss), 1e-300)
    bad = [r for r in rows if not (r["rel_err"] <= REL_TOL and r["cosine"] >= COS_TOL)]
    passed = not bad and loss_diff <= LOSS_TOL_FP64
    worst = max(rows, key=lambda r: r["rel_err"])
    print(f"fp64 mesp vs autodiff: {'PASS' if passed else 'FAIL'}: loss {loss:.10g} vs {truth_loss:.10g} (diff "
          f"{loss_diff:.1e}, bound {LOSS_TOL_FP64:g}); worst tensor {worst['tensor']} rel err {worst['rel_err']:.2e}"
          f" (bound {REL_TOL:g}), lowest cosine {min(r['cosine'] for r in rows):.8f} (bound {COS_TOL}); "
          f"{len(rows)} tensors, {len(bad)} outside")
    for r in bad[:10]:
        print(f"    {r['tensor']:48s} cosine {r['cosine']:.8f}  rel err {r['rel_err']:.2e}")
    results = [{"method": "mesp", "dtype": "float64", "reference": "autodiff float64", "passed": passed,
                "loss_diff": loss_diff, "loss_rel_diff": loss_rel, **overall, "tensors": rows}]
    if a.check_fp32:
        err = {}
        for method in ("mesp", "autodiff"):
            _, g32 = grads(method, mx.float32)
            err[method] = max(r["rel_err"] for r in compare(g32, truth)[0])
        ok = err["mesp"] <= 2 * err["autodiff"] + 1e-5
        print(f"fp32 against the fp64 truth: {'PASS' if ok else 'FAIL'}: mesp max rel err {err['mesp']:.2e}, "
              f"autodiff {err['autodiff']:.2e} (bound: mesp <= 2 x autodiff + 1e-5)")
        results.append({"method": "mesp", "dtype": "float32", "reference": "autodiff float64", "passed": ok,
                        "rel_err": err["mesp"], "autodiff_rel_err": err["autodiff"]})
        passed = passed and ok
    return results, passed


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model dir, .gguf file, hub id or preset:NAME[,layers=N,vocab=V] (default: "
                                   "SmolLM2-135M-Instruct)")
    p.add_argument("--preset", help="a tools/make_model.py preset (random weights of its real shape)")
    p.add_argument("--layers", type=int, help="with --preset: the model's first N layers")
    p.add_argument("--vocab", type=int, help="with --preset: another vocabulary size")
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--num-layers", type=int, default=4, help="adapt the top N layers (-1: all)")
    p.add_argument("--text", help="text file the batch is tokenized from")
    p.add_argument("--random", action="store_true", help="random token ids instead of text")
    p.add_argument("--methods", nargs="+", default=["mesp", "mebp", "mezo"])
    p.add_argument("--mezo-samples", type=int, nargs="+", default=[1, 10, 100])
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--check", action="store_true", help="pass/fail: mesp against autodiff, both fp64 (exit 1 on "
                                                        "a failure)")
    p.add_argument("--check-fp32", action="store_true", help="with --check: also mesp's fp32 error against "
                                                             "autodiff's")
    p.add_argument("--per-tensor", action="store_true", help="print every tensor, not only the worst three")
    p.add_argument("--json", help="write the results here")
    a = p.parse_args(argv)
    if a.seq < 1 or a.rank < 1:
        raise SystemExit("error: --seq and --rank must be >= 1")
    if a.check_fp32 and not a.check:
        raise SystemExit("error: --check-fp32 goes with --check")

    from mesp_mlx.blas import ensure_fast_blas
    ensure_fast_blas()
    import mlx.core as mx
    from mesp_mlx.engines import make_engine
    from mesp_mlx.errors import MespError
    from mesp_mlx.objectives import SFT
    from mesp_mlx.io.sources import load_model
    from mesp_mlx.lora import LoRAConfig, init_lora, tree_map
    from mesp_mlx.ops.linear import Compute

    dtype = mx.float64 if a.check else getattr(mx, a.dtype)
    if dtype == mx.float64:
        mx.set_default_device(mx.cpu)
    compute = Compute(dtype=dtype)
    try:
        store = load_model(resolve_model(model_spec(a)))
    except MespError as e:
        raise SystemExit(f"error: {e}") from None
    if a.num_layers > store.num_layers:
        raise SystemExit(f"error: --num-layers {a.num_layers}: the model has {store.num_layers} layers")
    ids = batch_ids(a, store)
    batch = SFT().batch(ids[:, :-1], ids[:, 1:], mx.ones((1, a.seq)))
    params = init_lora(store.args, LoRAConfig(rank=a.rank, num_layers=a.num_layers), 0)
    params = tree_map(lambda t: (t + 0.02 * mx.random.normal(t.shape, key=mx.random.key(t.size))).astype(dtype),
                      params)
    a_ = store.args
    print(f"{store.path.name}: d {a_.hidden_size}, f {a_.intermediate_size}, {store.num_layers} layers, vocab "
          f"{a_.vocab_size}; T={a.seq}, rank {a.rank} on {len(params)} layers, "
          f"{'float64 (--check)' if a.check else a.dtype}")
    if a.check:
        results, passed = check(a, store, batch, params)
        if a.json:
            Path(a.json).write_text(json.dumps({"model": store.path.name, "seq": a.seq, "rank": a.rank,
                                                "check": True, "passed": passed, "results": results}, indent=1))
        if not passed:
            raise SystemExit(1)
        return results
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
