"""Tokens per second with short rows, packing off against on: real training runs (`python -m mesp_mlx.train`, each
in a fresh process) on the persona data (the shipped default dataset) at a preset's shape (issue 32, item 5).

    python tools/bench_pack.py [--model preset:qwen2.5-1.5b] [--data DIR] [--iters 6] [--warmup 1]
        [--settings "--no-pack" "--pack"] [--common "--batch-size 1 --max-seq-length 256"] [--json out.json]

Every setting trains `--iters` steps with mesp (no sample answers, no retention check, one validation batch at the
end, nothing saved before it) and `--common` (the CLI's defaults otherwise: batch 1, rows of up to 256 tokens), then
the tool reads its metrics.jsonl: the trainer's start-of-run figures (real tokens per pass over the weights, the
weight passes a step makes) and, per step after the first `--warmup` (compilation, first reads of the weights), its
seconds and trained tokens (the targets the loss counts, as the progress line's tok/s). Reported per setting:
s / step, trained tokens / s, tokens per pass, processed tokens / s (tokens per pass x passes per second: prompt
tokens included, what the weights are multiplied with) and the first and last step's loss. A packed step sees
several rows, so its loss falls faster per step; compare the tokens / s, not the steps / s.

`--model` takes what bench_memory takes (`preset:NAME[,layers=N,vocab=V]` generates a random-weight 4-bit model of
that shape once into the cache; its tokenizer is a byte-level BPE trained on Python sources, so a persona row is
somewhat more tokens than under Qwen's own tokenizer: the tool prints the tokens per pass it measured).
Times are only meaningful on a quiet machine.
"""
import argparse
import json
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_inputs import resolve_model  # noqa: E402 (after the path)

DEFAULT_SETTINGS = ["--no-pack", "--pack"]


def run_setting(model, data, flags, iters, warmup, timeout):
    """One training run with `flags`: -> its figures, or {"error": the run's last line}."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "adapter"
        cmd = [sys.executable, "-m", "mesp_mlx.train", "--model", model, "--data", data, "--method", "mesp",
               "--iters", str(iters), "--steps-per-report", "1", "--steps-per-eval", str(10 ** 6), "--val-batches",
               "1", "--save-every", str(10 ** 6), "--sample-prompt", "", "--no-retention", "--adapter-path",
               str(out)] + flags
        try:
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"over {timeout} s"}
        if proc.returncode != 0:
            lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
            return {"error": next((ln for ln in reversed(lines) if ln.startswith("error:")), lines[-1] if lines
                                  else f"exit status {proc.returncode}")}
        recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    fill = next((r for r in recs if "tokens_per_pass" in r), {})
    steps = [r for r in recs if "train_loss" in r]
    timed = steps[warmup:]
    seconds = sum(1 / r["it_per_sec"] for r in timed)
    trained = sum(r["tokens_per_sec"] / r["it_per_sec"] for r in timed)
    passes = fill.get("weight_passes_per_step", 3) / 3  # micro-batches a step (passes / the engine's 3)
    res = {"steps_timed": len(timed), "tokens_per_pass": fill.get("tokens_per_pass"),
           "positions_per_pass": fill.get("positions_per_pass"), "low_tokens_per_pass": fill.get("low_tokens_per_pass"),
           "loss_first": steps[0]["train_loss"] if steps else None,
           "loss_last": steps[-1]["train_loss"] if steps else None}
    if timed and seconds > 0:
        res.update(s_per_step=seconds / len(timed), trained_tokens_per_sec=trained / seconds,
                   trained_tokens_per_step=trained / len(timed))
        if fill.get("tokens_per_pass") is not None:
            res["processed_tokens_per_sec"] = fill["tokens_per_pass"] * passes * len(timed) / seconds
    return res


def table(rows):
    cols = ["setting", "s/step", "trained tok/s", "tok/pass", "processed tok/s", "loss first -> last"]
    lines = [" | ".join(cols), " | ".join("---" for _ in cols)]
    f = lambda v, fmt: "-" if v is None else format(v, fmt)
    for r in rows:
        if "error" in r:
            lines.append(f"{r['setting']} | failed: {r['error']}")
            continue
        lines.append(" | ".join([r["setting"], f(r.get("s_per_step"), ".2f"), f(r.get("trained_tokens_per_sec"), ".1f"),
                                 f(r.get("tokens_per_pass"), ".0f"), f(r.get("processed_tokens_per_sec"), ".1f"),
                                 f"{f(r.get('loss_first'), '.3f')} -> {f(r.get('loss_last'), '.3f')}"]))
    return "\n".join("| " + ln + " |" for ln in lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="preset:qwen2.5-1.5b")
    p.add_argument("--data", help="training data (default: the shipped persona rows)")
    p.add_argument("--iters", type=int, default=6, help="steps per setting, warm-up included")
    p.add_argument("--warmup", type=int, default=1, help="first steps left out of the figures")
    p.add_argument("--settings", nargs="+", default=DEFAULT_SETTINGS,
                   help="one run per entry, each the flags it adds (quoted), e.g. \"--pack --batch-size 2\"")
    p.add_argument("--common", default="--batch-size 1 --max-seq-length 256", help="flags every run adds")
    p.add_argument("--timeout", type=int, default=3600, help="seconds per run")
    p.add_argument("--json", help="write the results here")
    a = p.parse_args(argv)
    if a.iters < 1 or not 0 <= a.warmup < a.iters:
        raise SystemExit("error: --iters must be >= 1 and --warmup in [0, iters)")
    try:
        common, settings = shlex.split(a.common), [shlex.split(s) for s in a.settings]
    except ValueError as e:
        raise SystemExit(f"error: --common / --settings: {e}") from None
    from mesp_mlx.config import DEFAULT_DATA
    data = a.data or DEFAULT_DATA
    if not Path(data).exists():
        raise SystemExit(f"error: {data}: no such data file or directory")
    model = resolve_model(a.model)
    rows = []
    for label, flags in zip(a.settings, settings):
        print(f"{label}: {a.iters} steps ...", file=sys.stderr, flush=True)
        row = {"setting": label, **run_setting(model, data, common + flags, a.iters, a.warmup, a.timeout)}
        rows.append(row)
        print(table([row]).splitlines()[-1], file=sys.stderr, flush=True)
    print(f"model {a.model}, data {data}, common flags: {a.common}; {a.iters} steps each, the first {a.warmup} "
          f"left out")
    print(table(rows))
    if a.json:
        Path(a.json).write_text(json.dumps({"model": a.model, "data": str(data), "common": a.common,
                                            "iters": a.iters, "warmup": a.warmup, "rows": rows}, indent=1))
    if any("error" in r for r in rows):
        raise SystemExit(1)
    return rows


if __name__ == "__main__":
    main()
