"""Final norm's consumer: the LM head and masked cross-entropy, over chunks of tokens and of the vocabulary.

The T x V logits are never whole: the forward walks vocabulary chunks with an online log-sum-exp and keeps only the
per-token lse (N floats); the backward recomputes each chunk's logits from it. The head weight is read chunk by chunk
(rows of the quantized table), so neither a dense head nor a full logits matrix is ever resident.

    loss = sum_i m_i (lse_i - z_i[t_i]) / sum_i m_i
    dz_i = m_i (softmax(z_i) - onehot(t_i)) / sum m,   dh_i = dz_i W = m_i (sum_v p_iv W_v - W_{t_i}) / sum m

`cross_entropy_forward_backward` does both in one pass over the vocabulary, as flash attention does for its output:
it keeps sum_v exp(z_v - max) W_v with the running max and rescales it when the max grows, so each head chunk is
read, dequantized, multiplied and exponentiated once per step instead of twice, and W_t is gathered by row.
"""
import mlx.core as mx

from .linear import DEFAULT, accum_dtype, embedding_rows, frozen_matmul, frozen_matmul_t, prepared


def _target_logit(z, targets, v0, v1):
    inside = (targets >= v0) & (targets < v1)
    idx = mx.clip(targets - v0, 0, v1 - v0 - 1)
    picked = mx.take_along_axis(z, idx[:, None], axis=-1)[:, 0]
    return mx.where(inside, picked, 0.0)


def _token_chunks(n, token_chunk):
    return [(t0, min(n, t0 + token_chunk)) for t0 in range(0, n, token_chunk)]


def cross_entropy_forward(h, head, targets, mask, compute=DEFAULT):
    """h (N, d); head: a `Frozen` or the store's `StoredRows` (anything with out_dims and rows(start, stop));
    targets (N,) int, mask (N,) float. Returns (loss, lse): mean loss over masked tokens, lse (N,).
    Vocabulary chunks are the outer loop, so each head chunk is read and dequantized once per pass."""
    nll, lse = token_nll_forward(h, head, targets, compute)
    loss = mx.sum(nll * mask) / mx.maximum(mx.sum(mask), 1.0)
    mx.eval(loss, lse)
    return loss, lse


def token_nll_forward(h, head, targets, compute=DEFAULT):
    """-> (nll, lse), both (N,): every token's negative log-likelihood of its target, unmasked (a sequence-level
    loss such as DPO's sums them per row)."""
    n, vocab, vocab_chunk = h.shape[0], head.out_dims, compute.vocab_chunk
    chunks = _token_chunks(n, compute.token_chunk)
    run_max = [mx.full((t1 - t0,), -mx.inf) for t0, t1 in chunks]
    run_sum = [mx.zeros((t1 - t0,)) for t0, t1 in chunks]
    picked = [mx.zeros((t1 - t0,)) for t0, t1 in chunks]
    for v0 in range(0, vocab, vocab_chunk):
        v1 = min(vocab, v0 + vocab_chunk)
        rows = prepared(head.rows(v0, v1), compute)
        for k, (t0, t1) in enumerate(chunks):
            z = frozen_matmul(h[t0:t1], rows, compute).astype(accum_dtype(h.dtype))
            new_max = mx.maximum(run_max[k], mx.max(z, axis=-1))
            run_sum[k] = run_sum[k] * mx.exp(run_max[k] - new_max) + mx.sum(mx.exp(z - new_max[:, None]), axis=-1)
            run_max[k] = new_max
            picked[k] = picked[k] + _target_logit(z, targets[t0:t1], v0, v1)
            if compute.sync_chunks:
                mx.eval(run_max[k], run_sum[k], picked[k])  # one tile and one head chunk alive at a time
        if not compute.sync_chunks:
            mx.eval(run_max, run_sum, picked)  # one head chunk read and dequantized at a time
    lse = mx.concatenate([m + mx.log(s) for m, s in zip(run_max, run_sum)])
    return lse - mx.concatenate(picked), lse


def cross_entropy_backward(dloss, h, head, targets, mask, lse, compute=DEFAULT):
    """Returns dh (N, d)."""
    n, vocab, vocab_chunk = h.shape[0], head.out_dims, compute.vocab_chunk
    chunks = _token_chunks(n, compute.token_chunk)
    coef = (dloss * mask / mx.maximum(mx.sum(mask), 1.0))[:, None]
    dh = [mx.zeros((t1 - t0, h.shape[1]), dtype=h.dtype) for t0, t1 in chunks]
    for v0 in range(0, vocab, vocab_chunk):
        v1 = min(vocab, v0 + vocab_chunk)
        rows = prepared(head.rows(v0, v1), compute)  # one dequantization for every product with this chunk
        for k, (t0, t1) in enumerate(chunks):
            z = frozen_matmul(h[t0:t1], rows, compute).astype(accum_dtype(h.dtype))
            onehot = targets[t0:t1, None] == mx.arange(v0, v1)[None, :]
            dz = (mx.exp(z - lse[t0:t1, None]) - onehot) * coef[t0:t1]
            dh[k] = dh[k] + frozen_matmul_t(dz.astype(h.dtype), rows, compute)
            if compute.sync_chunks:
                mx.eval(dh[k])
        if not compute.sync_chunks:
            mx.eval(dh)
    return mx.concatenate(dh)


def _target_rows(head, targets, dtype):
    """W_t for every target, dequantized: only those rows are read (the store's head) or gathered (a `Frozen`)."""
    if hasattr(head, "gather"):
        return head.gather(targets, dtype)
    return embedding_rows(head, targets, dtype)


def cross_entropy_forward_backward(h, head, targets, mask, compute=DEFAULT):
    """Returns (loss, dh): the forward and the backward of the loss (dloss = 1) in one pass over the vocabulary."""
    nll, grad = token_nll_forward_backward(h, head, targets, compute)
    count = mx.maximum(mx.sum(mask), 1.0)
    loss = mx.sum(nll * mask) / count
    dh = (grad * (mask / count)[:, None]).astype(h.dtype)
    mx.eval(loss, dh)
    return loss, dh


def token_nll_forward_backward(h, head, targets, compute=DEFAULT):
    """-> (nll (N,), grad (N, d)): every token's negative log-likelihood and its gradient with respect to that
    token's h, sum_v p_v W_v - W_t, unmasked and unweighted, in one pass over the vocabulary. Any loss that is a
    function of the nll's gets its dh as grad times dloss/dnll, one scalar per token."""
    n, vocab, vocab_chunk = h.shape[0], head.out_dims, compute.vocab_chunk
    chunks = _token_chunks(n, compute.token_chunk)
    acc = accum_dtype(h.dtype)
    run_max = [mx.full((t1 - t0,), -mx.inf, dtype=acc) for t0, t1 in chunks]
    run_sum = [mx.zeros((t1 - t0,), dtype=acc) for t0, t1 in chunks]
    picked = [mx.zeros((t1 - t0,), dtype=acc) for t0, t1 in chunks]
    weighted = [mx.zeros((t1 - t0, h.shape[1]), dtype=acc) for t0, t1 in chunks]  # sum_v exp(z_v - max) W_v
    for v0 in range(0, vocab, vocab_chunk):
        v1 = min(vocab, v0 + vocab_chunk)
        rows = prepared(head.rows(v0, v1), compute)  # one dequantization for both products with this chunk
        for k, (t0, t1) in enumerate(chunks):
            z = frozen_matmul(h[t0:t1], rows, compute).astype(acc)
            new_max = mx.maximum(run_max[k], mx.max(z, axis=-1))
            rescale = mx.exp(run_max[k] - new_max)
            e = mx.exp(z - new_max[:, None])
            run_sum[k] = run_sum[k] * rescale + mx.sum(e, axis=-1)
            weighted[k] = weighted[k] * rescale[:, None] + frozen_matmul_t(e.astype(h.dtype), rows, compute)
            run_max[k] = new_max
            picked[k] = picked[k] + _target_logit(z, targets[t0:t1], v0, v1)
            if compute.sync_chunks:
                mx.eval(run_max[k], run_sum[k], picked[k], weighted[k])  # one tile and one head chunk at a time
        if not compute.sync_chunks:
            mx.eval(run_max, run_sum, picked, weighted)  # one head chunk read and dequantized at a time
    lse = mx.concatenate([m + mx.log(s) for m, s in zip(run_max, run_sum)])
    softmax_w = mx.concatenate([w / s[:, None] for w, s in zip(weighted, run_sum)])
    return lse - mx.concatenate(picked), softmax_w - _target_rows(head, targets, acc)
