"""LoRA over a frozen linear map: y = x W0^T + s (x A) B (+ bias).

The structured backward recomputes h = x A (r columns, cheaper to recompute than to keep) and reads W0 again from the
store for dx. `lora_linear` wraps the same pair as an `mx.custom_function` for use inside any MLX autodiff model, and
`LoRALinear` is a drop-in for mlx-lm's module of the same name (same parameters, same adapter file).
"""
import math

import mlx.core as mx
import mlx.nn as nn

from .linear import DEFAULT, Frozen, dense, frozen_matmul, frozen_matmul_t


def lora_linear_forward(x, w: Frozen, a, b, scale, compute=DEFAULT, keep=None):
    """keep: LoRA dropout on the low-rank branch's input (mlx-lm's), as a mask already divided by 1 - p."""
    y = frozen_matmul(x, w, compute)
    if a is None:
        return y
    xd = x if keep is None else x * keep
    return y + scale * ((xd @ a) @ b)


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
        dx_low = (dh @ a.T).reshape(x.shape)
        dx = dx + (dx_low if keep is None else dx_low * keep)
    return dx, da, db


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
