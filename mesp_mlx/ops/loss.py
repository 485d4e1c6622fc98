"""Final norm's consumer: the LM head and masked cross-entropy, over chunks of tokens and of the vocabulary.

The T x V logits are never whole: the forward walks vocabulary chunks with an online log-sum-exp and keeps only the
per-token lse (N floats); the backward recomputes each chunk's logits from it. The head weight is read chunk by chunk
(rows of the quantized table), so neither a dense head nor a full logits matrix is ever resident.

    loss = sum_i m_i (lse_i - z_i[t_i]) / sum_i m_i
    dz_i = m_i (softmax(z_i) - onehot(t_i)) / sum m,   dh_i = dz_i W
"""
import mlx.core as mx

from .linear import accum_dtype, frozen_matmul, frozen_matmul_t, prepared


def _target_logit(z, targets, v0, v1):
    inside = (targets >= v0) & (targets < v1)
    idx = mx.clip(targets - v0, 0, v1 - v0 - 1)
    picked = mx.take_along_axis(z, idx[:, None], axis=-1)[:, 0]
    return mx.where(inside, picked, 0.0)


def cross_entropy_forward(h, head, targets, mask, token_chunk=512, vocab_chunk=4096):
    """h (N, d); head: a `Frozen` or the store's `StoredRows` (anything with out_dims and rows(start, stop));
    targets (N,) int, mask (N,) float. Returns (loss, lse): mean loss over masked tokens, lse (N,)."""
    n, vocab = h.shape[0], head.out_dims
    ntok = mx.maximum(mx.sum(mask), 1.0)
    total, lses = mx.array(0.0), []
    for t0 in range(0, n, token_chunk):
        hc, tc = h[t0:t0 + token_chunk], targets[t0:t0 + token_chunk]
        run_max = mx.full((hc.shape[0],), -mx.inf)
        run_sum = mx.zeros((hc.shape[0],))
        picked = mx.zeros((hc.shape[0],))
        for v0 in range(0, vocab, vocab_chunk):
            v1 = min(vocab, v0 + vocab_chunk)
            z = frozen_matmul(hc, head.rows(v0, v1)).astype(accum_dtype(hc.dtype))
            new_max = mx.maximum(run_max, mx.max(z, axis=-1))
            run_sum = run_sum * mx.exp(run_max - new_max) + mx.sum(mx.exp(z - new_max[:, None]), axis=-1)
            run_max = new_max
            picked = picked + _target_logit(z, tc, v0, v1)
            mx.eval(run_max, run_sum, picked)  # one tile and one head chunk alive at a time
        lse = run_max + mx.log(run_sum)
        total = total + mx.sum((lse - picked) * mask[t0:t0 + token_chunk])
        mx.eval(total, lse)
        lses.append(lse)
    return total / ntok, mx.concatenate(lses)


def cross_entropy_backward(dloss, h, head, targets, mask, lse, token_chunk=512, vocab_chunk=4096):
    """Returns dh (N, d)."""
    n, vocab = h.shape[0], head.out_dims
    coef = (dloss * mask / mx.maximum(mx.sum(mask), 1.0))[:, None]
    out = []
    for t0 in range(0, n, token_chunk):
        hc, tc = h[t0:t0 + token_chunk], targets[t0:t0 + token_chunk]
        cc, lc = coef[t0:t0 + token_chunk], lse[t0:t0 + token_chunk, None]
        dh = mx.zeros(hc.shape, dtype=h.dtype)
        for v0 in range(0, vocab, vocab_chunk):
            v1 = min(vocab, v0 + vocab_chunk)
            rows = prepared(head.rows(v0, v1))  # one dequantization for both products
            z = frozen_matmul(hc, rows).astype(accum_dtype(hc.dtype))
            dz = mx.exp(z - lc)
            onehot = (tc[:, None] == mx.arange(v0, v1)[None, :])
            dz = (dz - onehot) * cc
            dh = dh + frozen_matmul_t(dz.astype(h.dtype), rows)
            mx.eval(dh)
        out.append(dh)
    return mx.concatenate(out)
