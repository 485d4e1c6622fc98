"""The chart written beside an adapter at the end of a run: loss (train and validation) and memory against step."""
import json


def chart_library():
    """matplotlib's pyplot on a file backend, or None when it is missing. A memory budget loads it before it measures
    what the process holds, so that the chart drawn at the end is inside the budget."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_metrics(metrics_path, png_path):
    """Returns the PNG's path, or None when there is nothing to draw or matplotlib is missing."""
    plt = chart_library()
    if plt is None:
        return None
    try:
        rows = [json.loads(line) for line in open(metrics_path) if line.strip()]
    except (OSError, ValueError):
        return None
    train = [r for r in rows if "train_loss" in r]
    val = [r for r in rows if "val_loss" in r]
    if not train:
        return None
    # DPO / ORPO / KTO: the reward margin and the pairs' accuracy or KTO's kl, as TRL plots them; GRPO: the mean
    # reward and each function's
    reward = next((k for k in ("reward_margin", "reward") if f"train_{k}" in train[-1]), None)
    fig, axes = plt.subplots(1, 3 if reward else 2, figsize=(15 if reward else 10, 4))
    ax_loss, ax_mem = axes[0], axes[1]
    ax_loss.plot([r["iter"] for r in train], [r["train_loss"] for r in train], label="train")
    if val:
        ax_loss.plot([r["iter"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
    ax_loss.set(xlabel="step", ylabel="loss", title="Loss")
    ax_loss.legend()
    ax_mem.plot([r["iter"] for r in train], [1000 * r["peak_memory_gb"] for r in train], label="MLX peak")
    ax_mem.plot([r["iter"] for r in train], [r["rss_peak_mb"] for r in train], label="process peak RSS")
    ax_mem.set(xlabel="step", ylabel="MB", title="Memory")
    ax_mem.legend()
    if reward:
        ax = axes[2]
        if reward == "reward_margin":
            others = [k for k in ("accuracy", "kl") if f"train_{k}" in train[-1]][:1]
        else:
            others = sorted(k[len("train_"):] for k in train[-1] if k.startswith("train_reward_")
                            and k != "train_reward_std")
        for split, rs in (("train", train), ("val", [r for r in val if f"val_{reward}" in r])):
            if rs:
                style = "o" if split == "val" else ""  # validation points may be single ones
                ax.plot([r["iter"] for r in rs], [r[f"{split}_{reward}"] for r in rs], style + "-",
                        label=f"{split} {reward.replace('_', ' ')}")
                for k in others:
                    ax.plot([r["iter"] for r in rs], [r[f"{split}_{k}"] for r in rs], style + "--",
                            label=f"{split} {k.replace('_', ' ')}")
        ax.set(xlabel="step", title=" and ".join([reward.replace("_", " ")] + [k.replace("_", " ") for k in others]))
        ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path
