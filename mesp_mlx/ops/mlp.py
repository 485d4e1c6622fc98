"""The SiLU-gated product of the MLP: act = silu(g) * u (the three projections are LoRA-linears).

silu'(g) = sigmoid(g) (1 + g (1 - sigmoid(g))), so dg = dact * u * silu'(g) and du = dact * silu(g).
"""
import mlx.core as mx


def swiglu_forward(g, u):
    return g * mx.sigmoid(g) * u


def swiglu_backward(dact, g, u, sig=None):
    """sig = sigmoid(g) when the caller already has it (the sigmoid is costly on the CPU)."""
    sig = mx.sigmoid(g) if sig is None else sig
    dg = dact * u * sig * (1 + g * (1 - sig))
    du = dact * g * sig
    return dg, du
