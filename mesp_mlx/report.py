"""What a run reports about itself: progress, mlx-lm's report lines, metrics.jsonl and a chart, with process
memory (RSS) next to MLX's own counters."""
import json
import os
import sys
import time

import mlx.core as mx

from .errors import ConfigError
from .resident import rss_mb


def _iter(line):
    try:
        return json.loads(line)["iter"]
    except (ValueError, KeyError, TypeError):
        return None


class WandbTracker:
    """--report-to wandb: every metrics record also goes to a Weights & Biases run, offline unless WANDB_MODE says
    otherwise (`wandb sync` uploads it later). wandb is an optional package, never required."""

    def __init__(self, project, config, out):
        try:
            import wandb
        except ImportError:
            raise ConfigError("--report-to wandb needs the wandb package: pip install wandb") from None
        self.run = wandb.init(project=project, config=config, dir=str(out),
                              mode=os.environ.get("WANDB_MODE", "offline"))

    def log(self, rec):
        self.run.log({k: v for k, v in rec.items() if k != "iter"}, step=rec["iter"])

    def close(self):
        self.run.finish()


def make_tracker(kind, project, config, out):
    return WandbTracker(project, config, out) if kind == "wandb" else None


class Reporter:
    """A run's reports: a progress bar (loss, lr, tokens/s, MLX peak, RSS; off when stderr is not a terminal),
    mlx-lm's `Iter N: ...` lines, metrics.jsonl beside the adapter and, at the end, training.png. Only the first
    process of a group writes files; the others log nothing."""

    def __init__(self, out, objective, log, first_process=True, tracker=None):
        """objective: the run's, whose stats are reported and which words them (`Objective.describe`)."""
        self.out, self.objective, self.first, self.tracker = out, objective, first_process, tracker
        self.log = log if first_process else (lambda *a, **k: None)
        self.metrics_path = out / "metrics.jsonl"

    def forget_after(self, step):
        """Drops what a stopped run logged after the checkpoint it is resumed from."""
        if self.first and self.metrics_path.exists():
            keep = [ln for ln in self.metrics_path.read_text().splitlines() if _iter(ln) is not None
                    and _iter(ln) <= step]  # a line cut short by a kill is dropped too
            tmp = self.metrics_path.with_name(".metrics.jsonl.tmp")
            tmp.write_text("".join(ln + "\n" for ln in keep))
            os.replace(tmp, self.metrics_path)

    def __enter__(self):
        from tqdm import tqdm
        self.metrics = open(self.metrics_path if self.first else os.devnull, "a")
        self.started = self.t0 = time.perf_counter()
        self.window, self.window_tok = [], 0.0
        self.bar, self.peak = None, 0
        self.tqdm = tqdm
        return self

    def peak_memory(self):
        """MLX's peak since the run began: kept here, since a generation resets MLX's own counter to measure its
        part (sampler.py)."""
        self.peak = max(self.peak, mx.get_peak_memory())
        return self.peak

    def start(self, total, initial):
        self.bar = self.tqdm(total=total, initial=initial, disable=None if self.first else True, file=sys.stderr,
                             unit="step", dynamic_ncols=True, leave=False)
        self.line = self.log if self.bar.disable else self.bar.write  # report lines above the bar, not through it

    def step(self, step, stats, tokens, seconds, lr, report):
        """stats: the step's {"loss", ...its objective's stats} as floats."""
        self.window.append(stats)
        self.window_tok += tokens
        self.bar.update(1)
        brief = self.objective.brief(stats)
        self.bar.set_postfix_str(f"loss {stats['loss']:.3f}, {brief + ', ' if brief else ''}lr {lr:.2e}, "
                                 f"{tokens / seconds:.0f} tok/s, peak {self.peak_memory() / 1e9:.3f} GB, "
                                 f"RSS {rss_mb():.0f} MB")
        if not report:
            return
        dt = time.perf_counter() - self.t0
        means = {k: sum(s[k] for s in self.window) / len(self.window) for k in self.objective.stats}
        rec = {"iter": step, "train_loss": means["loss"], "learning_rate": lr,
               "it_per_sec": len(self.window) / dt, "tokens_per_sec": self.window_tok / dt,
               "peak_memory_gb": self.peak_memory() / 1e9, "active_memory_gb": mx.get_active_memory() / 1e9,
               "rss_peak_mb": rss_mb(), "elapsed_s": time.perf_counter() - self.started}
        rec.update({f"train_{k}": v for k, v in means.items() if k != "loss"})
        words = self.objective.describe(means, "Train")
        self.line(f"Iter {step}: Train loss {rec['train_loss']:.3f}, {words + ', ' if words else ''}"
                  f"Learning Rate {rec['learning_rate']:.3e}, "
                  f"It/sec {rec['it_per_sec']:.3f}, Tokens/sec {rec['tokens_per_sec']:.3f}, "
                  f"Peak mem {rec['peak_memory_gb']:.3f} GB, RSS {rec['rss_peak_mb']:.0f} MB")
        self._write(rec)
        self.window, self.window_tok, self.t0 = [], 0.0, time.perf_counter()

    def validation(self, step, stats, seconds):
        """stats: the validation split's {"loss", ...its objective's stats}."""
        words = self.objective.describe(stats, "Val")
        self.line(f"Iter {step}: Val loss {stats['loss']:.3f}, {words + ', ' if words else ''}"
                  f"Val took {seconds:.3f}s")
        self._write({"iter": step, "val_loss": stats["loss"], **{f"val_{k}": v for k, v in stats.items()
                                                                 if k != "loss"},
                     "elapsed_s": time.perf_counter() - self.started})
        self.t0 += seconds  # validation time does not count against training speed

    def append(self, rec):
        """One more record in metrics.jsonl after the run's loop (the first process only)."""
        if self.first:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(rec) + "\n")

    def saved(self, step):
        self.line(f"Iter {step}: Saved adapter weights to {self.out}")

    def _write(self, rec):
        self.metrics.write(json.dumps(rec) + "\n")
        self.metrics.flush()
        if self.tracker is not None:
            self.tracker.log(rec)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()
        self.metrics.close()
        if self.tracker is not None:
            self.tracker.close()
        if self.first and exc[0] is None:
            from .plots import plot_metrics
            png = plot_metrics(self.metrics_path, self.out / "training.png")
            if png:
                self.log(f"[mesp-mlx] loss and memory chart: {png}")
