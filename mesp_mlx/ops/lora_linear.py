"""LoRA over a frozen linear map: y = x W0^T + s (x A) B (+ bias).

The structured backward recomputes h = x A (r columns, cheaper to recompute than to keep) and reads W0 again from the
store for dx. `lora_linear` wraps the same pair as an `mx.custom_function` for use inside any MLX autodiff model, and
`LoRALinear` is a drop-in for mlx-lm's module of the same name (same parameters, same adapter file).
"""
import math
import operator
from functools import reduce
from itertools import accumulate

import mlx.core as mx
import mlx.nn as nn

from .linear import DEFAULT, Frozen, dense, frozen_matmul, frozen_matmul_t


def lora_linear_forward(x, w: Frozen, a, b, scale, compute=DEFAULT, keep=None):
    """keep: LoRA dropout on the low-rank branch's input (mlx-lm's), as a mask already divided by 1 - p."""
    y = frozen_matmul(x, w, compute)
    if a is None:
        return y
    xd = x if keep is None else x * keep
    return mx.addmm(y, xd @ a, b, alpha=scale)  # y + s (x A) B as one product: the scale and the sum in its epilogue


def lora_linear_backward(dy, x, w: Frozen, a, b, scale, compute=DEFAULT, need_dx=True, keep=None):
    """Returns (dx, dA, dB); dA and dB are None when the layer has no LoRA, dx when need_dx is False.
    With dropout (keep = M / (1 - p)): xd = x keep, h = xd A, dA = xd^T dh, and dx's low-rank term is (dh A^T) keep."""
    dx = frozen_matmul_t(dy, w, compute) if need_dx else None
    if a is None:
        return dx, None, None
    xd = x if keep is None else x * keep
    x2, g2 = xd.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
    # the forward's own product, reshaped: in a compiled recompute + backward both are one kernel (CSE)
    h = (xd @ a).reshape(-1, a.shape[-1])
    db = scale * (h.T @ g2)  # the scale goes on the r-sized products, not on the T x out gradient
    dh = scale * (g2 @ b.T)
    da = x2.T @ dh
    if need_dx:
        if keep is None:  # dx + dh A^T as one product
            dx = mx.addmm(dx.reshape(x2.shape), dh, a.T).reshape(x.shape)
        else:
            dx = dx + (dh @ a.T).reshape(x.shape) * keep
    return dx, da, db


def _down_all(x, pairs):
    """Projections reading the same x: (indices of the adapted ones, h = x [A_1 ... A_k] (one product for all their
    down-projections), [A_1 ... A_k], each one's columns of h)."""
    live = [i for i, (a, _) in enumerate(pairs) if a is not None]
    a_all = mx.concatenate([pairs[i][0] for i in live], axis=1)
    ends = [0, *accumulate(pairs[i][0].shape[1] for i in live)]
    return live, x @ a_all, a_all, [slice(e0, e1) for e0, e1 in zip(ends, ends[1:])]


def _groups(pairs, keeps):
    """Whether projections can share their down-projection product: two or more adapted, no dropout mask."""
    return sum(a is not None for a, _ in pairs) > 1 and all(k is None for k in keeps)


def lora_group_forward(x, ws, pairs, scale, compute=DEFAULT, keeps=None):
    """LoRA linears that read the same x (q, k and v; gate and up): [y_i]. The adapted ones' down-projections are
    one product x [A_1 ... A_k] (one kernel, not k), each y_i takes its columns of it. keeps: each one's dropout
    mask (or None); with masks the inputs differ, so each projection is its own."""
    keeps = keeps or [None] * len(ws)
    if not _groups(pairs, keeps):
        return [lora_linear_forward(x, w, a, b, scale, compute, k) for w, (a, b), k in zip(ws, pairs, keeps)]
    live, h, _, cols = _down_all(x, pairs)
    ys = [frozen_matmul(x, w, compute) for w in ws]
    for i, c in zip(live, cols):
        ys[i] = mx.addmm(ys[i], h[..., c], pairs[i][1], alpha=scale)
    return ys


def lora_group_backward(dys, x, ws, pairs, scale, compute=DEFAULT, keeps=None):
    """The backward of `lora_group_forward`: (dx summed over the projections, [(dA_i, dB_i)], None pairs for the
    ones without LoRA). Shared: h (the forward's product), one x^T [dh_1 ... dh_k] for every dA and one
    [dh_1 ... dh_k] [A_1 ... A_k]^T for dx's low-rank terms."""
    keeps = keeps or [None] * len(ws)
    if not _groups(pairs, keeps):
        outs = [lora_linear_backward(dy, x, w, a, b, scale, compute, keep=k)
                for dy, w, (a, b), k in zip(dys, ws, pairs, keeps)]
        return reduce(operator.add, [dx for dx, _, _ in outs]), [(da, db) for _, da, db in outs]
    dx = reduce(operator.add, [frozen_matmul_t(dy, w, compute) for dy, w in zip(dys, ws)])
    live, h, a_all, cols = _down_all(x, pairs)
    x2 = x.reshape(-1, x.shape[-1])
    h = scale * h.reshape(-1, h.shape[-1])  # the scale on the r-sized products, once for the group's dB ...
    dbs = [h[:, c].T @ dys[i].reshape(-1, dys[i].shape[-1]) for i, c in zip(live, cols)]
    dh = scale * mx.concatenate([dys[i].reshape(-1, dys[i].shape[-1]) @ pairs[i][1].T for i in live], axis=1)
    da = x2.T @ dh  # ... and once for its dA and dx
    dx = mx.addmm(dx.reshape(x2.shape), dh, a_all.T).reshape(x.shape)
    grads = [(None, None)] * len(ws)
    for i, c, db in zip(live, cols, dbs):
        grads[i] = (da[:, c], db)
    return dx, grads


def lora_merge(w: Frozen, a, b, scale):
    """The adapted map as one dense fp32 (out x in) weight, W + s (A B)^T, so that x W'^T = x W^T + s (x A) B: what a
    fused export writes. The sum is taken in fp32 whatever the store holds (an fp16 merge would round the update)."""
    return dense(w, mx.float32) + scale * (a.astype(mx.float32) @ b.astype(mx.float32)).T


def lora_linear(w: Frozen, scale, compute=DEFAULT):
    """An autodiff-ready f(x, lora_a, lora_b) whose vjp is the structured backward above."""

    @mx.custom_function
    def f(x, a, b):
        return lora_linear_forward(x, w, a, b, scale, compute)

    @f.vjp
    def f_vjp(primals, cotangent, output):
        x, a, b = primals
        return lora_linear_backward(cotangent, x, w, a, b, scale, compute)

    return f


class LoRALinear(nn.Module):
    """mlx-lm's LoRALinear parametrisation (lora_a (in, r), lora_b (r, out), scale) with the structured backward."""

    @staticmethod
    def from_base(linear, r=8, scale=20.0):
        in_dims = linear.weight.shape[1] * (32 // linear.bits if hasattr(linear, "bits") else 1)
        lora = LoRALinear(in_dims, linear.weight.shape[0], r=r, scale=scale)
        lora.linear = linear
        return lora

    def __init__(self, input_dims, output_dims, r=8, scale=20.0, bias=False):
        super().__init__()
        self.linear = nn.Linear(input_dims, output_dims, bias=bias)
        self.scale = scale
        bound = 1 / math.sqrt(input_dims)
        self.lora_a = mx.random.uniform(low=-bound, high=bound, shape=(input_dims, r))
        self.lora_b = mx.zeros((r, output_dims))

    def frozen(self):
        lin = self.linear
        bias = lin.get("bias")
        if hasattr(lin, "scales"):
            return Frozen(lin.weight, lin.scales, lin.get("biases"), bias, lin.group_size, lin.bits)
        return Frozen(lin.weight, bias=bias)

    def __call__(self, x):
        return lora_linear(self.frozen(), self.scale)(x, self.lora_a, self.lora_b)
