"""RMSNorm with a frozen weight: y = x * r * w_eff, r = 1/sqrt(mean(x^2) + eps), w_eff = offset + w.

Llama-style norms store the multiplier itself (offset 0); Gemma stores it minus one (offset 1: w_eff = 1 + w). The
sum is formed in the weight's own dtype, as the reference implementations do, so a bf16 checkpoint gives the same
rounded multiplier. Backward: with xhat = x r and gw = dy w_eff, dx = r (gw - xhat mean(gw xhat)). Only x is kept;
r is recomputed.
"""
import mlx.core as mx


def norm_weight(w, offset=0.0):
    """The multiplier the norm applies: w, or offset + w in w's dtype."""
    return w if not offset else offset + w


def rmsnorm_forward(x, w, eps, offset=0.0):
    w = norm_weight(w, offset).astype(x.dtype)
    if x.dtype == mx.float64:  # MLX's fused kernel is only fp32-accurate in fp64 (~1e-6): the exactness checks
        return x * mx.rsqrt(mx.mean(mx.square(x), axis=-1, keepdims=True) + eps) * w  # need the plain form
    return mx.fast.rms_norm(x, w, eps)


def rmsnorm_backward(dy, x, w, eps, offset=0.0):
    r = mx.rsqrt(mx.mean(mx.square(x), axis=-1, keepdims=True) + eps)
    xhat = x * r
    gw = dy * norm_weight(w, offset).astype(dy.dtype)
    return r * (gw - xhat * mx.mean(gw * xhat, axis=-1, keepdims=True))
