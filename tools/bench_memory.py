"""Memory and time of one training step per method, model, sequence length and rank, each in a fresh process.

    python tools/bench_memory.py --models smollm2-135m-instruct qwen2.5-coder-0.5b-instruct --seqs 128 256 512 1024 \
        --ranks 8 --methods mesp mebp mezo autodiff mlx-lm [--steps 2] [--warmup 1] [--json out.json] [--png out.png]

Measured per run: MLX peak memory over the measured steps (mx.get_peak_memory, after a warm-up step), MLX active
memory before them, the process's peak RSS, and seconds per step. Batch 1, LoRA on all seven projections of every
layer, 4-bit base, one batch of real text (this machine's Python standard library) cut to exactly T tokens.
`mlx-lm` runs mlx-lm's own trainer as a user would (`python -m mlx_lm lora --grad-checkpoint`, same store, same
data, rank and keys) and reads its reported peak memory and speed. The table prints each method's peak and time as
a ratio to mebp's in the same configuration. `method@quantized` / `method@dequantize` forces the product path with
the frozen weights (on the CPU mebp@quantized shows what MeBP holds on Metal, where the head is never dequantized);
ratios are taken against the smallest mebp peak and the fastest mebp time of the same configuration.
"""
import argparse
import json
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
KEYS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
        "mlp.up_proj", "mlp.down_proj"]


def text_tokens(tokenizer, n):
    text = (Path(sysconfig.get_paths()["stdlib"]) / "json" / "decoder.py").read_text()
    ids = tokenizer.encode(text)
    return (ids * (1 + n // len(ids)))[:n]


def one(model, method, seq, rank, steps, warmup, engine_kw):
    from mesp_mlx.blas import ensure_fast_blas
    ensure_fast_blas()
    import mlx.core as mx
    from mesp_mlx.engines import make_engine
    from mesp_mlx.io.sources import load_model
    from mesp_mlx.lora import LoRAConfig, init_lora
    from mesp_mlx.ops.linear import set_matmul_path
    from mesp_mlx.report import rss_mb
    method, _, path = method.partition("@")
    set_matmul_path(path or "auto")
    store = load_model(model)
    params = init_lora(store.args, LoRAConfig(rank=rank), 0)
    ids = mx.array([text_tokens(store.tokenizer(), seq + 1)])
    batch = (ids[:, :-1], ids[:, 1:], mx.ones((1, seq)))
    engine = make_engine(method, store, 20.0, **engine_kw)
    mx.eval(params)
    run = (lambda: engine.step(params, batch, 1e-4)) if method == "mezo" else \
        (lambda: engine.loss_and_grad(params, batch))
    for _ in range(warmup):
        run()
    mx.clear_cache()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    t = time.perf_counter()
    for _ in range(steps):
        run()
    return {"s_per_step": (time.perf_counter() - t) / steps, "peak_mb": mx.get_peak_memory() / 1e6,
            "active_before_mb": base / 1e6, "rss_peak_mb": rss_mb()}


def run_mlx_lm_lora(argv):
    """Runs mlx-lm's `lora` command line (`python -m mlx_lm lora <argv>`) in this process, its console output sent to
    stderr. Returns [(kind, seconds since start, info)] from its own report callback, kind "train" or "val" (its
    console no longer prints the peak memory)."""
    from mesp_mlx.blas import ensure_fast_blas
    ensure_fast_blas()
    import mlx_lm.lora as mlx_lora
    from mlx_lm.tuner.callbacks import TrainingCallback
    reports, t0 = [], time.perf_counter()

    class Record(TrainingCallback):
        def on_train_loss_report(self, info):
            reports.append(("train", time.perf_counter() - t0, info))

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


def mlx_lm_run(model, seq, rank, steps, warmup):
    """mlx-lm's trainer as a user runs it (its `lora` command line, same store and text, --grad-checkpoint), with
    the peak memory and speed it measures itself."""
    from mesp_mlx.io.sources import load_model
    from mesp_mlx.report import rss_mb
    store = load_model(model)
    tok = store.tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        data.mkdir()
        row = json.dumps({"text": tok.decode(text_tokens(tok, seq + 64))})
        for split in ("train", "valid"):
            (data / f"{split}.jsonl").write_text((row + "\n") * 4)
        cfg = Path(tmp) / "lora.yaml"
        cfg.write_text(json.dumps({"lora_parameters": {"rank": rank, "scale": 20.0, "dropout": 0.0, "keys": KEYS}}))
        reports = [info for kind, _, info in run_mlx_lm_lora(
            ["--model", str(store.path), "--train", "--data", str(data), "--iters", str(warmup + steps),
             "--batch-size", "1", "--num-layers", "-1", "--max-seq-length", str(seq), "--grad-checkpoint",
             "--steps-per-report", "1", "--steps-per-eval", "100000", "--val-batches", "1",
             "--adapter-path", str(Path(tmp) / "ad"), "-c", str(cfg)]) if kind == "train"]
    timed = reports[warmup:] or reports
    return {"s_per_step": sum(1 / r["iterations_per_second"] for r in timed) / len(timed),
            "peak_mb": max(r["peak_memory"] for r in reports) * 1e3, "active_before_mb": None,
            "rss_peak_mb": rss_mb()}


def child(a):
    if a.one == "mlx-lm":
        res = mlx_lm_run(a.models[0], a.seqs[0], a.ranks[0], a.steps, a.warmup)
    else:
        res = one(a.models[0], a.one, a.seqs[0], a.ranks[0], a.steps, a.warmup, json.loads(a.engine_kw))
    print(json.dumps(res))


def table(rows):
    lines = [f"{'model':30s} {'T':>5s} {'r':>3s} {'method':15s} {'peak MB':>9s} {'RSS MB':>8s} {'s/step':>8s} "
             f"{'peak/mebp':>9s} {'time/mebp':>9s}"]
    for r in rows:
        refs = [x for x in rows if x["method"].split("@")[0] == "mebp" and "error" not in x
                and (x["model"], x["seq"], x["rank"]) == (r["model"], r["seq"], r["rank"])]
        ref = {"peak_mb": min(x["peak_mb"] for x in refs), "s_per_step": min(x["s_per_step"] for x in refs)} \
            if refs else None
        if "error" in r:
            lines.append(f"{r['model']:30s} {r['seq']:5d} {r['rank']:3d} {r['method']:15s} failed: {r['error'][-120:]}")
            continue
        ratio = (lambda k: f"{r[k] / ref[k]:9.2f}" if ref else f"{'':9s}")
        rss = f"{r['rss_peak_mb']:8.0f}" if r.get("rss_peak_mb") else f"{'-':>8s}"
        lines.append(f"{r['model']:30s} {r['seq']:5d} {r['rank']:3d} {r['method']:15s} {r['peak_mb']:9.1f} {rss} "
                     f"{r['s_per_step']:8.2f} {ratio('peak_mb')} {ratio('s_per_step')}")
    return "\n".join(lines)


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
    p.add_argument("--json")
    p.add_argument("--png")
    p.add_argument("--one", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.one:
        return child(a)
    rows = []
    for model in a.models:
        for seq in a.seqs:
            for rank in a.ranks:
                for method in a.methods:
                    cmd = [sys.executable, __file__, "--one", method, "--models", model, "--seqs", str(seq),
                           "--ranks", str(rank), "--steps", str(a.steps), "--warmup", str(a.warmup),
                           "--engine-kw", a.engine_kw]
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
    print(table(rows))
    if a.json:
        import platform
        import mlx.core as mx
        Path(a.json).write_text(json.dumps({"machine": platform.platform(), "processor": platform.processor(),
                                            "mlx": mx.__version__, "rows": rows}, indent=1))
    if a.png:
        plot(rows, a.png)
    return rows


if __name__ == "__main__":
    main()
