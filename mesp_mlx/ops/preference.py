"""Sequence-level preference losses (DPO, ORPO) and their head pass, as the chunked cross-entropy sees them.

A preference batch holds P pairs as 2P rows: the P chosen answers, then the P rejected ones, each row masked to its
answer. Both losses are functions of the per-token negative log-likelihoods nll_i only, through each row's
summed (or mean) log-probability, so

    dL/dh_i = dL/dnll_i * (sum_v p_iv W_v - W_{t_i})

where the second factor is what the one-pass cross-entropy computes for every token (ops/loss.py) and the first is
one scalar per token (the row's coefficient times its mask), known once the forward has produced every row's
log-probability. So the blocks stream and recompute exactly as for SFT; only these scalars differ. They come from
autodiff of `preference_stats` over the (N,) nll vector, which is exact and costs O(N).

DPO (Rafailov et al. 2023), as mlx-lm-lora and TRL define it, with policy scores s and reference scores r of each
row (summed log-probabilities; their mean per token for the `ipo` variant):
    u = (s_c - s_r) - (r_c - r_r)     sigmoid: -log sigmoid(beta u)     ipo: (u - 1 / (2 beta))^2
    rewards beta (s - r); accuracy: the fraction of pairs whose chosen reward is the larger.
ORPO (Hong et al. 2024), as mlx-lm-lora writes it, with each row's mean log-probability a (beta is ORPO's lambda):
    L = -a_c - beta log sigmoid((a_c - a_r) - (log(1 - e^a_c) - log(1 - e^a_r)))      rewards beta a.
Every loss and metric is the mean over pairs.
"""
from dataclasses import dataclass

import mlx.core as mx

from .linear import DEFAULT
from .loss import _as_is, token_nll_forward, token_nll_forward_backward

KINDS = ("dpo", "orpo")
DPO_VARIANTS = ("sigmoid", "ipo")
STATS = ("loss", "rewards_chosen", "rewards_rejected", "reward_margin", "accuracy")


@dataclass(frozen=True, eq=False)
class Preference:
    """What a preference batch is scored by: kind (dpo, orpo), beta (DPO's temperature, ORPO's lambda), variant
    (DPO: sigmoid or ipo) and, for DPO, the reference model's summed log-probability of each of the batch's 2P rows
    (an (2P,) array; None means a reference that scores every row 0, as mlx-lm-lora's DPO without a reference)."""
    kind: str = "dpo"
    beta: float = 0.1
    variant: str = "sigmoid"
    reference: object = None


def row_logps(nll, mask):
    """(B, T) nll and mask -> each row's summed log-probability over its masked tokens, and its token count."""
    return -mx.sum(nll * mask, axis=-1), mx.sum(mask, axis=-1)


def _log_sigmoid(x):
    return -mx.logaddexp(mx.zeros_like(x), -x)


def _log1mexp(a):
    """log(1 - e^a) for a < 0, in its stable form on both sides of -log 2."""
    a = mx.minimum(a, -1e-7)
    return mx.where(a > -0.6931471805599453, mx.log(-mx.expm1(a)), mx.log1p(-mx.exp(a)))


def preference_stats(nll, mask, pref):
    """The loss and what TRL reports beside it, all means over the pairs: {loss, rewards_chosen, rewards_rejected,
    reward_margin, accuracy}. nll, mask: (2P, T), chosen rows first."""
    logp, count = row_logps(nll, mask)
    p = logp.shape[0] // 2
    if pref.kind == "dpo":
        ref = mx.zeros_like(logp) if pref.reference is None else pref.reference.astype(logp.dtype)
        if pref.variant == "ipo":
            logp, ref = logp / mx.maximum(count, 1.0), ref / mx.maximum(count, 1.0)
        u = (logp[:p] - logp[p:]) - (ref[:p] - ref[p:])
        losses = -_log_sigmoid(pref.beta * u) if pref.variant == "sigmoid" else (u - 1 / (2 * pref.beta)) ** 2
        rewards = pref.beta * (logp - ref)
    else:
        mean = logp / mx.maximum(count, 1.0)
        ac, ar = mean[:p], mean[p:]
        log_odds = (ac - ar) - (_log1mexp(ac) - _log1mexp(ar))
        losses = -ac - pref.beta * _log_sigmoid(log_odds)
        rewards = pref.beta * mean
    rc, rr = rewards[:p], rewards[p:]
    return {"loss": mx.mean(losses), "rewards_chosen": mx.mean(rc), "rewards_rejected": mx.mean(rr),
            "reward_margin": mx.mean(rc - rr), "accuracy": mx.mean((rc > rr).astype(losses.dtype))}


def preference_forward(h, head, targets, mask, pref, compute=DEFAULT, fuse=_as_is):
    """h (2P*T, d) after the final norm, targets (2P*T,), mask (2P, T) -> the stats (no gradient). fuse: as in
    ops/loss.py."""
    nll, _ = token_nll_forward(h, head, targets, compute, fuse)
    stats = preference_stats(nll.reshape(mask.shape), mask, pref)
    mx.eval(stats)
    return stats


def preference_forward_backward(h, head, targets, mask, pref, compute=DEFAULT, fuse=_as_is):
    """-> (stats, dh): one pass over the vocabulary gives every token's nll and its unit gradient; the loss's
    derivative with respect to the nll's scales the latter, token by token."""
    nll, grad = token_nll_forward_backward(h, head, targets, compute, fuse)
    stats, vjp = mx.value_and_grad(lambda v: _loss_and_stats(v, mask, pref))(nll.reshape(mask.shape))
    dh = (grad * vjp.reshape(-1, 1)).astype(h.dtype)
    stats = stats[1]
    mx.eval(stats, dh)
    return stats, dh


def _loss_and_stats(nll, mask, pref):
    stats = preference_stats(nll, mask, pref)
    return stats["loss"], stats


def reference_logps(h, head, targets, mask, compute=DEFAULT):
    """Each row's summed log-probability (no gradient): the reference model's scores that DPO subtracts."""
    nll, _ = token_nll_forward(h, head, targets, compute)
    out = row_logps(nll.reshape(mask.shape), mask)[0]
    mx.eval(out)
    return out
