"""One transformer block (Llama / Qwen2 / Qwen3), forward and structured backward.

    z1 = RMSNorm1(x);  q,k,v = LoRA-linears(z1) (+bias);  [Qwen3: q,k = RMSNorm(q), RMSNorm(k) per head]
    q,k = RoPE(q), RoPE(k);  o = attention(q, k, v);  a = x + o_proj(o)
    z2 = RMSNorm2(a);  g, u = gate(z2), up(z2);  y = a + down(silu(g) * u)

`block_forward(..., save=True)` also returns what the backward needs, hand-picked: z1, z2 (inputs of the LoRA
projections), the roped q and k, v, the attention output o and its per-query lse, the residual a, and the MLP's
g and u. Per token that is 4d + (Hq + 2 Hkv) D [+ (Hq + Hkv) D pre-norm q/k for Qwen3] + Hq + 2f floats; nothing
of size T x T (attention recomputes its probabilities per query block) and silu(g)*u is recomputed. The block input x
is the checkpoint and is owned by the caller.
"""
from dataclasses import dataclass

import mlx.core as mx

from .attention import attention_backward, attention_forward
from .linear import DEFAULT, Compute
from .lora_linear import lora_linear_backward, lora_linear_forward
from .mlp import swiglu_backward, swiglu_forward
from .rmsnorm import rmsnorm_backward, rmsnorm_forward
from .rope import Rope, rope_backward, rope_forward

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@dataclass(frozen=True)
class BlockSpec:
    n_heads: int
    n_kv_heads: int
    head_dim: int
    eps: float
    rope: Rope
    qk_norm: bool = False
    compute: Compute = DEFAULT  # dtype, matmul path, attention and MLP chunk sizes
    sdpa: bool = True  # MLX's fused attention where only the output is needed (save=False)

    @property
    def attn_scale(self):
        return self.head_dim ** -0.5

    @property
    def attn_chunk(self):
        return self.compute.attn_chunk

    @property
    def mlp_chunk(self):
        return self.compute.mlp_chunk


def _lora(lora, name):
    return lora.get(name, (None, None))


def _heads(x, n):
    b, t, _ = x.shape
    return x.reshape(b, t, n, -1).transpose(0, 2, 1, 3)


def _merge(x):
    b, h, t, d = x.shape
    return x.transpose(0, 2, 1, 3).reshape(b, t, h * d)


def _by_tokens(fn, t, chunk):
    """fn(t0, t1) over blocks of the sequence axis, concatenated (one call when t <= chunk)."""
    if t <= chunk:
        return fn(0, t)
    return mx.concatenate([fn(t0, min(t, t0 + chunk)) for t0 in range(0, t, chunk)], axis=1)


def block_forward(x, w, lora, scale, spec: BlockSpec, save=False):
    """w: the block's frozen weights by module path; lora: {path: (A, B)} for the adapted projections."""
    z1 = rmsnorm_forward(x, w["input_layernorm"], spec.eps)
    proj = lambda name, inp: lora_linear_forward(inp, w[name], *_lora(lora, name), scale, spec.compute)
    q = _heads(proj("self_attn.q_proj", z1), spec.n_heads)
    k = _heads(proj("self_attn.k_proj", z1), spec.n_kv_heads)
    v = _heads(proj("self_attn.v_proj", z1), spec.n_kv_heads)
    q_pre, k_pre = q, k
    if spec.qk_norm:
        q = rmsnorm_forward(q, w["self_attn.q_norm"], spec.eps)
        k = rmsnorm_forward(k, w["self_attn.k_norm"], spec.eps)
    q, k = rope_forward(q, spec.rope), rope_forward(k, spec.rope)
    if spec.sdpa and not save and (q.shape[2] <= spec.attn_chunk or mx.default_device() != mx.cpu):
        # MLX's CPU fallback materialises all T x T scores; past one query block the chunked form is used there
        o = mx.fast.scaled_dot_product_attention(q, k, v, scale=spec.attn_scale, mask="causal")
    else:
        o, lse = attention_forward(q, k, v, spec.attn_scale, spec.attn_chunk, spec.compute.sync_chunks)
    o = _merge(o)
    a = x + proj("self_attn.o_proj", o)
    z2 = rmsnorm_forward(a, w["post_attention_layernorm"], spec.eps)
    if not save:
        def mlp(t0, t1):
            zc = z2[:, t0:t1]
            return proj("mlp.down_proj", swiglu_forward(proj("mlp.gate_proj", zc), proj("mlp.up_proj", zc)))
        return a + _by_tokens(mlp, a.shape[1], spec.mlp_chunk)
    g, u = proj("mlp.gate_proj", z2), proj("mlp.up_proj", z2)
    # the backward never needs y: the recompute stops before the down projection
    saved = dict(z1=z1, q=q, k=k, v=v, o=o, lse=lse, a=a, z2=z2, g=g, u=u)
    if spec.qk_norm:
        saved.update(q_pre=q_pre, k_pre=k_pre)
    return saved


def block_backward(dy, x, saved, w, lora, scale, spec: BlockSpec):
    """Returns (dx, grads) with grads {path: (dA, dB)}. Consumes `saved`: each intermediate is dropped once used."""
    grads = {}

    def back(name, d_out, inp):
        dx, da, db = lora_linear_backward(d_out, inp, w[name], *_lora(lora, name), scale, spec.compute)
        if da is not None:  # summed over the token blocks that call it
            grads[name] = (da, db) if name not in grads else (grads[name][0] + da, grads[name][1] + db)
        return dx

    # MLP, one block of tokens at a time (its T x f temporaries are the largest of the block)
    g, u, z2, a = saved.pop("g"), saved.pop("u"), saved.pop("z2"), saved.pop("a")

    def mlp_backward(t0, t1):
        gc, uc, zc, dyc = g[:, t0:t1], u[:, t0:t1], z2[:, t0:t1], dy[:, t0:t1]
        sig = mx.sigmoid(gc)
        dact = back("mlp.down_proj", dyc, gc * sig * uc)
        dg, du = swiglu_backward(dact, gc, uc, sig)
        dz2 = back("mlp.gate_proj", dg, zc) + back("mlp.up_proj", du, zc)
        out = dyc + rmsnorm_backward(dz2, a[:, t0:t1], w["post_attention_layernorm"], spec.eps)
        if spec.compute.sync_chunks:
            mx.eval(out, grads)
        return out

    da = _by_tokens(mlp_backward, dy.shape[1], spec.mlp_chunk)
    g = u = z2 = a = None  # freed before the attention half
    if spec.compute.sync_chunks:
        mx.eval(da)

    # attention
    o = saved.pop("o")
    do = _heads(back("self_attn.o_proj", da, o), spec.n_heads)
    q, k, v = saved.pop("q"), saved.pop("k"), saved.pop("v")
    dq, dk, dv = attention_backward(do, q, k, v, _heads(o, spec.n_heads), saved.pop("lse"),
                                    spec.attn_scale, spec.attn_chunk, spec.compute.sync_chunks)
    del o, do, q, k, v
    dq, dk = rope_backward(dq, spec.rope), rope_backward(dk, spec.rope)
    if spec.qk_norm:
        dq = rmsnorm_backward(dq, saved.pop("q_pre"), w["self_attn.q_norm"], spec.eps)
        dk = rmsnorm_backward(dk, saved.pop("k_pre"), w["self_attn.k_norm"], spec.eps)
    z1 = saved.pop("z1")
    dz1 = (back("self_attn.q_proj", _merge(dq), z1) + back("self_attn.k_proj", _merge(dk), z1)
           + back("self_attn.v_proj", _merge(dv), z1))
    dx = da + rmsnorm_backward(dz1, x, w["input_layernorm"], spec.eps)
    return dx, grads
