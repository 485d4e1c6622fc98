"""Every forward/backward pair against MLX autodiff of the plain forward, on odd shapes."""
import mlx.core as mx
import pytest

from helpers import EXACT, assert_close
from mesp_mlx.ops.attention import attention_backward, attention_forward
from mesp_mlx.ops.block import BlockSpec, block_backward, block_forward
from mesp_mlx.ops.linear import Compute, Frozen
from mesp_mlx.ops.lora_linear import LoRALinear, lora_linear, lora_linear_backward, lora_linear_forward
from mesp_mlx.ops.loss import cross_entropy_backward, cross_entropy_forward
from mesp_mlx.ops.mlp import swiglu_backward, swiglu_forward
from mesp_mlx.ops.rmsnorm import rmsnorm_backward, rmsnorm_forward
from mesp_mlx.ops.rope import rope_backward, rope_forward, rope_spec

R = lambda *s: mx.random.normal(s)


def vjp(fn, primals, cot):
    return mx.vjp(fn, primals, [cot])[1]


def quantized(out_dim, in_dim, bias=False):
    w, s, b = mx.quantize(R(out_dim, in_dim) * 0.1, group_size=32, bits=4)
    return Frozen(w, s, b, R(out_dim) if bias else None, 32, 4)


@pytest.mark.parametrize("path", ["dequantize", "quantized"])
@pytest.mark.parametrize("bias", [False, True])
def test_lora_linear(path, bias):
    mx.random.seed(1)
    compute = Compute(matmul=path)
    w = quantized(48, 96, bias)
    x, a, b, dy = R(3, 7, 96), R(96, 5) * 0.1, R(5, 48) * 0.1, R(3, 7, 48)
    ref = vjp(lambda x, a, b: lora_linear_forward(x, w, a, b, 2.5, compute), [x, a, b], dy)
    got = lora_linear_backward(dy, x, w, a, b, 2.5, compute)
    for g, r, n in zip(got, ref, "x A B".split()):
        assert_close(g, r, n)


def test_lora_linear_custom_function_and_module():
    mx.random.seed(2)
    w = quantized(32, 64)
    x, a, b, dy = R(2, 5, 64), R(64, 4), R(4, 32), R(2, 5, 32)
    f = lora_linear(w, 20.0)
    ref = vjp(lambda x, a, b: lora_linear_forward(x, w, a, b, 20.0), [x, a, b], dy)
    # mx.vjp runs the custom vjp; compare against the plain graph above
    for g, r in zip(vjp(f, [x, a, b], dy), ref):
        assert_close(g, r)
    # drop-in for mlx-lm's LoRALinear: same output as mlx-lm's module with the same parameters
    import mlx.nn as nn
    from mlx_lm.tuner.lora import LoRALinear as MlxLoRA
    base = nn.QuantizedLinear(64, 32, bias=False, group_size=32, bits=4)
    ours, theirs = LoRALinear.from_base(base, r=4, scale=20.0), MlxLoRA.from_base(base, r=4, scale=20.0)
    ours.lora_a, ours.lora_b = theirs.lora_a, R(4, 32)
    theirs.lora_b = ours.lora_b
    assert_close(ours(x), theirs(x))


@pytest.mark.parametrize("shape", [(2, 9, 64), (1, 1, 33)])
def test_rmsnorm(shape):
    x, w, dy = R(*shape), R(shape[-1]), R(*shape)
    ref = vjp(lambda x: rmsnorm_forward(x, w, 1e-5), [x], dy)[0]
    assert_close(rmsnorm_backward(dy, x, w, 1e-5), ref)


@pytest.mark.parametrize("traditional", [False, True])
@pytest.mark.parametrize("dims,scaling", [(16, None), (12, None), (16, {"rope_type": "linear", "factor": 2.0}),
                                          (16, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                "high_freq_factor": 4.0, "original_max_position_embeddings": 64})])
def test_rope(traditional, dims, scaling):
    rope = rope_spec(dims, 10000.0, traditional, scaling)
    x, dy = R(2, 3, 11, 16), R(2, 3, 11, 16)
    ref = vjp(lambda x: rope_forward(x, rope), [x], dy)[0]
    assert_close(rope_backward(dy, rope), ref)
    # RoPE is a rotation: the backward is its inverse
    assert_close(rope_backward(rope_forward(x, rope), rope), x)


def plain_attention(q, k, v, scale):
    g = q.shape[1] // k.shape[1]
    k, v = mx.repeat(k, g, axis=1), mx.repeat(v, g, axis=1)
    t = q.shape[2]
    s = (q @ k.swapaxes(-1, -2)) * scale + mx.triu(mx.full((t, t), -1e9), k=1)
    return mx.softmax(s, axis=-1) @ v


@pytest.mark.parametrize("hq,hkv,t,chunk", [(3, 3, 10, 256), (6, 2, 1, 256), (7, 1, 19, 5), (4, 2, 16, 8)])
def test_attention(hq, hkv, t, chunk):
    q, k, v, do = R(2, hq, t, 8), R(2, hkv, t, 8), R(2, hkv, t, 8), R(2, hq, t, 8)
    scale = 8 ** -0.5
    o, lse = attention_forward(q, k, v, scale, chunk)
    assert_close(o, plain_attention(q, k, v, scale), "o")
    ref = vjp(lambda q, k, v: plain_attention(q, k, v, scale), [q, k, v], do)
    for g, r, n in zip(attention_backward(do, q, k, v, o, lse, scale, chunk), ref, "qkv"):
        assert_close(g, r, "d" + n)


def test_swiglu():
    g, u, d = R(2, 5, 24) * 3, R(2, 5, 24), R(2, 5, 24)
    ref = vjp(swiglu_forward, [g, u], d)
    for a, b in zip(swiglu_backward(d, g, u), ref):
        assert_close(a, b)


@pytest.mark.parametrize("tchunk,vchunk", [(512, 8192), (3, 17)])
@pytest.mark.parametrize("quant", [False, True])
def test_cross_entropy(tchunk, vchunk, quant):
    n, d, vocab = 11, 64, 101
    head = quantized(vocab, d) if quant else Frozen(R(vocab, d) * 0.2)
    h, t = R(n, d), mx.random.randint(0, vocab, (n,))
    m = (mx.random.uniform(shape=(n,)) > 0.3).astype(mx.float32)

    def plain(h):
        z = h @ (mx.dequantize(head.weight, head.scales, head.biases, 32, 4) if quant else head.weight).T
        ce = mx.logsumexp(z, axis=-1) - mx.take_along_axis(z, t[:, None], axis=-1)[:, 0]
        return mx.sum(ce * m) / mx.sum(m)

    compute = Compute(token_chunk=tchunk, vocab_chunk=vchunk)
    loss, lse = cross_entropy_forward(h, head, t, m, compute)
    ref_loss, ref_dh = mx.value_and_grad(plain)(h)
    assert abs(loss.item() - ref_loss.item()) <= EXACT * abs(ref_loss.item())
    assert_close(cross_entropy_backward(mx.array(1.0), h, head, t, m, lse, compute), ref_dh)


@pytest.mark.parametrize("qk_norm,bias,hq,hkv", [(False, False, 4, 4), (False, True, 6, 2), (True, False, 7, 1)])  # GQA 1, 3, 7
def test_block(qk_norm, bias, hq, hkv):
    mx.random.seed(3)
    d, f, hd, t = 64, 96, 32, 9
    spec = BlockSpec(hq, hkv, hd, 1e-5, rope_spec(hd, 10000.0, False), qk_norm, Compute(attn_chunk=4, mlp_chunk=4))
    w = {"input_layernorm": 1 + 0.1 * R(d), "post_attention_layernorm": 1 + 0.1 * R(d),
         "self_attn.q_proj": quantized(hq * hd, d, bias), "self_attn.k_proj": quantized(hkv * hd, d, bias),
         "self_attn.v_proj": quantized(hkv * hd, d, bias), "self_attn.o_proj": quantized(d, hq * hd),
         "mlp.gate_proj": quantized(f, d), "mlp.up_proj": quantized(f, d), "mlp.down_proj": quantized(d, f)}
    if qk_norm:
        w.update({"self_attn.q_norm": 1 + 0.1 * R(hd), "self_attn.k_norm": 1 + 0.1 * R(hd)})
    shapes = {"self_attn.q_proj": (d, hq * hd), "self_attn.v_proj": (d, hkv * hd), "self_attn.k_proj": (d, hkv * hd),
              "self_attn.o_proj": (hq * hd, d), "mlp.up_proj": (d, f), "mlp.down_proj": (f, d)}
    lora = {p: (R(i, 3) * 0.1, R(3, o) * 0.1) for p, (i, o) in shapes.items()}  # gate left without LoRA
    x, dy = R(2, t, d), R(2, t, d)
    paths = sorted(lora)

    def fn(x, *flat):
        return block_forward(x, w, {p: (flat[2 * j], flat[2 * j + 1]) for j, p in enumerate(paths)}, 2.0, spec)

    ref = vjp(fn, [x] + [a for p in paths for a in lora[p]], dy)
    saved = block_forward(x, w, lora, 2.0, spec, save=True)
    dx, grads = block_backward(dy, x, saved, w, lora, 2.0, spec)
    assert_close(dx, ref[0], "dx")
    assert set(grads) == set(paths)
    for j, p in enumerate(paths):
        assert_close(grads[p][0], ref[1 + 2 * j], p + ".lora_a")
        assert_close(grads[p][1], ref[2 + 2 * j], p + ".lora_b")
