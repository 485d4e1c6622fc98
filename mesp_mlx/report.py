"""What a run reports about itself: progress, mlx-lm's report lines, metrics.jsonl and a chart, with process
memory (RSS) next to MLX's own counters."""
import json
import math
import os
import sys
import time
from pathlib import Path

import mlx.core as mx

from .errors import ConfigError


def rss_mb():
    """Peak resident set size of this process in MB (what the OS charges, MLX's cache and the Python heap included)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1024 * 1024) if sys.platform == "darwin" else r / 1024


def as_stats(loss):
    """An engine's loss -> {name: float}: {"loss"} for SFT, the loss and its stats for a preference batch."""
    return {k: v.item() for k, v in loss.items()} if isinstance(loss, dict) else {"loss": loss.item()}


STAT_NAMES = {"rewards_chosen": "Rewards chosen", "rewards_rejected": "rejected", "reward_margin": "Margin",
              "accuracy": "Accuracy"}


def stats_text(stats):
    """A preference run's stats as TRL and mlx-lm-lora print them: rewards chosen/rejected, margin, accuracy."""
    return (f"Rewards chosen {stats['rewards_chosen']:.3f} / rejected {stats['rewards_rejected']:.3f}, "
            f"Margin {stats['reward_margin']:.3f}, Accuracy {stats['accuracy']:.3f}")


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

    def __init__(self, out, log, first_process=True, tracker=None):
        self.out, self.first, self.tracker = out, first_process, tracker
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
        self.window_loss, self.window_tok, self.window_stats = [], 0.0, []
        self.bar = None
        self.tqdm = tqdm
        return self

    def start(self, total, initial):
        self.bar = self.tqdm(total=total, initial=initial, disable=None if self.first else True, file=sys.stderr,
                             unit="step", dynamic_ncols=True, leave=False)
        self.line = self.log if self.bar.disable else self.bar.write  # report lines above the bar, not through it

    def step(self, step, loss, tokens, seconds, lr, report, stats=None):
        """stats: a preference step's rewards, margin and accuracy (ops.preference.STATS), or None."""
        self.window_loss.append(loss)
        self.window_tok += tokens
        if stats:
            self.window_stats.append(stats)
        self.bar.update(1)
        extra = f"margin {stats['reward_margin']:.3f}, acc {stats['accuracy']:.2f}, " if stats else ""
        self.bar.set_postfix_str(f"loss {loss:.3f}, {extra}lr {lr:.2e}, {tokens / seconds:.0f} tok/s, "
                                 f"peak {mx.get_peak_memory() / 1e9:.3f} GB, RSS {rss_mb():.0f} MB")
        if not report:
            return
        dt = time.perf_counter() - self.t0
        rec = {"iter": step, "train_loss": sum(self.window_loss) / len(self.window_loss), "learning_rate": lr,
               "it_per_sec": len(self.window_loss) / dt, "tokens_per_sec": self.window_tok / dt,
               "peak_memory_gb": mx.get_peak_memory() / 1e9, "active_memory_gb": mx.get_active_memory() / 1e9,
               "rss_peak_mb": rss_mb(), "elapsed_s": time.perf_counter() - self.started}
        means = {k: sum(s[k] for s in self.window_stats) / len(self.window_stats) for k in STAT_NAMES
                 } if self.window_stats else None
        rec.update({f"train_{k}": v for k, v in (means or {}).items()})
        self.line(f"Iter {step}: Train loss {rec['train_loss']:.3f}, "
                  + (f"{stats_text(means)}, " if means else "")
                  + f"Learning Rate {rec['learning_rate']:.3e}, "
                  f"It/sec {rec['it_per_sec']:.3f}, Tokens/sec {rec['tokens_per_sec']:.3f}, "
                  f"Peak mem {rec['peak_memory_gb']:.3f} GB, RSS {rec['rss_peak_mb']:.0f} MB")
        self._write(rec)
        self.window_loss, self.window_tok, self.window_stats, self.t0 = [], 0.0, [], time.perf_counter()

    def validation(self, step, loss, seconds):
        """loss: the validation loss, or a preference run's dict of it and its stats."""
        if isinstance(loss, dict):
            self.line(f"Iter {step}: Val loss {loss['loss']:.3f}, {stats_text(loss)}, Val took {seconds:.3f}s")
            self._write({"iter": step, "val_loss": loss["loss"], **{f"val_{k}": loss[k] for k in STAT_NAMES},
                         "elapsed_s": time.perf_counter() - self.started})
            self.t0 += seconds
            return
        self.line(f"Iter {step}: Val loss {loss:.3f}, Val ppl {math.exp(min(loss, 50)):.3f}, Val took {seconds:.3f}s")
        self._write({"iter": step, "val_loss": loss, "elapsed_s": time.perf_counter() - self.started})
        self.t0 += seconds  # validation time does not count against training speed

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
