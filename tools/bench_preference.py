"""Memory and time of one DPO / ORPO step against one SFT step on the same tokens, each in a fresh process, and
mlx-lm-lora's own DPO on the same model, rows and rank.

    python tools/bench_preference.py --model smollm2-135m-instruct --seq 128 --methods mesp mebp \
        [--losses sft dpo orpo] [--mlx-lm-lora PATH] [--steps 2] [--warmup 1] [--json out.json]

The batch is one pair: two rows of exactly T tokens of real text (this machine's Python standard library), the
first 8 targets of each masked as a prompt. SFT trains on the same two rows. DPO's reference scores are made-up
constants (computing them is a forward done once per row before training, cached; not part of a step). Measured
per run: MLX peak over the measured steps (after the warm-up), the process's peak RSS and seconds per step; the
table gives each preference row's ratios to SFT with the same method.

--mlx-lm-lora PATH: also runs mlx-lm-lora's trainer (`python -m mlx_lm_lora.train --train-mode dpo`, PATH put on
PYTHONPATH: a folder with the unpacked mlx_lm_lora package, or '' when it is installed) on the same store and the
same two texts as a prompt/chosen/rejected row, rank and seven projections, its reference model the base, and
reads its reported peak memory and speed. It holds the whole graph (and a second copy of the model as the
reference), and on the CPU it runs the quantized matmul kernel, so its times there are not comparable; its peak is.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_inputs import KEYS, resolve_model, text_tokens  # noqa: E402

PROMPT = 8


def pair_ids(tokenizer, seq):
    ids = text_tokens(tokenizer, 2 * (seq + 1))
    return ids[: seq + 1], ids[seq + 1:]


def one(model, method, loss, seq, rank, steps, warmup):
    from mesp_mlx.blas import ensure_fast_blas
    ensure_fast_blas()
    import mlx.core as mx
    from mesp_mlx.engines import make_engine
    from mesp_mlx.io.sources import load_model
    from mesp_mlx.lora import LoRAConfig, init_lora
    from mesp_mlx.objectives import OBJECTIVES
    from mesp_mlx.resident import rss_mb
    store = load_model(resolve_model(model))
    params = init_lora(store.args, LoRAConfig(rank=rank), 0)
    ids = mx.array(list(pair_ids(store.tokenizer(), seq)))
    mask = mx.ones((2, seq))
    mask[:, :PROMPT] = 0
    objective = OBJECTIVES[loss]() if loss == "sft" else OBJECTIVES[loss](0.1)
    fields = {"reference": mx.array([-500.0, -520.0])} if objective.needs_reference else {}
    batch = objective.batch(ids[:, :-1], ids[:, 1:], mask, **fields)
    engine = make_engine(method, store, 20.0)

    def sgd(i, g):
        params[i] = {p: (a - 1e-4 * g[p][0], b - 1e-4 * g[p][1]) for p, (a, b) in params[i].items()}

    run = lambda: engine.train_step(params, batch, sgd, lambda tree: tree)
    for _ in range(warmup):
        run()
    mx.clear_cache()
    mx.reset_peak_memory()
    t = time.perf_counter()
    out = [run() for _ in range(steps)]
    dt = time.perf_counter() - t
    return dict(model=model, method=method, loss=loss, seq=seq, rows=2, value=float(out[0]["loss"]), s_per_step=dt / steps,
                peak_mb=mx.get_peak_memory() / 1e6, rss_peak_mb=rss_mb())


# mlx-lm-lora's DPO trainer reads mx.device_info()["max_recommended_working_set_size"], which only Metal reports
# (KeyError on Linux, measured with 5.10.2): its launcher supplies the key (0: no wired limit) and runs it unchanged
LAUNCH = ("import runpy, sys, mlx.core as mx; info = mx.device_info; "
          "mx.device_info = lambda: {'max_recommended_working_set_size': 0, **info()}; "
          "sys.argv[0] = 'mlx_lm_lora.train'; runpy.run_module('mlx_lm_lora.train', run_name='__main__')")


def mlx_lm_lora_run(model, seq, rank, steps, warmup, path):
    """mlx-lm-lora's DPO as a user runs it, on the same two texts; its report lines give peak memory and speed."""
    from mesp_mlx.io.sources import load_model
    store = load_model(resolve_model(model))
    tok = store.tokenizer()
    chosen, rejected = pair_ids(tok, seq)
    row = {"prompt": tok.decode(chosen[:PROMPT]), "chosen": tok.decode(chosen[PROMPT:]),
           "rejected": tok.decode(rejected[PROMPT:])}
    with tempfile.TemporaryDirectory() as d:
        for split in ("train", "valid"):
            (Path(d) / f"{split}.jsonl").write_text(json.dumps(row) + "\n")
        cfg = Path(d) / "c.yaml"
        cfg.write_text(json.dumps({"lora_parameters": {"rank": rank, "scale": 20.0, "dropout": 0.0, "keys": KEYS}}))
        argv = [sys.executable, "-c", LAUNCH, "--train-mode", "dpo", "--model", str(store.path),
                "--train", "--data", d, "--iters", str(steps + max(warmup, 2)), "--batch-size", "1",
                "--num-layers", "-1", "--max-seq-length", str(seq + 64), "--steps-per-report", "1",
                "--steps-per-eval", "100000", "--adapter-path", str(Path(d) / "ad"), "--beta", "0.1", "-c", str(cfg)]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (path, os.environ.get("PYTHONPATH")) if p))
        t = time.perf_counter()
        r = subprocess.run(argv, capture_output=True, text=True, env=env)
        wall = time.perf_counter() - t
    text = r.stdout + r.stderr
    if r.returncode != 0:
        return dict(model=model, method="mlx-lm-lora", loss="dpo", seq=seq, error=text[-1500:])
    import re
    peaks = [float(m) for m in re.findall(r"peak_mem ([0-9.]+) ?GB", text)]  # its "Iter N: ..." report lines
    its = [float(m) for m in re.findall(r"it/s ([0-9.]+),", text)]
    return dict(model=model, method="mlx-lm-lora", loss="dpo", seq=seq, rows=2,
                peak_mb=1000 * max(peaks) if peaks else None,
                s_per_step=1 / its[-1] if its and its[-1] > 0 else None, wall_s=wall, log_tail=text[-600:])


def table(rows):
    sft = {(r["method"], r["seq"]): r for r in rows if r.get("loss") == "sft" and "peak_mb" in r}
    lines = ["| method | loss | T | MLX peak MB | peak RSS MB | s / step | peak vs sft | time vs sft |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['loss']} | {r['seq']} | FAILED | | | | |")
            continue
        base = sft.get((r["method"], r["seq"])) or sft.get(("mesp", r["seq"]))
        ratio = lambda k: (f"{r[k] / base[k]:.2f}x" if base and r.get(k) and base.get(k) else "")
        s = f"{r['s_per_step']:.2f}" if r.get("s_per_step") else ""
        lines.append(f"| {r['method']} | {r['loss']} | {r['seq']} | {r['peak_mb']:.1f} | "
                     f"{r.get('rss_peak_mb', 0):.0f} | {s} | {ratio('peak_mb')} | {ratio('s_per_step')} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--methods", nargs="+", default=["mesp", "mebp"])
    p.add_argument("--losses", nargs="+", default=["sft", "dpo", "orpo"])
    p.add_argument("--mlx-lm-lora", dest="mlx_lm_lora", default=None)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--json")
    p.add_argument("--one", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.one:
        method, loss = a.one.split(":")
        print(json.dumps(one(a.model, method, loss, a.seq, a.rank, a.steps, a.warmup)))
        return 0
    rows = []
    for method in a.methods:
        for loss in a.losses:
            r = subprocess.run([sys.executable, __file__, "--one", f"{method}:{loss}", "--model", a.model, "--seq",
                                str(a.seq), "--rank", str(a.rank), "--steps", str(a.steps), "--warmup",
                                str(a.warmup)], capture_output=True, text=True)
            rows.append(json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else
                        dict(method=method, loss=loss, seq=a.seq, error=r.stderr[-1500:]))
            print(rows[-1], flush=True)
    if a.mlx_lm_lora is not None:
        rows.append(mlx_lm_lora_run(a.model, a.seq, a.rank, a.steps, a.warmup, a.mlx_lm_lora))
        print(rows[-1], flush=True)
    print(table(rows))
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
