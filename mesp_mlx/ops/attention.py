"""Causal grouped-query attention, computed one block of queries at a time.

q is (B, Hq, T, D); k and v are (B, Hkv, T, D) with Hq = G * Hkv. The forward returns the output o and the
log-sum-exp of each query's scores; the backward recomputes each query block's probabilities from them
(flash-attention style), so nothing of size T x T outlives one block of `chunk` queries. A shared k/v head's
gradient is the sum over the G query heads that read it.

    s = q k^T * scale + causal,  p = exp(s - lse),  o = p v
    dv = p^T do,  dp = do v^T,  ds = p (dp - rowsum(do * o)),  dq = ds k * scale,  dk = ds^T q * scale
"""
import mlx.core as mx


def _grouped(q, hkv):
    b, hq, t, d = q.shape
    return q.reshape(b, hkv, hq // hkv, t, d)


def _causal(i0, i1, kv_len):
    qi = mx.arange(i0, i1)[:, None]
    kj = mx.arange(kv_len)[None, :]
    return kj <= qi


def attention_forward(q, k, v, scale, chunk=256, sync=True):
    """Returns (o, lse): o like q, lse (B, Hq, T) in fp32. sync: evaluate each query block as it is done."""
    b, hq, t, d = q.shape
    hkv = k.shape[1]
    qg = _grouped(q, hkv)
    kk, vv = k[:, :, None], v[:, :, None]
    outs, lses = [], []
    for i0 in range(0, t, chunk):
        i1 = min(t, i0 + chunk)
        s = (qg[..., i0:i1, :] @ kk[..., :i1, :].swapaxes(-1, -2)) * scale
        s = mx.where(_causal(i0, i1, i1), s, -mx.inf)
        m = mx.max(s, axis=-1, keepdims=True)
        e = mx.exp(s - m)  # the only exp pass: exp is the costliest op on the CPU
        total = mx.sum(e, axis=-1, keepdims=True)
        outs.append((e @ vv[..., :i1, :]) / total)
        lses.append((m + mx.log(total))[..., 0])
        if sync:
            mx.eval(outs[-1], lses[-1])  # one query block's scores alive at a time, not all of them
    o = mx.concatenate(outs, axis=-2) if len(outs) > 1 else outs[0]
    lse = mx.concatenate(lses, axis=-1) if len(lses) > 1 else lses[0]
    return o.reshape(b, hq, t, d), lse.reshape(b, hq, t)


def attention_backward(do, q, k, v, o, lse, scale, chunk=256, sync=True):
    """Returns (dq, dk, dv)."""
    b, hq, t, d = q.shape
    hkv = k.shape[1]
    qg, dog = _grouped(q, hkv), _grouped(do, hkv)
    lseg = lse.reshape(b, hkv, hq // hkv, t, 1)
    delta = mx.sum(dog * _grouped(o, hkv), axis=-1, keepdims=True)
    kk, vv = k[:, :, None], v[:, :, None]
    dk = mx.zeros(k.shape, dtype=q.dtype)
    dv = mx.zeros(v.shape, dtype=q.dtype)
    dqs = []
    for i0 in range(0, t, chunk):
        i1 = min(t, i0 + chunk)
        qc, doc = qg[..., i0:i1, :], dog[..., i0:i1, :]
        s = (qc @ kk[..., :i1, :].swapaxes(-1, -2)) * scale
        p = mx.where(_causal(i0, i1, i1), mx.exp(s - lseg[..., i0:i1, :]), 0.0)
        dp = doc @ vv[..., :i1, :].swapaxes(-1, -2)
        ds = p * (dp - delta[..., i0:i1, :]) * scale
        dqs.append(ds @ kk[..., :i1, :])
        dv_c = mx.sum(p.swapaxes(-1, -2) @ doc, axis=2)
        dk_c = mx.sum(ds.swapaxes(-1, -2) @ qc, axis=2)
        if i1 == t:
            dv, dk = dv + dv_c, dk + dk_c
        else:
            pad = [(0, 0), (0, 0), (0, t - i1), (0, 0)]
            dv, dk = dv + mx.pad(dv_c, pad), dk + mx.pad(dk_c, pad)
        if sync:
            mx.eval(dqs[-1], dk, dv)
    dq = mx.concatenate(dqs, axis=-2) if len(dqs) > 1 else dqs[0]
    return dq.reshape(b, hq, t, d), dk, dv
