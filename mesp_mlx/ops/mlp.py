"""The gated product of the MLP, act = f(g) * u (the three projections are LoRA-linears), for the two gates the
supported families use: SiLU (Llama, Qwen, Mistral, Phi-3, SmolLM3) and GELU's tanh approximation (Gemma 3).

SiLU:       silu'(g) = sigmoid(g) (1 + g (1 - sigmoid(g)))
GELU(tanh): gelu(g) = g/2 (1 + t),  t = tanh(c (g + k g^3)),  c = sqrt(2/pi), k = 0.044715
            gelu'(g) = (1 + t)/2 + g/2 (1 - t^2) c (1 + 3 k g^2)
and in both dg = dact * u * f'(g), du = dact * f(g).
"""
import math

import mlx.core as mx

GELU_C, GELU_K = math.sqrt(2 / math.pi), 0.044715
ACTIVATIONS = ("silu", "gelu_tanh")


def swiglu_forward(g, u):
    return g * mx.sigmoid(g) * u


def swiglu_backward(dact, g, u, sig=None):
    """sig = sigmoid(g) when the caller already has it (the sigmoid is costly on the CPU)."""
    sig = mx.sigmoid(g) if sig is None else sig
    dg = dact * u * sig * (1 + g * (1 - sig))
    du = dact * g * sig
    return dg, du


def _gelu_tanh(g):
    return mx.tanh(GELU_C * (g + GELU_K * g ** 3))


def geglu_forward(g, u):
    # the same expression, in the same order, as mlx.nn.gelu_approx, so logits agree with mlx-lm's to the last bit
    return 0.5 * g * (1 + _gelu_tanh(g)) * u


def geglu_backward(dact, g, u, t=None):
    """t = tanh(c (g + k g^3)) when the caller already has it."""
    t = _gelu_tanh(g) if t is None else t
    dgelu = 0.5 * (1 + t) + 0.5 * g * (1 - t * t) * GELU_C * (1 + 3 * GELU_K * g * g)
    return dact * u * dgelu, dact * 0.5 * g * (1 + t)


def gated_forward(kind, g, u):
    return swiglu_forward(g, u) if kind == "silu" else geglu_forward(g, u)


def gated_act_and_backward(kind, g, u):
    """(act, back) with back(dact) -> (dg, du), sharing the costly sigmoid / tanh between the two: the structured
    backward recomputes act for the down projection's gradient and then differentiates the gate."""
    if kind == "silu":
        sig = mx.sigmoid(g)
        return g * sig * u, lambda dact: swiglu_backward(dact, g, u, sig)
    t = _gelu_tanh(g)
    return 0.5 * g * (1 + t) * u, lambda dact: geglu_backward(dact, g, u, t)
