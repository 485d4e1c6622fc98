"""Sequence-level preference losses (DPO, ORPO, KTO) as functions of the per-token negative log-likelihoods.

A preference batch holds P pairs as 2P rows: the P chosen answers, then the P rejected ones, each row masked to its
answer. Both losses are functions of the per-token negative log-likelihoods nll_i only, through each row's
summed (or mean) log-probability, so

    dL/dh_i = dL/dnll_i * (sum_v p_iv W_v - W_{t_i})

where the second factor is what the one-pass cross-entropy computes for every token (ops/loss.py) and the first is
one scalar per token (the row's coefficient times its mask), known once the forward has produced every row's
log-probability. So the blocks stream and recompute exactly as for SFT; only these scalars differ. They come from
autodiff of the loss over the (N,) nll vector (ops/loss.py `nll_loss_forward_backward`), which is exact and costs
O(N).

DPO (Rafailov et al. 2023), as mlx-lm-lora and TRL define it, with policy scores s and reference scores r of each
row (summed log-probabilities; their mean per token for the `ipo` variant):
    u = (s_c - s_r) - (r_c - r_r)     sigmoid: -log sigmoid(beta u)     ipo: (u - 1 / (2 beta))^2
    rewards beta (s - r); accuracy: the fraction of pairs whose chosen reward is the larger.
    With rpo_alpha > 0 (TRL's name; RPO, Pang et al. 2024) the chosen answers' mean next-token NLL, weighted by
    rpo_alpha, is added: an SFT term that keeps the preferred answers likely while the margin grows.
ORPO (Hong et al. 2024), as mlx-lm-lora writes it, with each row's mean log-probability a (beta is ORPO's lambda):
    L = -a_c - beta log sigmoid((a_c - a_r) - (log(1 - e^a_c) - log(1 - e^a_r)))      rewards beta a.
Every loss and metric is the mean over pairs.
KTO (Ethayarajh et al. 2024), as TRL's KTOTrainer computes it: a batch of B labelled examples is 2B rows, each
example's own completion then, in the same order, its KL completion (the prompt with another example's completion).
With z = s - r each row's log-ratio, d_i = 1 for a desirable example and 0 for an undesirable one:
    kl = max(0, mean over the KL rows of z), a constant of the loss (no gradient flows through it)
    L_i = w_D (1 - sigmoid(beta (z_i - kl)))  desirable,   w_U (1 - sigmoid(beta (kl - z_i)))  undesirable
    L = mean_i L_i;  rewards beta z_i; rewards_chosen / rejected, logps_chosen / rejected: means over the batch's
    desirable / undesirable examples, 0 for a group the batch has none of (TRL: NaN, and 0 in the margin);
    reward_margin = rewards_chosen - rewards_rejected.
"""
import mlx.core as mx

from .linear import DEFAULT
from .loss import token_nll_forward

DPO_VARIANTS = ("sigmoid", "ipo")
STATS = ("loss", "rewards_chosen", "rewards_rejected", "reward_margin", "accuracy", "logps_chosen", "logps_rejected")
KTO_STATS = ("loss", "rewards_chosen", "rewards_rejected", "reward_margin", "kl", "logps_chosen", "logps_rejected")


def row_logps(nll, mask):
    """(B, T) nll and mask -> each row's summed log-probability over its masked tokens, and its token count."""
    return -mx.sum(nll * mask, axis=-1), mx.sum(mask, axis=-1)


def _log_sigmoid(x):
    return -mx.logaddexp(mx.zeros_like(x), -x)


def _log1mexp(a):
    """log(1 - e^a) for a < 0, in its stable form on both sides of -log 2."""
    a = mx.minimum(a, -1e-7)
    return mx.where(a > -0.6931471805599453, mx.log(-mx.expm1(a)), mx.log1p(-mx.exp(a)))


def _pair_stats(loss, rewards, logp):
    """The loss and what TRL reports beside it: rewards, margin, accuracy and each side's mean summed log-prob."""
    p = rewards.shape[0] // 2
    rc, rr = rewards[:p], rewards[p:]
    return {"loss": loss, "rewards_chosen": mx.mean(rc), "rewards_rejected": mx.mean(rr),
            "reward_margin": mx.mean(rc - rr), "accuracy": mx.mean((rc > rr).astype(loss.dtype)),
            "logps_chosen": mx.mean(logp[:p]), "logps_rejected": mx.mean(logp[p:])}


def dpo_stats(nll, mask, beta, variant="sigmoid", reference=None, rpo_alpha=0.0):
    """DPO's loss and what TRL reports beside it, all means over the pairs (STATS). nll, mask: (2P, T), chosen rows
    first; reference: the reference model's summed log-probability of each row, (2P,) (None: every row 0, as
    mlx-lm-lora's DPO without one); rpo_alpha: weight of the chosen answers' NLL, a mean over their tokens as TRL
    takes it."""
    logp, count = row_logps(nll, mask)
    summed, p = logp, logp.shape[0] // 2
    ref = mx.zeros_like(logp) if reference is None else reference.astype(logp.dtype)
    if variant == "ipo":
        logp, ref = logp / mx.maximum(count, 1.0), ref / mx.maximum(count, 1.0)
    u = (logp[:p] - logp[p:]) - (ref[:p] - ref[p:])
    losses = -_log_sigmoid(beta * u) if variant == "sigmoid" else (u - 1 / (2 * beta)) ** 2
    loss = mx.mean(losses)
    if rpo_alpha:
        loss = loss + rpo_alpha * -mx.sum(summed[:p]) / mx.maximum(mx.sum(count[:p]), 1.0)
    return _pair_stats(loss, beta * (logp - ref), summed)


def orpo_stats(nll, mask, beta):
    """ORPO's loss (beta is its lambda) and the same report as DPO's, rewards beta times each row's mean
    log-probability."""
    logp, count = row_logps(nll, mask)
    p = logp.shape[0] // 2
    mean = logp / mx.maximum(count, 1.0)
    ac, ar = mean[:p], mean[p:]
    log_odds = (ac - ar) - (_log1mexp(ac) - _log1mexp(ar))
    return _pair_stats(mx.mean(-ac - beta * _log_sigmoid(log_odds)), beta * mean, logp)


def kto_losses(logratio, kl, desirable, beta, desirable_weight=1.0, undesirable_weight=1.0):
    """Each example's weighted KTO loss from its log-ratio z and the reference point kl (desirable: 1.0 or 0.0):
    w_D (1 - sigmoid(beta (z - kl))) = w_D sigmoid(beta (kl - z)) where desirable, w_U sigmoid(beta (z - kl))
    where not."""
    u = beta * (logratio - kl)
    return desirable * desirable_weight * mx.sigmoid(-u) + (1 - desirable) * undesirable_weight * mx.sigmoid(u)


def _group_mean(x, member):
    """The mean of x over the entries where member is 1.0; 0 where there are none."""
    return mx.sum(x * member) / mx.maximum(mx.sum(member), 1.0)


def kto_stats(nll, mask, desirable, beta, reference=None, desirable_weight=1.0, undesirable_weight=1.0):
    """KTO's loss and what TRL reports beside it (KTO_STATS). nll, mask: (2B, T), the B examples' own completions
    first, then their B KL completions; desirable: (B,) 1.0 / 0.0; reference: the reference model's summed
    log-probability of each row, (2B,) (None: every row 0)."""
    logp, _ = row_logps(nll, mask)
    n = logp.shape[0] // 2
    ratio = logp - (mx.zeros_like(logp) if reference is None else reference.astype(logp.dtype))
    kl = mx.stop_gradient(mx.maximum(mx.mean(ratio[n:]), 0.0))
    d = desirable.astype(logp.dtype)
    loss = mx.mean(kto_losses(ratio[:n], kl, d, beta, desirable_weight, undesirable_weight))
    rewards, own = mx.stop_gradient(beta * ratio[:n]), mx.stop_gradient(logp[:n])
    chosen, rejected = _group_mean(rewards, d), _group_mean(rewards, 1 - d)
    return {"loss": loss, "rewards_chosen": chosen, "rewards_rejected": rejected, "reward_margin": chosen - rejected,
            "kl": kl, "logps_chosen": _group_mean(own, d), "logps_rejected": _group_mean(own, 1 - d)}


def reference_logps(h, head, targets, mask, compute=DEFAULT):
    """Each row's summed log-probability (no gradient): the reference model's scores that DPO and KTO subtract."""
    nll, _ = token_nll_forward(h, head, targets, compute)
    out = row_logps(nll.reshape(mask.shape), mask)[0]
    mx.eval(out)
    return out
