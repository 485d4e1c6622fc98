"""The gated delta rule (Gated DeltaNet linear attention: Qwen3.5's three layers in four), a chunked forward and its
hand-derived backward, and the pieces around it in the mixer (causal depthwise conv, l2 norms, gates).

Per value head, with a state S (Dv x Dk, fp32) from zero:

    S_t = g_t S_{t-1} (I - b_t k_t k_t^T) + b_t v_t k_t^T,    y_t = S_t q_t

(mlx-lm's reading: S = g S; S += b (v - S k) k^T; y = S q). Over a chunk of C tokens starting from state S0, with
G = cumsum(log g) inside the chunk, gam_i = exp(G_i), the decay P_ij = exp(G_i - G_j) for j <= i (0 above), r_i =
exp(G_C - G_i), the deltas d_i = b_i (v_i - g_i S_{i-1} k_i) solve a unit lower-triangular system (the WY / UT form):

    (I + A) d = b V - (b gam K) S0^T,   A_ij = b_i P_ij (k_i . k_j) for j < i
    =>  d = U - W S0^T,  U = T (b V),  W = T (b gam K),  T = (I + A)^-1
    Y = gam (Q S0^T) + (P * Q K^T) d,     S_C = gam_C S0 + d^T (r K)

so everything but a scan of two matmuls per chunk over the chunk boundaries is a batched matmul over all chunks.
T is the finite Neumann product (I - A)(I + A^2)(I + A^4)... (A is nilpotent): matmuls only, on any device.
The forward keeps the states at the chunk boundaries (n x Hv x Dv x Dk floats per row, n = ceil(T / C)); the
backward recomputes A, T, U, W and d from them batched, runs the reverse scan of the state gradient (two matmuls per
chunk) and differentiates each line above by hand (`gated_delta_backward`).

Packed rows (`starts`, True at each row's first token) reset the state: a token sees the carried state and the
tokens before it only within its own row (masks on gam, P and r; no -inf arithmetic).
"""
from dataclasses import dataclass

import mlx.core as mx


@dataclass(frozen=True)
class DeltaSpec:
    """The linear-attention mixer of a block: Hk key heads of Dk features (q and k), Hv value heads of Dv features
    (Hv a multiple of Hk; value head h reads key head h // (Hv / Hk)), a causal depthwise conv of `conv_kernel`
    taps over [q | k | v], and the chunk length of the chunked forward/backward. out_tiled: out_proj reads the
    value heads in llama.cpp's tiled order (head j of its input is grouped head (j % Hk) r + j // Hk, r = Hv / Hk),
    as a store keeps an ssm_out whose columns could not be regrouped exactly (GGML blocks wider than a head)."""
    n_k_heads: int
    n_v_heads: int
    k_dim: int
    v_dim: int
    conv_kernel: int = 4
    chunk: int = 64
    out_tiled: bool = False

    @property
    def conv_dim(self):
        return 2 * self.n_k_heads * self.k_dim + self.n_v_heads * self.v_dim


L2_EPS = 1e-6  # added to the sum of squares, as the reference l2norm does


def _t(x):
    return x.swapaxes(-1, -2)


def _to_chunks(x, c):
    """(B, T, H, ...) -> (B, H, n, c, ...), the time axis zero-padded to n * c."""
    b, t = x.shape[:2]
    n = -(-t // c)
    if n * c != t:
        x = mx.pad(x, [(0, 0), (0, n * c - t)] + [(0, 0)] * (x.ndim - 2))
    return mx.moveaxis(x.reshape(b, n, c, *x.shape[2:]), 3, 1)


def _from_chunks(x, t):
    """(B, H, n, c, ...) -> (B, T, H, ...)."""
    b, h, n, c = x.shape[:4]
    return mx.moveaxis(x, 1, 3).reshape(b, n * c, h, *x.shape[4:])[:, :t]


def unit_lower_inverse(a):
    """(I + A)^-1 for strictly lower-triangular A (..., c, c): (I - A)(I + A^2)(I + A^4)... up to A^(c/2)."""
    c = a.shape[-1]
    x, p, k = mx.eye(c, dtype=a.dtype) - a, a, 2
    while k < c:
        p = p @ p
        x = x + x @ p
        k *= 2
    return x


class _Chunk:
    """The chunk-local quantities of the module docstring, batched over (B, H, n)."""

    def __init__(self, q, k, v, log_g, beta, starts, c):
        self.q, self.k, self.v, self.beta = q, k, v, beta
        cum = mx.cumsum(log_g, axis=-1)
        i = mx.arange(c)
        lower = i[:, None] >= i[None, :]
        if starts is None:
            same, carry, tail = lower, 1.0, 1.0
        else:  # starts (B, 1, n, c): count of row starts so far in the chunk
            count = mx.cumsum(starts.astype(mx.int32), axis=-1)
            same = lower & (count[..., :, None] == count[..., None, :])
            carry = (count == 0).astype(q.dtype)
            tail = (count == count[..., -1:]).astype(q.dtype)
        # masked before the exp too: above the diagonal exp would overflow, and autodiff through where() turns
        # an overflowed branch into inf * 0 = NaN
        self.p = mx.where(same, mx.exp(mx.where(same, cum[..., :, None] - cum[..., None, :], 0.0)), 0.0)
        self.ps = mx.where(i[:, None] > i[None, :], self.p, 0.0)
        self.gam = mx.exp(cum) * carry
        self.r = mx.exp(cum[..., -1:] - cum) * tail
        self.kk = k @ _t(k)
        self.a = self.ps * beta[..., None] * self.kk
        self.tinv = unit_lower_inverse(self.a)
        self.vb = beta[..., None] * v
        self.kb = (beta * self.gam)[..., None] * k
        self.u = self.tinv @ self.vb
        self.w = self.tinv @ self.kb

    def carry_out(self, i):
        """The chunk i's gam_C (B, H, 1, 1) and r K (B, H, c, Dk)."""
        return self.gam[:, :, i, -1][..., None, None], self.r[:, :, i, :, None] * self.k[:, :, i]


def _inputs(q, k, v, log_g, beta, starts, c):
    rep = v.shape[2] // k.shape[2]
    if rep > 1:
        q, k = mx.repeat(q, rep, axis=2), mx.repeat(k, rep, axis=2)
    f = state_dtype(v.dtype)
    chunks = [_to_chunks(x.astype(f), c) for x in (q, k, v, log_g, beta)]
    if starts is not None:
        starts = _to_chunks(starts[..., None].astype(mx.int32), c)  # (B, 1, n, c)
    return chunks, starts


def state_dtype(dtype):
    """fp32 states and products (fp64 when the inputs are fp64: the tests' exact reference)."""
    return mx.float64 if dtype == mx.float64 else mx.float32


def chunk_length(spec_chunk, t):
    return max(1, min(spec_chunk, t))


def _head_groups(q, k, v, log_g, beta, group, extra=()):
    """The inputs split into groups of `group` value heads (and their key heads): heads never interact, so the rule
    runs per group; `extra` are further (B, ..., Hv, ...) arrays split along their axis 2 (value heads)."""
    hv, rep = v.shape[2], v.shape[2] // k.shape[2]
    for h0 in range(0, hv, group):
        h1 = min(hv, h0 + group)
        yield ([q[:, :, h0 // rep:h1 // rep], k[:, :, h0 // rep:h1 // rep], v[:, :, h0:h1], log_g[:, :, h0:h1],
                beta[:, :, h0:h1]], [x[:, :, h0:h1] if x is not None else None for x in extra])


def gated_delta_forward(q, k, v, log_g, beta, chunk=64, state=None, starts=None, save=False, group=0):
    """y (B, T, Hv, Dv) fp32 of the gated delta rule, and the final state (B, Hv, Dv, Dk); with save=True also the
    states at the chunk boundaries (B, Hv, n, Dv, Dk) that `gated_delta_backward` needs. q, k: (B, T, Hk, Dk),
    already normalised and scaled; v (B, T, Hv, Dv); log_g, beta (B, T, Hv); state: the initial state (None: 0);
    starts (B, T) booleans: the first token of each packed row (None: one row). group: value heads per group (a
    multiple of Hv / Hk), each group evaluated before the next so one group's temporaries are alive at a time
    (0: all heads in one graph)."""
    b, t, hv, dv = v.shape
    if 0 < group < hv:
        outs = []
        for inputs, (s0,) in _head_groups(q, k, v, log_g, beta, group,
                                          (None if state is None else state.swapaxes(1, 2),)):
            outs.append(gated_delta_forward(*inputs, chunk, None if s0 is None else s0.swapaxes(1, 2), starts, save))
            mx.eval(outs[-1])
        return tuple(mx.concatenate(parts, axis=ax) for parts, ax in zip(zip(*outs), (2, 1, 1)))
    c = chunk_length(chunk, t)
    (qc, kc, vc, gc, bc), sc = _inputs(q, k, v, log_g, beta, starts, c)
    ch = _Chunk(qc, kc, vc, gc, bc, sc, c)
    f = state_dtype(v.dtype)
    s = mx.zeros((b, hv, dv, k.shape[-1]), f) if state is None else state.astype(f)
    states, deltas = [], []
    for i in range(qc.shape[2]):
        states.append(s)
        d = ch.u[:, :, i] - ch.w[:, :, i] @ _t(s)
        g_c, rk = ch.carry_out(i)
        s = g_c * s + _t(d) @ rk
        deltas.append(d)
    st, d = mx.stack(states, axis=2), mx.stack(deltas, axis=2)
    y = ch.gam[..., None] * (qc @ _t(st)) + (ch.p * (qc @ _t(kc))) @ d
    y = _from_chunks(y, t)
    return (y, s, st) if save else (y, s)


def gated_delta_backward(dy, q, k, v, log_g, beta, states, chunk=64, starts=None, group=0):
    """(dq, dk, dv, dlog_g, dbeta) of `gated_delta_forward`'s y (from a zero or given initial state, whose gradient
    is not returned), given dy (B, T, Hv, Dv) and the saved chunk-boundary states. dq, dk are per key head. group:
    as in the forward."""
    b, t, hv, dv = v.shape
    if 0 < group < hv:
        outs = []
        for inputs, (dyg, sg) in _head_groups(q, k, v, log_g, beta, group, (dy, states.swapaxes(1, 2))):
            outs.append(gated_delta_backward(dyg, *inputs, sg.swapaxes(1, 2), chunk, starts))
            mx.eval(outs[-1])
        return tuple(mx.concatenate(parts, axis=2) for parts in zip(*outs))
    hk = k.shape[2]
    c = chunk_length(chunk, t)
    (qc, kc, vc, gc, bc), sc = _inputs(q, k, v, log_g, beta, starts, c)
    ch = _Chunk(qc, kc, vc, gc, bc, sc, c)
    st = states
    dyc = _to_chunks(dy.astype(state_dtype(v.dtype)), c)
    d = ch.u - ch.w @ _t(st)
    qk = qc @ _t(kc)
    ao = ch.p * qk
    x_from_y = _t(ao) @ dyc  # Y's share of dd
    z_from_y = _t(ch.gam[..., None] * dyc) @ qc  # Y's share of dS0
    n = qc.shape[2]
    ds = mx.zeros_like(st[:, :, 0])
    dds, ds_outs = [None] * n, [None] * n
    for i in reversed(range(n)):
        g_c, rk = ch.carry_out(i)
        dd = x_from_y[:, :, i] + rk @ _t(ds)
        ds_outs[i] = ds
        ds = g_c * ds + z_from_y[:, :, i] - _t(dd) @ ch.w[:, :, i]
        dds[i] = dd
    dd, ds1 = mx.stack(dds, axis=2), mx.stack(ds_outs, axis=2)
    # S_C = gam_C S0 + d^T (r K)
    dkr = d @ ds1
    dk = ch.r[..., None] * dkr
    dr = (dkr * kc).sum(-1)
    dgam_c = (ds1 * st).sum((-2, -1))
    # Y = gam (Q S0^T) + (P * Q K^T) d
    dao = (dyc @ _t(d)) * ch.p
    dq = dao @ kc + (ch.gam[..., None] * dyc) @ st
    dk = dk + _t(dao) @ qc
    e = dao * qk  # d/dP * P, through exp(G_i - G_j)
    dcum = e.sum(-1) - e.sum(-2)
    dgam = (dyc * (qc @ _t(st))).sum(-1)
    # d = U - W S0^T, U = T (b V), W = T (b gam K)
    dw = -(dd @ st)
    dt = dd @ _t(ch.vb) + dw @ _t(ch.kb)
    dvb, dkb = _t(ch.tinv) @ dd, _t(ch.tinv) @ dw
    dv = bc[..., None] * dvb
    dbeta = (dvb * vc).sum(-1) + (dkb * ch.gam[..., None] * kc).sum(-1)
    dk = dk + (bc * ch.gam)[..., None] * dkb
    dgam = dgam + bc * (dkb * kc).sum(-1)
    # T = (I + A)^-1, A = Ps * b_i * K K^T
    da = -(_t(ch.tinv) @ dt @ _t(ch.tinv))  # only its strictly lower part matters: every use is times ps
    dkk = da * ch.ps * bc[..., None]
    dbeta = dbeta + (da * ch.ps * ch.kk).sum(-1)
    e = da * ch.a
    dcum = dcum + e.sum(-1) - e.sum(-2)
    dk = dk + (dkk + _t(dkk)) @ kc
    # gam = exp(G) (masked), gam_C, r = exp(G_C - G) (masked)
    dcum = dcum + dgam * ch.gam - dr * ch.r
    last = dgam_c * ch.gam[..., -1] + (dr * ch.r).sum(-1)
    dcum = dcum + mx.concatenate([mx.zeros_like(dcum[..., :-1]), last[..., None]], axis=-1)
    dlog_g = mx.cumsum(dcum, axis=-1, reverse=True)
    dq, dk, dv = (_from_chunks(x, t) for x in (dq, dk, dv))
    dlog_g, dbeta = (_from_chunks(x, t) for x in (dlog_g, dbeta))
    if hv != hk:
        dq = dq.reshape(b, t, hk, hv // hk, -1).sum(3)
        dk = dk.reshape(b, t, hk, hv // hk, -1).sum(3)
    return dq, dk, dv, dlog_g, dbeta


def causal_conv(x, w, positions=None, prefix=None):
    """The causal depthwise conv: out_t = sum_s w[:, s] x_{t-K+1+s} (K = w.shape[1] taps), zeros before the start.
    positions (B, T): each token's position in its packed row, so no tap reaches into the row before; prefix
    (B, K-1, C): the inputs before x (generation's conv state) instead of zeros."""
    taps, t = w.shape[1], x.shape[1]
    before = mx.zeros((x.shape[0], taps - 1, x.shape[2]), x.dtype) if prefix is None else prefix.astype(x.dtype)
    xp = mx.concatenate([before, x], axis=1)
    w = w.astype(x.dtype)
    out = 0
    for s in range(taps):
        tap = xp[:, s:s + t] * w[:, s]
        out = out + (tap if positions is None else mx.where((positions >= taps - 1 - s)[..., None], tap, 0))
    return out


def causal_conv_backward(dout, w, positions=None):
    """dx of `causal_conv` (from zeros before the start)."""
    taps, t = w.shape[1], dout.shape[1]
    w = w.astype(dout.dtype)
    dxp = 0
    for s in range(taps):
        d = dout * w[:, s]
        if positions is not None:
            d = mx.where((positions >= taps - 1 - s)[..., None], d, 0)
        dxp = dxp + mx.pad(d, [(0, 0), (s, taps - 1 - s), (0, 0)])
    return dxp[:, taps - 1:]


def l2norm(x):
    return x * mx.rsqrt(mx.sum(mx.square(x), axis=-1, keepdims=True) + L2_EPS)


def l2norm_backward(du, x):
    r = mx.rsqrt(mx.sum(mx.square(x), axis=-1, keepdims=True) + L2_EPS)
    return r * du - x * (r ** 3) * mx.sum(x * du, axis=-1, keepdims=True)


def silu(x):
    return x * mx.sigmoid(x)


def silu_backward(dy, x):
    s = mx.sigmoid(x)
    return dy * s * (1 + x * (1 - s))


def log_decay(a, a_log, dt_bias):
    """log g = -exp(A_log) softplus(a + dt_bias), in fp32 (fp64 for fp64 inputs)."""
    f = state_dtype(a.dtype)
    return -mx.exp(a_log.astype(f)) * mx.logaddexp(a.astype(f) + dt_bias.astype(f), 0.0)


def log_decay_backward(dlog_g, a, a_log, dt_bias):
    f = state_dtype(a.dtype)
    return (dlog_g * -mx.exp(a_log.astype(f)) * mx.sigmoid(a.astype(f) + dt_bias.astype(f))).astype(a.dtype)


class DeltaCache:
    """Generation's recurrent state of one linear-attention block: the last K-1 conv inputs (B, K-1, C) and the
    rule's state (B, Hv, Dv, Dk), both fixed-size whatever the length."""

    def __init__(self):
        self.conv = self.state = None

    def select(self, rows):
        self.conv, self.state = self.conv[rows], self.state[rows]

    def arrays(self):
        return [a for a in (self.conv, self.state) if a is not None]
