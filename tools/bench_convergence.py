"""Loss and held-out perplexity against step and against wall time, for mesp and mezo (and mlx-lm's trainer), on
real text every machine has (a package of the Python standard library, files held out for validation).

    python tools/bench_convergence.py [--model M] [--data python-stdlib:json] [--iters 100] [--seq 256]
        [--methods mesp mezo mlx-lm] [--mezo-lr 1e-4] [--json out.json] [--png out.png]

mesp and mlx-lm use AdamW at --lr; mezo uses SGD on its SPSA estimate at --mezo-lr (eps 1e-2), as in its paper.
Each method runs in its own process through the same trainer a user runs.
"""
import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def ours(a, method, out):
    from mesp_mlx.train import main as train
    lr = a.mezo_lr if method == "mezo" else a.lr
    rc = train(["--model", a.model or "smollm2-135m-instruct", "--data", a.data, "--method", method,
                "--iters", str(a.iters), "--max-seq-length", str(a.seq), "--learning-rate", str(lr),
                "--optimizer", "sgd" if method == "mezo" else "adamw", "--steps-per-report", str(a.report),
                "--steps-per-eval", str(a.eval_every), "--val-batches", str(a.val_batches), "--sample-prompt", "",
                "--adapter-path", str(out), "--save-every", str(10 ** 9)])
    if rc:
        raise SystemExit(rc)
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return {"train": [(r["iter"], r["elapsed_s"], r["train_loss"]) for r in rows if "train_loss" in r],
            "val": [(r["iter"], r["elapsed_s"], r["val_loss"]) for r in rows if "val_loss" in r]}


def mlx_lm(a, out):
    """mlx-lm's trainer on the same windows of text (written as jsonl rows), recording its reports."""
    from bench_memory import run_mlx_lm_lora
    from mesp_mlx.data import load_datasets
    from mesp_mlx.io.sources import load_model
    store = load_model(a.model)
    tok = store.tokenizer()
    data = Path(out) / "data"
    data.mkdir(parents=True)
    for split, ds in load_datasets(tok, a.data, a.seq, False).items():
        (data / f"{split}.jsonl").write_text("".join(json.dumps({"text": tok.decode(ids[:-1])}) + "\n"
                                                     for ids, _ in ds.examples))
    reports = run_mlx_lm_lora(
        ["--model", str(store.path), "--train", "--data", str(data), "--iters", str(a.iters), "--batch-size", "1",
         "--num-layers", "-1", "--max-seq-length", str(a.seq), "--grad-checkpoint", "--learning-rate", str(a.lr),
         "--steps-per-report", str(a.report), "--steps-per-eval", str(a.eval_every), "--val-batches",
         str(a.val_batches), "--adapter-path", str(Path(out) / "ad")])
    # mlx-lm numbers a validation report by the iteration before it
    return {"train": [(i["iteration"], t, i["train_loss"]) for kind, t, i in reports if kind == "train"],
            "val": [(i["iteration"] + 1, t, i["val_loss"]) for kind, t, i in reports if kind == "val"]}


def plot(results, png):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(11, 4))
    for method, r in results.items():
        for ax, x in ((by_step, 0), (by_time, 1)):
            line, = ax.plot([p[x] for p in r["train"]], [p[2] for p in r["train"]], label=f"{method} train")
            if r["val"]:
                ax.plot([p[x] for p in r["val"]], [p[2] for p in r["val"]], "o--", color=line.get_color(),
                        label=f"{method} held out")
    by_step.set(xlabel="step", ylabel="loss", title="Loss by step")
    by_time.set(xlabel="seconds", ylabel="loss", title="Loss by wall time")
    by_step.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model")
    p.add_argument("--data", default="python-stdlib:json")
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--mezo-lr", type=float, default=1e-4)
    p.add_argument("--report", type=int, default=5)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--val-batches", type=int, default=8)
    p.add_argument("--methods", nargs="+", default=["mesp", "mezo", "mlx-lm"])
    p.add_argument("--json")
    p.add_argument("--png")
    p.add_argument("--one", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.one:
        with tempfile.TemporaryDirectory() as tmp:
            res = mlx_lm(a, tmp) if a.one == "mlx-lm" else ours(a, a.one, tmp)
        print("RESULT " + json.dumps(res))
        return
    results = {}
    for method in a.methods:
        args = [sys.executable, __file__, "--one", method] + [x for x in (argv or sys.argv[1:])]
        out = subprocess.run(args, capture_output=True, text=True)
        line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
        if out.returncode or not line:
            print(f"{method}: failed\n{out.stderr[-1500:]}")
            continue
        results[method] = json.loads(line[-1][len("RESULT "):])
        r = results[method]
        val = f", held-out loss {r['val'][0][2]:.3f} -> {r['val'][-1][2]:.3f}" if r["val"] else ""
        print(f"{method:7s} train loss {r['train'][0][2]:.3f} -> {r['train'][-1][2]:.3f} in "
              f"{r['train'][-1][1]:.0f} s{val}", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    if a.png and results:
        plot(results, a.png)
    return results


if __name__ == "__main__":
    main()
