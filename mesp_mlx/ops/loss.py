"""Final norm's consumer: the LM head and masked cross-entropy, over chunks of tokens and of the vocabulary.

The T x V logits are never whole: the forward walks vocabulary chunks with an online log-sum-exp and keeps only the
per-token lse (N floats); the backward recomputes each chunk's logits from it. The head weight is read chunk by chunk
(rows of the quantized table), so neither a dense head nor a full logits matrix is ever resident.

    loss = sum_i m_i (lse_i - z_i[t_i]) / sum_i m_i
    dz_i = m_i (softmax(z_i) - onehot(t_i)) / sum m,   dh_i = dz_i W = m_i (sum_v p_iv W_v - W_{t_i}) / sum m

`cross_entropy_forward_backward` does both in one pass over the vocabulary, as flash attention does for its output:
with the running lse of the chunks so far it keeps sum_v exp(z_v - lse) W_v, rescaled by exp(lse_old - lse_new)
when a chunk raises the lse, which is sum_v p_v W_v once the last chunk is in; so each head chunk is read,
dequantized, multiplied and exponentiated once per step instead of twice. The target logit z_t = h . W_t (+ b_t)
is taken from the target rows, gathered once (the backward needs W_t anyway), not picked from every chunk.

Each tile and the finishing arithmetic are pure functions of arrays; `compile_fn(name, fn)` (the engine's) may hand
back a compiled form, so a tile is a few kernels (its two products, a max, a sum and the compiled element-wise
chains).
"""
from functools import partial

import mlx.core as mx

from .linear import DEFAULT, Frozen, accum_dtype, embedding_rows, frozen_matmul, frozen_matmul_t, prepared


def _as_is(name, fn):
    return fn


def _token_chunks(n, token_chunk):
    return [(t0, min(n, t0 + token_chunk)) for t0 in range(0, n, token_chunk)]


def cross_entropy_forward(h, head, targets, mask, compute=DEFAULT, compile_fn=_as_is):
    """h (N, d); head: a `Frozen` or the store's `StoredRows` (anything with out_dims and rows(start, stop));
    targets (N,) int, mask (N,) float. Returns (loss, lse): mean loss over masked tokens, lse (N,).
    compile_fn(name, fn) -> fn or its compiled form (the engine's choice; default: as is)."""
    nll, lse = token_nll_forward(h, head, targets, compute, compile_fn)
    loss = mx.sum(nll * mask) / mx.maximum(mx.sum(mask), 1.0)
    mx.eval(loss, lse)
    return loss, lse


def token_nll_forward(h, head, targets, compute=DEFAULT, compile_fn=_as_is):
    """-> (nll, lse), both (N,): every token's negative log-likelihood of its target, unmasked (a sequence-level
    loss such as DPO's sums them per row)."""
    lse, _ = _one_pass(h, head, compute, compile_fn, with_grad=False)
    w_t, b_t = _target_rows(head, targets, accum_dtype(h.dtype))
    return compile_fn("nll", _nll)(lse, h, w_t, b_t), lse


def lse_tile(compute, h, rows, lse=None):
    """One (token chunk x vocabulary chunk) tile of the forward: this chunk's log-sum-exp of z = h W^T folded into
    the running one (None before the first chunk)."""
    chunk = mx.logsumexp(frozen_matmul(h, rows, compute).astype(accum_dtype(h.dtype)), axis=-1)
    return chunk if lse is None else mx.logaddexp(lse, chunk)


def lse_grad_tile(compute, h, rows, lse=None, weighted=None):
    """One tile of the one-pass forward + backward: the running lse as in `lse_tile`, and weighted = sum_v
    exp(z_v - lse) W_v over the chunks so far (the old sum rescaled to the new lse, this chunk's added). One exp
    pass over the tile: e = exp(z - max) serves the chunk's lse and its product with the rows alike."""
    acc = accum_dtype(h.dtype)
    z = frozen_matmul(h, rows, compute).astype(acc)
    m = mx.max(z, axis=-1)
    e = mx.exp(z - m[:, None])
    chunk = m + mx.log(mx.sum(e, axis=-1))
    new = chunk if lse is None else mx.logaddexp(lse, chunk)
    part = frozen_matmul_t(e.astype(h.dtype), rows, compute).astype(acc) * mx.exp(m - new)[:, None]
    return new, part if weighted is None else weighted * mx.exp(lse - new)[:, None] + part


def _one_pass(h, head, compute, compile_fn, with_grad):
    """The vocabulary walk shared by the forward and the one-pass forward + backward: -> (lse (N,), the softmax-
    weighted rows sum_v p_v W_v (N, d) or None). Vocabulary chunks are the outer loop, so each head chunk is read
    and dequantized once per pass (one dequantization for both products with it)."""
    n, vocab = h.shape[0], head.out_dims
    token_chunk, vocab_chunk = compute.head_tile(n, head, h.shape[1])
    tile = compile_fn("lse_grad_tile", partial(lse_grad_tile, compute)) if with_grad else \
        compile_fn("lse_tile", partial(lse_tile, compute))
    chunks = _token_chunks(n, token_chunk)
    state = [() for _ in chunks]  # nothing before the first vocabulary chunk
    for v0 in range(0, vocab, vocab_chunk):
        rows = prepared(head.rows(v0, min(vocab, v0 + vocab_chunk)), compute)
        for k, (t0, t1) in enumerate(chunks):
            out = tile(h[t0:t1], rows, *state[k])
            state[k] = out if with_grad else (out,)
            if compute.sync_chunks:
                mx.eval(state[k])  # one tile and one head chunk alive at a time
        if not compute.sync_chunks:
            mx.eval(state)  # one head chunk read and dequantized at a time
    joined = [mx.concatenate(part) if len(part) > 1 else part[0] for part in zip(*state)]
    return joined[0], joined[1] if with_grad else None


def _nll(lse, h, w_t, b_t):
    """lse - z_t with the target logit z_t = h . W_t (+ b_t)."""
    z_t = mx.sum(h.astype(lse.dtype) * w_t, axis=-1)
    return lse - (z_t if b_t is None else z_t + b_t)


def _nll_and_grad(lse, weighted, h, w_t, b_t):
    return _nll(lse, h, w_t, b_t), weighted - w_t


def _mean_loss_and_dh(lse, weighted, h, w_t, b_t, mask):
    nll, grad = _nll_and_grad(lse, weighted, h, w_t, b_t)
    count = mx.maximum(mx.sum(mask), 1.0)
    return mx.sum(nll * mask) / count, grad * (mask / count)[:, None]


def _target_rows(head, targets, dtype):
    """(W_t, b_t): the target rows, dequantized, and their bias (None without): only those rows are read (the
    store's head) or gathered (a `Frozen`)."""
    table, idx = (head, targets) if isinstance(head, Frozen) else head.table(targets)
    return embedding_rows(table, idx, dtype), None if table.bias is None else table.bias[idx].astype(dtype)


def cross_entropy_forward_backward(h, head, targets, mask, compute=DEFAULT, compile_fn=_as_is):
    """Returns (loss, dh): the forward and the backward of the loss (dloss = 1) in one pass over the vocabulary."""
    lse, weighted = _one_pass(h, head, compute, compile_fn, with_grad=True)
    w_t, b_t = _target_rows(head, targets, accum_dtype(h.dtype))
    loss, dh = compile_fn("mean_loss_and_dh", _mean_loss_and_dh)(lse, weighted, h, w_t, b_t, mask)
    dh = dh.astype(h.dtype)
    mx.eval(loss, dh)
    return loss, dh


def token_nll_forward_backward(h, head, targets, compute=DEFAULT, compile_fn=_as_is):
    """-> (nll (N,), grad (N, d)): every token's negative log-likelihood and its gradient with respect to that
    token's h, sum_v p_v W_v - W_t, unmasked and unweighted, in one pass over the vocabulary. Any loss that is a
    function of the nll's gets its dh as grad times dloss/dnll, one scalar per token."""
    lse, weighted = _one_pass(h, head, compute, compile_fn, with_grad=True)
    w_t, b_t = _target_rows(head, targets, accum_dtype(h.dtype))
    return compile_fn("nll_and_grad", _nll_and_grad)(lse, weighted, h, w_t, b_t)


def nll_loss_forward(h, head, targets, loss_fn, compute=DEFAULT, compile_fn=_as_is):
    """A loss that is a function of the per-token nll's (a sequence-level objective such as DPO's): h (N, d)
    after the final norm, targets (N,); loss_fn(nll (N,)) -> {"loss": scalar, ...its stats}. -> the stats."""
    nll, _ = token_nll_forward(h, head, targets, compute, compile_fn)
    stats = loss_fn(nll)
    mx.eval(stats)
    return stats


def nll_loss_forward_backward(h, head, targets, loss_fn, compute=DEFAULT, compile_fn=_as_is):
    """-> (stats, dh): one pass over the vocabulary gives every token's nll and its unit gradient; the loss's
    derivative with respect to the nll's (autodiff of loss_fn, O(N)) scales the latter, token by token."""
    nll, grad = token_nll_forward_backward(h, head, targets, compute, compile_fn)
    def loss_and_stats(v):
        stats = loss_fn(v)
        return stats["loss"], stats

    (_, stats), dnll = mx.value_and_grad(loss_and_stats)(nll)
    dh = (grad * dnll.reshape(-1, 1)).astype(h.dtype)
    mx.eval(stats, dh)
    return stats, dh
