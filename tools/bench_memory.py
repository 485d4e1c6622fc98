"""Memory and time of one training step per method, model, sequence length and rank, each in a fresh process.

    python tools/bench_memory.py --models smollm2-135m-instruct qwen2.5-coder-0.5b-instruct --seqs 128 256 512 1024 \
        --ranks 8 --methods mesp mebp mezo autodiff mlx-lm [--steps 2] [--warmup 1] [--json out.json] [--png out.png]

Measured per run: MLX peak memory over the measured steps (mx.get_peak_memory, after a warm-up step), MLX active
memory before them, the process's peak RSS, and seconds per step. Batch 1, LoRA on all seven projections of every
layer, 4-bit base (a GGUF's own types re-quantized to 4-bit group 64, the papers' base, which mlx-lm's trainer
can read too; `--engine-kw '{"keep_gguf_types": true}'` benchmarks the file's exact types instead; every row
reports the store's bits per weight), one batch of real text (this machine's Python standard library) cut to exactly T tokens.
`mlx-lm` runs mlx-lm's own trainer as a user would (`python -m mlx_lm lora --grad-checkpoint`, same store, same
data, rank and keys) and reads its reported peak memory and speed. The table prints each method's peak and time as
a ratio to mebp's in the same configuration. `method@quantized` / `method@dequantize` forces the product path with
the frozen weights (on the CPU mebp@quantized shows what MeBP holds on Metal, where the head is never dequantized);
ratios are taken against the smallest mebp peak and the fastest mebp time of the same configuration.

`--models preset:qwen2.5-0.5b` (any preset of tools/make_model.py, with optional overrides as in
`preset:smollm2-135m,layers=2,vocab=4096,seed=1,dtype=float16`) benchmarks a random-weight 4-bit model of that
architecture's real shapes, generated once into `$MESP_MLX_CACHE/random/<name>` (default ~/.cache/mesp_mlx).

Every row reports its loss on the batch, the device (MLX's default device and its name) and the host syncs per step.
A row FAILS, and the run exits non-zero after writing its table, when its loss is not finite or differs from mesp's
loss of the same configuration by more than rounding (`loss_tolerance` says why each bound holds): a fast wrong
answer must never look like a win. mezo's step reports the mean of its two perturbed losses, which is not the loss
at the parameters, so its row reports and checks `engine.loss` at the parameters (computed before the measured steps)
and shows the step's value as `loss_step`. mlx-lm's row takes the loss its own report callback gives for its first
step (before any update; LoRA's B starts at zero in both, so all rows see the base model's loss) on the same tokens:
its batch is this tool's text, tokenized by the same tokenizer, with --max-seq-length T+1 so that it predicts the
same T targets (mlx-lm averages over its batch's tokens, as the engines do with an all-ones mask); `same_data` says
whether that held. mlx-lm is warmed up for at least two steps whatever --warmup says (its first steps compile
kernels).

Host syncs: the child process replaces `mlx.core.eval` and `mlx.core.async_eval` with counting wrappers before it
builds the engine (our code calls them as `mx.eval(...)`, a module attribute looked up at each call), and reports
`evals_per_step` (eval + async_eval) and `async_evals_per_step` over the measured steps. `.item()`, `float(array)`
and `tolist()` also sync but cannot be counted this way (they are methods of the array type), so the count is a
lower bound; mezo syncs with `.item()` three times per sample. `--markdown FILE` writes the table as Markdown (the
GPU table of BENCHMARKS.md).

Memory model: mesp's rows also report `extra_mb`, MLX's peak over the measured steps above the active memory before
them, against `model_mb`, the engine's `memory_model` of the step (the planner's prediction without its margin and
the optimizer's state), as the `extra/model MB` column.

Kernels: `kernels_per_step` counts the compute primitives of one more step after the measured ones
(tools/count_kernels.py: every evaluation's pending graph exported and its primitives counted; on a GPU each is at
least one kernel launch; `--no-kernels` skips that step). mlx-lm's row runs its command line and has no count
(`tools/count_kernels.py mlx-lm` has).
"""
import argparse
import dataclasses
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_inputs import bench_ids, bench_text, resolve_model  # noqa: E402 (after the path)


def device_info():
    """MLX's default device, the device's name where MLX reports one, and MLX's version."""
    import mlx.core as mx
    info = {"device": str(mx.default_device()), "mlx": mx.__version__}
    try:
        raw = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
        info.update({k: v for k, v in raw.items() if isinstance(v, (str, int, float))})
    except Exception:  # a backend without the query: the device alone says enough
        pass
    info["name"] = str(info.get("device_name") or info.get("architecture") or info["device"])
    return info


def count_syncs():
    """Replaces mlx.core.eval / async_eval in this process by counting wrappers; returns the live counts."""
    import mlx.core as mx
    counts = {"eval": 0, "async_eval": 0}

    def wrap(fn, key):
        def counted(*args, **kw):
            counts[key] += 1
            return fn(*args, **kw)
        return counted
    mx.eval, mx.async_eval = wrap(mx.eval, "eval"), wrap(mx.async_eval, "async_eval")
    return counts


def engine_options(method_path, engine_kw):
    """(Compute, other make_engine kwargs) from a method's @path and the --engine-kw JSON."""
    import mlx.core as mx
    from mesp_mlx.ops.linear import Compute
    fields = {f.name for f in dataclasses.fields(Compute)}
    ckw = {k: v for k, v in engine_kw.items() if k in fields}
    if isinstance(ckw.get("dtype"), str):
        ckw["dtype"] = getattr(mx, ckw["dtype"])
    if method_path:
        ckw["matmul"] = method_path
    return Compute(**ckw), {k: v for k, v in engine_kw.items() if k not in fields}


def one(model, method, seq, rank, steps, warmup, engine_kw, kernels=True):
    from mesp_mlx.blas import ensure_fast_blas
    ensure_fast_blas()
    import mlx.core as mx
    counts = count_syncs()  # before anything of ours is imported or built
    from count_kernels import KernelCounter
    from mesp_mlx.engines import make_engine
    from mesp_mlx.io.sources import load_model
    from mesp_mlx.lora import LoRAConfig, init_lora
    from mesp_mlx.objectives import SFT
    from mesp_mlx.resident import rss_mb
    method, _, path = method.partition("@")
    keep_types = engine_kw.pop("keep_gguf_types", False)
    compute, kw = engine_options(path, engine_kw)
    store = load_model(resolve_model(model), requantize=not keep_types)
    params = init_lora(store.args, LoRAConfig(rank=rank), 0)
    ids = mx.array([bench_ids(store.tokenizer(), seq)])
    batch = SFT().batch(ids[:, :-1], ids[:, 1:], mx.ones((1, seq)))
    engine = make_engine(method, store, 20.0, compute=compute, **kw)
    # the engine's own memory model of one step (all gradients kept, as here), where it has one (mesp)
    modelled = engine.memory_model(1, seq, params)["peak"] / 1e6 if hasattr(engine, "memory_model") else None
    mx.eval(params)
    if method == "mezo":  # its SPSA step with the SGD update applied block by block, as a run trains
        def sgd(i, g):
            params[i] = {p: (a - 1e-4 * g[p][0], b - 1e-4 * g[p][1]) for p, (a, b) in params[i].items()}
        run = lambda: (engine.train_step(params, batch, sgd, lambda tree: tree),)
    else:
        run = lambda: engine.loss_and_grad(params, batch)
    res = {}
    if method == "mezo":  # the loss at the parameters, comparable with mesp's; its step reports perturbed ones
        res["loss"] = float(engine.loss(params, batch)["loss"])
    for _ in range(warmup):
        run()
    mx.clear_cache()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    counts.update(eval=0, async_eval=0)
    losses = []
    t = time.perf_counter()
    for _ in range(steps):
        losses.append(run()[0])
    dt = time.perf_counter() - t
    n_eval, n_async = counts["eval"], counts["async_eval"]
    # read after the clock stops: a loss still lazy here would otherwise be computed inside the timing
    res["loss_step" if method == "mezo" else "loss"] = float(losses[0]["loss"])
    res = dict(res, s_per_step=dt / steps, peak_mb=mx.get_peak_memory() / 1e6, active_before_mb=base / 1e6,
               extra_mb=(mx.get_peak_memory() - base) / 1e6, model_mb=modelled,
               rss_peak_mb=rss_mb(), evals_per_step=(n_eval + n_async) / steps,
               async_evals_per_step=n_async / steps, bits_per_weight=store.bits_per_weight(), **device_info())
    if not kernels:
        return res
    with KernelCounter() as k:  # one more step, after the measured ones: exporting its graphs takes time
        run()
    return dict(res, kernels_per_step=k.summary()["compute_prims"])


def run_mlx_lm_lora(argv):
    """Runs mlx-lm's `lora` command line (`python -m mlx_lm lora <argv>`) in this process, its console output sent to
    stderr. Returns [(kind, seconds since start, info)] from its own report callback, kind "train" or "val" (its
    console no longer prints the peak memory)."""
    from mesp_mlx.blas import ensure_fast_blas
    ensure_fast_blas()
    counts = count_syncs()
    import mlx_lm.lora as mlx_lora
    from mlx_lm.tuner.callbacks import TrainingCallback
    reports, t0 = [], time.perf_counter()

    class Record(TrainingCallback):
        def on_train_loss_report(self, info):
            reports.append(("train", time.perf_counter() - t0, dict(info, syncs=counts["eval"] + counts["async_eval"],
                                                                     async_syncs=counts["async_eval"])))

        def on_val_loss_report(self, info):
            reports.append(("val", time.perf_counter() - t0, info))

    # mlx_lm.lora.run ignores its training_callback argument and asks get_reporting_callbacks for one
    mlx_lora.get_reporting_callbacks = lambda *a, **k: Record()
    sys.argv = ["mlx_lm.lora"] + argv
    stdout, sys.stdout = sys.stdout, sys.stderr  # keep our stdout for the result line
    try:
        mlx_lora.main()
    finally:
        sys.stdout = stdout
    return reports


def activation_dtype(store_path):
    """The dtype mlx-lm computes in on this store: its embedding's output dtype (the scales' dtype when quantized),
    read from the safetensors header without loading a tensor."""
    import glob
    import mlx.core as mx
    for f in sorted(glob.glob(str(Path(store_path) / "*.safetensors"))):
        w = mx.load(f)  # lazy: only the header is read
        for name in ("model.embed_tokens.scales", "model.embed_tokens.weight"):
            if name in w:
                return str(w[name].dtype).replace("mlx.core.", "")
    return None


def mlx_lm_run(model, seq, rank, steps, warmup):
    """mlx-lm's trainer as a user runs it (its `lora` command line, same store and text, --grad-checkpoint), with
    the peak memory, speed and loss it measures itself, after at least two warm-up steps."""
    from mesp_mlx.io.sources import load_model
    from mesp_mlx.resident import rss_mb
    from mlx_lm.utils import load_tokenizer
    store = load_model(resolve_model(model), requantize=True)  # mlx-lm reads no packed GGML blocks
    tok = store.tokenizer()
    text = bench_text(tok, seq)
    # mlx-lm's loader: encode (its tokenizer, special tokens as it adds them), append eos, cut to max-seq-length
    same = load_tokenizer(store.path).encode(text)[:seq + 1] == bench_ids(tok, seq)
    warmup = max(warmup, 2)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        data.mkdir()
        row = json.dumps({"text": text})
        for split in ("train", "valid"):
            (data / f"{split}.jsonl").write_text((row + "\n") * 4)
        cfg = Path(tmp) / "lora.yaml"
        # the model's own adaptable projections, as our engines adapt (Qwen3.5: linear_attn.* too)
        keys = list(store.args.projections())
        cfg.write_text(json.dumps({"lora_parameters": {"rank": rank, "scale": 20.0, "dropout": 0.0, "keys": keys}}))
        reports = [info for kind, _, info in run_mlx_lm_lora(
            ["--model", str(store.path), "--train", "--data", str(data), "--iters", str(warmup + steps),
             "--batch-size", "1", "--num-layers", "-1", "--max-seq-length", str(seq + 1), "--grad-checkpoint",
             "--steps-per-report", "1", "--steps-per-eval", "100000", "--val-batches", "1",
             "--adapter-path", str(Path(tmp) / "ad"), "-c", str(cfg)]) if kind == "train"]
    timed = reports[warmup:] or reports
    syncs = [b["syncs"] - a["syncs"] for a, b in zip(reports, reports[1:])][warmup - 1:]
    asyncs = [b["async_syncs"] - a["async_syncs"] for a, b in zip(reports, reports[1:])][warmup - 1:]
    return {"s_per_step": sum(1 / r["iterations_per_second"] for r in timed) / len(timed),
            "peak_mb": max(r["peak_memory"] for r in reports) * 1e3, "active_before_mb": None,
            "rss_peak_mb": rss_mb(), "loss": reports[0]["train_loss"], "same_data": same,
            "act_dtype": activation_dtype(store.path),
            "evals_per_step": sum(syncs) / len(syncs) if syncs else None,
            "async_evals_per_step": sum(asyncs) / len(asyncs) if asyncs else None, **device_info()}


def child(a):
    if a.one == "mlx-lm":
        res = mlx_lm_run(a.models[0], a.seqs[0], a.ranks[0], a.steps, a.warmup)
    else:
        res = one(a.models[0], a.one, a.seqs[0], a.ranks[0], a.steps, a.warmup, json.loads(a.engine_kw),
                  not a.no_kernels)
    print(json.dumps(res))


UNIT_ROUNDOFF = {"float32": 2.0 ** -24, "float16": 2.0 ** -11, "bfloat16": 2.0 ** -8}


def loss_tolerance(row):
    """Relative bound on |loss - mesp's loss| / |mesp's loss| for a row that computes the same loss.

    Our engines: the same fp32 math on the same dequantized weights, summed in another order. On the CPU that is
    true fp32 (unit roundoff 6e-8) and the loss, a sum of a few thousand terms through a chain of ~20 products per
    layer, agrees to 1e-4 relative (the suite's REL_TOL for whole-model gradients). CUDA runs fp32 matmuls with
    TF32-like inputs (unit roundoff 4.9e-4; 3e-4 measured between the CPU and an H100): 2e-3 (Metal is true fp32,
    the bound holds there too). mlx-lm computes in its model's dtype (act_dtype: the embedding's output dtype,
    bfloat16 for mlx-community's 4-bit models): the hidden state is rounded to unit roundoff u a few times per
    layer, partly cancelling, and the loss moves by at most the largest change of a logit; 8u (3e-2 for bfloat16,
    4e-3 for float16) with the device bound as a floor. What a wrong answer costs is much more: on a random-weight
    model a dropped layer or a wrong head chunk moves the loss by percents, on a real one by whole nats.
    The full-logits rows (mebp, autodiff) take MLX's logsumexp over all V logits in fp32, which was measured 2e-4
    off the fp64 value at V = 152k (a sum of V terms rounds up to ~V u: docs/platform.md); our chunked
    online lse was
    3.6e-5 off. Those rows get 1e-3."""
    base = 2e-3 if "gpu" in str(row.get("device", "")) else 1e-4
    if row["method"].split("@")[0] in ("mebp", "autodiff"):
        base = max(base, 1e-3)
    if row["method"] == "mlx-lm":
        return max(base, 8 * UNIT_ROUNDOFF.get(row.get("act_dtype") or "bfloat16", 2.0 ** -8))
    return base


def check_losses(rows):
    """Marks each row with loss_ok (False: FAIL) against mesp's loss of the same model, T, rank and engine options
    (mebp's where no mesp row ran); returns the failed rows. A non-finite loss always fails."""
    failed = []
    for r in rows:
        if "error" in r or r.get("loss") is None:
            continue
        same = [x for x in rows if "error" not in x and x.get("loss") is not None
                and (x["model"], x["seq"], x["rank"], x.get("engine_kw")) == (r["model"], r["seq"], r["rank"],
                                                                             r.get("engine_kw"))]
        refs = [x for m in ("mesp", "mebp") for x in same if x["method"].split("@")[0] == m]
        ref = refs[0] if refs else None
        r["loss_ok"], r["loss_why"] = True, ""
        if not math.isfinite(r["loss"]):
            r["loss_ok"], r["loss_why"] = False, "loss not finite"
        elif ref is not None and ref is not r and math.isfinite(ref["loss"]):
            rel = abs(r["loss"] - ref["loss"]) / max(abs(ref["loss"]), 1e-30)
            r.update(loss_ref=ref["loss"], loss_ref_method=ref["method"], loss_rel_diff=rel,
                     loss_tol=loss_tolerance(r))
            if rel > r["loss_tol"]:
                r["loss_ok"] = False
                r["loss_why"] = f"loss {r['loss']:.6g} vs {ref['method']} {ref['loss']:.6g} (rel {rel:.1e} > " \
                                f"{r['loss_tol']:.0e})"
        if r["method"] == "mlx-lm" and r.get("same_data") is False:
            r["loss_ok"], r["loss_why"] = False, "mlx-lm tokenized the text differently (not the same batch)"
        if not r["loss_ok"]:
            failed.append(r)
    return failed


COLUMNS = ["model", "T", "r", "method", "peak MB", "RSS MB", "s/step", "peak/mebp", "time/mebp", "loss",
           "evals/step", "kernels", "extra/model MB", "check"]


def table_rows(rows):
    """One list of cells per row (strings), in COLUMNS order."""
    out = []
    for r in rows:
        head = [str(r["model"]), str(r["seq"]), str(r["rank"]), r["method"]]
        if "error" in r:
            out.append(head + ["-"] * 9 + ["failed: " + " ".join(r["error"].split())[-120:]])
            continue
        refs = [x for x in rows if x["method"].split("@")[0] == "mebp" and "error" not in x
                and (x["model"], x["seq"], x["rank"]) == (r["model"], r["seq"], r["rank"])]
        ref = {"peak_mb": min(x["peak_mb"] for x in refs), "s_per_step": min(x["s_per_step"] for x in refs)} \
            if refs else None
        ratio = (lambda k: f"{r[k] / ref[k]:.2f}" if ref else "")
        loss = r.get("loss")
        check = "" if "loss_ok" not in r else ("ok" if r["loss_ok"] else "FAIL: " + r["loss_why"])
        eps, kernels = r.get("evals_per_step"), r.get("kernels_per_step")
        out.append(head + [f"{r['peak_mb']:.1f}", f"{r['rss_peak_mb']:.0f}" if r.get("rss_peak_mb") else "-",
                           f"{r['s_per_step']:.2f}", ratio("peak_mb"), ratio("s_per_step"),
                           "-" if loss is None else f"{loss:.5f}", "-" if eps is None else f"{eps:g}",
                           "-" if kernels is None else str(kernels),
                           f"{r['extra_mb']:.1f}/{r['model_mb']:.1f}" if r.get("model_mb") else "-", check])
    return out


def header(info):
    return f"device: {info['name']} ({info['device']}), MLX {info['mlx']}"


def table(rows, info=None):
    widths = [max([30] + [len(str(r["model"])) for r in rows]), 5, 3, 15, 9, 8, 8, 9, 9, 10, 10, 8, 15, 0]
    fmt = lambda cells: " ".join(c.rjust(w) if 0 < k and k != 3 and w else c.ljust(w)
                                 for k, (c, w) in enumerate(zip(cells, widths))).rstrip()
    lines = ([header(info)] if info else []) + [fmt(COLUMNS)] + [fmt(c) for c in table_rows(rows)]
    return "\n".join(lines)


def markdown(rows, info):
    lines = [f"Device: {info['name']} ({info['device']}), MLX {info['mlx']}.", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in cells) + " |" for cells in table_rows(rows)]
    return "\n".join(lines) + "\n"


def plot(rows, png):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        for method in sorted({r["method"] for r in rows}):
            pts = sorted((r["seq"], r["peak_mb"]) for r in rows
                         if r["model"] == model and r["method"] == method and "peak_mb" in r)
            if pts:
                ax.plot(*zip(*pts), "o-", label=method)
        ax.set(xscale="log", yscale="log", xlabel="sequence length", ylabel="MLX peak MB", title=model)
        ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["smollm2-135m-instruct"])
    p.add_argument("--seqs", type=int, nargs="+", default=[256])
    p.add_argument("--ranks", type=int, nargs="+", default=[8])
    p.add_argument("--methods", nargs="+", default=["mesp", "mebp", "mezo", "autodiff", "mlx-lm"])
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--timeout", type=int, default=3600, help="seconds per run")
    p.add_argument("--engine-kw", default="{}", help='engine options as JSON, e.g. \'{"checkpoints": "disk"}\'')
    p.add_argument("--no-kernels", action="store_true", help="skip the kernel count (one more step per row)")
    p.add_argument("--json")
    p.add_argument("--png")
    p.add_argument("--markdown", help="write the table as Markdown to this file")
    p.add_argument("--one", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.one:
        return child(a)
    for model in a.models:  # generated here once, not by the children at the same time
        resolve_model(model)
    info = device_info()
    print(header(info), flush=True)
    rows = []
    for model in a.models:
        for seq in a.seqs:
            for rank in a.ranks:
                for method in a.methods:
                    cmd = [sys.executable, __file__, "--one", method, "--models", model, "--seqs", str(seq),
                           "--ranks", str(rank), "--steps", str(a.steps), "--warmup", str(a.warmup),
                           "--engine-kw", a.engine_kw] + (["--no-kernels"] if a.no_kernels else [])
                    row = {"model": model, "seq": seq, "rank": rank, "method": method, "engine_kw": a.engine_kw}
                    try:
                        out = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout)
                        if out.returncode == 0:
                            row.update(json.loads(out.stdout.strip().splitlines()[-1]))
                        else:
                            row["error"] = out.stderr[-600:]
                    except subprocess.TimeoutExpired:
                        row["error"] = f"over {a.timeout} s"
                    rows.append(row)
                    print(table([row]).splitlines()[-1], flush=True)
    failed = check_losses(rows)
    print(table(rows, info))
    if a.json:
        import platform
        Path(a.json).write_text(json.dumps({"machine": platform.platform(), "processor": platform.processor(),
                                            "mlx": info["mlx"], "device": info, "rows": rows}, indent=1))
    if a.markdown:
        Path(a.markdown).write_text(markdown(rows, info))
    if a.png:
        plot(rows, a.png)
    if failed:
        raise SystemExit(f"{len(failed)} row(s) FAILED the loss check: " +
                         "; ".join(f"{r['model']} T={r['seq']} {r['method']}: {r['loss_why']}" for r in failed))
    return rows


if __name__ == "__main__":
    main()
