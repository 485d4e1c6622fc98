"""GRPO's loss (Shao et al. 2024, DeepSeekMath) as a function of the per-token negative log-likelihoods, as TRL's
GRPOTrainer computes it with one optimisation pass per batch of samples.

A batch holds N = P G completions: G sampled answers to each of P prompts, each row masked to its answer (the stop
token included, as TRL counts it). Rewards r (N,) are normalised within each prompt's group:
    A_i = r_i - mean_group(r)                  (Dr. GRPO: no scaling)
    A_i = (r_i - mean_group(r)) / (std_group(r) + 1e-4)     (GRPO, DAPO; std with Bessel's correction, as torch's)
Per answer token t, with logp = -nll and the samples' own log-probabilities as the old policy's (one pass per batch:
old = logp with no gradient, so the ratio is 1 in value and its gradient is that of logp):
    ratio = exp(logp - old),   l_t = -min(ratio A, clip(ratio, 1 - eps_low, 1 + eps_high) A)
    with beta > 0, l_t += beta (exp(ref - logp) - (ref - logp) - 1)        (the k3 estimate of KL(policy || ref))
The batch's loss aggregates l over the answer tokens m:
    grpo      mean over answers of (sum_t l m / sum_t m)
    dapo      sum l m / sum m                                  (every token of the batch weighs the same)
    dr_grpo   sum l m / (N * max_completion_length)            (a constant normaliser: no length bias)
Reported beside it (TRL's names, as this package spells stats): the clipped fraction of answer tokens (where the
clipped branch is the smaller), the mean KL, and the rewards' stats that the rollout computed.
"""
import mlx.core as mx

LOSS_TYPES = ("grpo", "dapo", "dr_grpo")
SCALED = {"grpo": True, "dapo": True, "dr_grpo": False}  # whether advantages are divided by the group's std


def advantages(rewards, group_size, scale=True):
    """(N,) rewards of N = P G answers, each prompt's G together -> (N,) group-normalised advantages."""
    r = rewards.reshape(-1, group_size)
    a = r - mx.mean(r, axis=1, keepdims=True)
    if scale:
        std = mx.sqrt(mx.sum(a * a, axis=1, keepdims=True) / max(group_size - 1, 1))
        a = a / (std + 1e-4)
    return a.reshape(-1)


def grpo_stats(nll, mask, adv, loss_type="grpo", eps_low=0.2, eps_high=0.2, beta=0.0, reference=None,
               max_completion_length=1):
    """The loss and its token stats. nll, mask: (N, T); adv: (N,) advantages; reference: (N, T) the reference
    model's per-token log-probabilities (needed when beta > 0)."""
    logp = -nll
    ratio = mx.exp(logp - mx.stop_gradient(logp))
    a = adv.astype(logp.dtype)[:, None]
    low, high = ratio * a, mx.clip(ratio, 1 - eps_low, 1 + eps_high) * a
    per_token = -mx.minimum(low, high)
    m = mask.astype(logp.dtype)
    count = mx.maximum(mx.sum(m), 1.0)
    stats = {"clip_ratio": mx.stop_gradient(mx.sum((high < low).astype(m.dtype) * m) / count)}
    if beta:
        d = reference.astype(logp.dtype) - logp
        kl = mx.exp(d) - d - 1
        per_token = per_token + beta * kl
        stats["kl"] = mx.stop_gradient(mx.sum(kl * m) / count)
    else:
        stats["kl"] = mx.zeros((), logp.dtype)
    if loss_type == "grpo":
        loss = mx.mean(mx.sum(per_token * m, axis=1) / mx.maximum(mx.sum(m, axis=1), 1.0))
    elif loss_type == "dapo":
        loss = mx.sum(per_token * m) / count
    else:
        loss = mx.sum(per_token * m) / (m.shape[0] * max_completion_length)
    return {"loss": loss, **stats}
