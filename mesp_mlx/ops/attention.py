"""Causal grouped-query attention, computed one block of queries at a time, optionally over a sliding window.

q is (B, Hq, T, D); k and v are (B, Hkv, T, D) with Hq = G * Hkv. The forward returns the output o and the
log-sum-exp of each query's scores; the backward recomputes each query block's probabilities from them
(flash-attention style), so nothing of size T x T outlives one block of `chunk` queries. A shared k/v head's
gradient is the sum over the G query heads that read it.

    s = q k^T * scale + mask,  p = exp(s - lse),  o = p v
    dv = p^T do,  dp = do v^T,  ds = p (dp - rowsum(do * o)),  dq = ds k * scale,  dk = ds^T q * scale

The mask is causal, and with a window W (Gemma 3's local layers, Mistral) query i also ignores keys j <= i - W.
Those keys get p = 0 and contribute nothing to any sum above, so a query block [i0, i1) reads only keys
[max(0, i0 - W + 1), i1): with W << T each block's tiles are chunk x (chunk + W) instead of chunk x T, in the
forward and in the backward alike.

Packed rows (--pack) give each token a segment id (which packed row it belongs to): a query then also ignores
keys of other segments (causal AND same segment), so rows packed together never see each other. A query always
sees itself, so no row of p is empty (padding is a segment of its own).
"""
import mlx.core as mx


def _grouped(q, hkv):
    b, hq, t, d = q.shape
    return q.reshape(b, hkv, hq // hkv, t, d)


def _first_key(i0, window):
    return 0 if window is None else max(0, i0 - window + 1)


def visible(i0, i1, k0, k1, window=None, iota=None):
    """(i1 - i0, k1 - k0) booleans: which keys each query attends to. iota: mx.arange(T) made once by the caller,
    so that each query block's mask is an element-wise comparison of its slices (fused with its use when compiled)
    instead of new position arrays per block."""
    iota = mx.arange(max(i1, k1)) if iota is None else iota
    qi = iota[i0:i1, None]
    kj = iota[None, k0:k1]
    mask = kj <= qi
    return mask if window is None else mask & (qi - kj < window)


def _visible(i0, i1, k0, window, segments, iota):
    """The mask of one query block's tiles: (tq, tk), or (B, 1, 1, tq, tk) with per-token segment ids."""
    mask = visible(i0, i1, k0, i1, window, iota)
    if segments is None:
        return mask
    return mask & (segments[:, None, None, i0:i1, None] == segments[:, None, None, None, k0:i1])


def attention_forward(q, k, v, scale, chunk=256, sync=True, window=None, segments=None, logsumexp=False):
    """Returns (o, lse): o like q, lse (B, Hq, T) in fp32. sync: evaluate each query block as it is done.
    segments: (B, T) ids of the packed row of each token, or None (one row per batch row).
    logsumexp: normalise with MLX's log-sum-exp reduction, p = exp(s - lse), three kernels fewer per query block
    (for compiled graphs on GPUs); else with the running max and one exp pass (~1.5x faster on the CPU)."""
    b, hq, t, d = q.shape
    hkv = k.shape[1]
    qg = _grouped(q, hkv)
    kk, vv = k[:, :, None], v[:, :, None]
    iota = mx.arange(t)  # every query block's mask compares slices of it
    outs, lses = [], []
    for i0 in range(0, t, chunk):
        i1 = min(t, i0 + chunk)
        k0 = _first_key(i0, window)
        s = (qg[..., i0:i1, :] @ kk[..., k0:i1, :].swapaxes(-1, -2)) * scale
        s = mx.where(_visible(i0, i1, k0, window, segments, iota), s, -mx.inf)
        if logsumexp:
            lse = mx.logsumexp(s, axis=-1, keepdims=True)
            outs.append(mx.exp(s - lse) @ vv[..., k0:i1, :])
        else:
            m = mx.max(s, axis=-1, keepdims=True)
            e = mx.exp(s - m)  # the only exp pass: exp is the costliest op on the CPU
            total = mx.sum(e, axis=-1, keepdims=True)
            outs.append((e @ vv[..., k0:i1, :]) / total)
            lse = m + mx.log(total)
        lses.append(lse[..., 0])
        if sync:
            mx.eval(outs[-1], lses[-1])  # one query block's scores alive at a time, not all of them
    o = mx.concatenate(outs, axis=-2) if len(outs) > 1 else outs[0]
    lse = mx.concatenate(lses, axis=-1) if len(lses) > 1 else lses[0]
    return o.reshape(b, hq, t, d), lse.reshape(b, hq, t)


def _fold(x):
    """(B, Hkv, rep, n, m) -> (B, Hkv, rep * n, m): a key head's query heads stacked along the rows."""
    b, h, r, n, m = x.shape
    return x.reshape(b, h, r * n, m)


def attention_backward(do, q, k, v, o, lse, scale, chunk=256, sync=True, window=None, segments=None):
    """Returns (dq, dk, dv)."""
    b, hq, t, d = q.shape
    hkv = k.shape[1]
    qg, dog = _grouped(q, hkv), _grouped(do, hkv)
    lseg = lse.reshape(b, hkv, hq // hkv, t, 1)
    delta = mx.sum(dog * _grouped(o, hkv), axis=-1, keepdims=True)
    kk, vv = k[:, :, None], v[:, :, None]
    iota = mx.arange(t)
    dk = dv = None  # sums over the query blocks (keys before a block's window get nothing from it)
    dqs = []
    for i0 in range(0, t, chunk):
        i1 = min(t, i0 + chunk)
        k0 = _first_key(i0, window)
        qc, doc = qg[..., i0:i1, :], dog[..., i0:i1, :]
        s = (qc @ kk[..., k0:i1, :].swapaxes(-1, -2)) * scale
        p = mx.where(_visible(i0, i1, k0, window, segments, iota), mx.exp(s - lseg[..., i0:i1, :]), 0.0)
        dp = doc @ vv[..., k0:i1, :].swapaxes(-1, -2)
        ds = p * (dp - delta[..., i0:i1, :]) * scale
        dqs.append(ds @ kk[..., k0:i1, :])
        # the sums over a key head's query heads folded into the products: no (rep x keys x d) partials
        dv_c = _fold(p).swapaxes(-1, -2) @ _fold(doc)
        dk_c = _fold(ds).swapaxes(-1, -2) @ _fold(qc)
        if k0 != 0 or i1 != t:
            pad = [(0, 0), (0, 0), (k0, t - i1), (0, 0)]
            dv_c, dk_c = mx.pad(dv_c, pad), mx.pad(dk_c, pad)
        dv, dk = (dv_c, dk_c) if dv is None else (dv + dv_c, dk + dk_c)
        if sync:
            mx.eval(dqs[-1], dk, dv)
    dq = mx.concatenate(dqs, axis=-2) if len(dqs) > 1 else dqs[0]
    return dq.reshape(b, hq, t, d), dk, dv
