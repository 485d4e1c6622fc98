"""Every forward/backward pair against MLX autodiff of the plain forward, on odd shapes."""
import mlx.core as mx
import pytest

from helpers import EXACT, assert_close, rel_err
from mesp_mlx.ops.attention import attention_backward, attention_forward
from mesp_mlx.ops.block import BlockSpec, block_backward, block_forward, block_recompute
from mesp_mlx.ops.linear import Compute, Frozen
from mesp_mlx.ops.lora_linear import (LoRALinear, lora_group_backward, lora_group_forward, lora_linear,
                                      lora_linear_backward, lora_linear_forward)
from mesp_mlx.ops.loss import cross_entropy_forward, cross_entropy_forward_backward
from mesp_mlx.ops.mlp import geglu_backward, geglu_forward, swiglu_backward, swiglu_forward
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


def test_affine_copies_and_row_blocks():
    """An affine weight's dense copy filled a row block at a time (ops.linear.dense_for, where chunks are evaluated
    one by one) is the whole dequantization bit for bit, the last block short; and the MLP's row-blocked products
    (Compute.for_mlp: affine weights dequantized mlp_rows rows at a time) equal the whole products to one product's
    rounding (EXACT), with a bias and a last block short, by chunk or as one graph."""
    from mesp_mlx.ops.linear import FILL_BYTES, dense, dense_for, frozen_matmul, frozen_matmul_t
    mx.random.seed(3)
    rows = FILL_BYTES // (4 * 1024)
    big = quantized(rows + rows // 2 + 3, 1024)
    for sync in ("chunk", "block"):
        assert mx.array_equal(dense_for(big, Compute(matmul="dequantize", sync=sync)), dense(big))
    w, x, g = quantized(300, 96, bias=True), R(2, 5, 96), R(2, 5, 300)
    whole = Compute(matmul="dequantize")
    assert whole.for_mlp() is whole and Compute(matmul="quantized", mlp_rows=64).for_mlp().dequant_rows == 0
    for sync in ("chunk", "block"):
        blocked = Compute(matmul="dequantize", mlp_rows=64, sync=sync).for_mlp()
        assert blocked.dequant_rows == 64 and blocked.row_affine
        assert rel_err(frozen_matmul(x, w, blocked), frozen_matmul(x, w, whole)) <= EXACT
        assert rel_err(frozen_matmul_t(g, w, blocked), frozen_matmul_t(g, w, whole)) <= EXACT


@pytest.mark.parametrize("path", ["dequantize", "quantized"])
@pytest.mark.parametrize("adapted", [(0, 2), (0, 1, 2), (1,)])
def test_lora_group(path, adapted):
    """Projections reading the same x (q, k, v) with one shared down-projection product: outputs equal the separate
    LoRA linears', and dx, every dA and dB equal vjp of them; ranks differ, unadapted members get None."""
    mx.random.seed(5)
    compute = Compute(matmul=path)
    ws = [quantized(48, 96), quantized(32, 96, bias=True), quantized(16, 96)]
    pairs = [(R(96, r) * 0.1, R(r, w.out_dims) * 0.1) if i in adapted else (None, None)
             for i, (w, r) in enumerate(zip(ws, (5, 4, 3)))]
    x, dys = R(3, 7, 96), [R(3, 7, w.out_dims) for w in ws]
    for y, w, (a, b) in zip(lora_group_forward(x, ws, pairs, 2.5, compute), ws, pairs):
        assert_close(y, lora_linear_forward(x, w, a, b, 2.5, compute))
    live = [i for i in adapted]

    def separate(x, *flat):
        ab = dict(zip(live, zip(flat[::2], flat[1::2])))
        return [lora_linear_forward(x, w, *ab.get(i, (None, None)), 2.5, compute) for i, w in enumerate(ws)]
    ref = mx.vjp(separate, [x] + [t for i in live for t in pairs[i]], dys)[1]
    dx, grads = lora_group_backward(dys, x, ws, pairs, 2.5, compute)
    assert_close(dx, ref[0], "x")
    for j, i in enumerate(live):
        assert_close(grads[i][0], ref[1 + 2 * j], f"A{i}")
        assert_close(grads[i][1], ref[2 + 2 * j], f"B{i}")
    assert all(grads[i] == (None, None) for i in range(3) if i not in live)


def test_lora_linear_dropout():
    """LoRA dropout's mask on the low-rank branch's input: dx, dA, dB against vjp of the forward with that mask."""
    mx.random.seed(4)
    w = quantized(48, 96)
    x, a, b, dy = R(3, 7, 96), R(96, 5) * 0.1, R(5, 48) * 0.1, R(3, 7, 48)
    keep = mx.random.bernoulli(0.7, x.shape).astype(mx.float32) / 0.7
    ref = vjp(lambda x, a, b: lora_linear_forward(x, w, a, b, 2.5, keep=keep), [x, a, b], dy)
    got = lora_linear_backward(dy, x, w, a, b, 2.5, keep=keep)
    for g, r, n in zip(got, ref, "x A B".split()):
        assert_close(g, r, n)
    assert rel_err(got[1], lora_linear_backward(dy, x, w, a, b, 2.5)[1]) > 1e-2  # the mask matters


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


@pytest.mark.parametrize("offset", [0.0, 1.0])  # Llama's w, Gemma's 1 + w
@pytest.mark.parametrize("shape", [(2, 9, 64), (1, 1, 33)])
def test_rmsnorm(shape, offset):
    x, w, dy = R(*shape), R(shape[-1]), R(*shape)
    ref = vjp(lambda x: rmsnorm_forward(x, w, 1e-5, offset), [x], dy)[0]
    assert_close(rmsnorm_backward(dy, x, w, 1e-5, offset), ref)
    if offset:  # the same as a plain norm with multiplier 1 + w, and not the same as one with w
        assert_close(rmsnorm_forward(x, w, 1e-5, offset), rmsnorm_forward(x, 1 + w, 1e-5))
        assert float(mx.max(mx.abs(rmsnorm_forward(x, w, 1e-5, offset) - rmsnorm_forward(x, w, 1e-5)))) > 0.1


LONGROPE = {"type": "longrope", "long_factor": [1.0, 1.5, 2.0, 3.0, 5.0, 8.0], "short_factor": [1.0] * 6}


@pytest.mark.parametrize("traditional", [False, True])
@pytest.mark.parametrize("dims,scaling", [(16, None), (12, None), (16, {"rope_type": "linear", "factor": 2.0}),
                                          (16, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
                                          (12, LONGROPE)])  # partial, with LongRoPE's attention factor
def test_rope(traditional, dims, scaling):
    rope = rope_spec(dims, 10000.0, traditional, scaling, 256, 64)
    with mx.stream(mx.cpu):  # float64 (CPU only) takes the written-out rotation: the same map as MLX's kernel
        x64, dy64 = R(2, 3, 11, 16).astype(mx.float64), R(2, 3, 11, 16).astype(mx.float64)
        assert_close(rope_forward(x64, rope), rope_forward(x64.astype(mx.float32), rope).astype(mx.float64))
        ref = vjp(lambda x: rope_forward(x, rope), [x64], dy64)[0]
        assert rel_err(rope_backward(dy64, rope), ref) < 1e-12
    x, dy = R(2, 3, 11, 16), R(2, 3, 11, 16)
    ref = vjp(lambda x: rope_forward(x, rope), [x], dy)[0]
    assert_close(rope_backward(dy, rope), ref)
    # RoPE is a rotation: the backward is its inverse (LongRoPE's factor m on the rotated part: its square)
    if rope.mscale == 1.0:
        assert_close(rope_backward(rope_forward(x, rope), rope), x)
    else:
        assert rope.mscale > 1.0
        assert_close(rope_backward(rope_forward(x, rope), rope), x.at[..., :dims].multiply(rope.mscale ** 2))


def plain_attention(q, k, v, scale, window=None):
    """The T x T reference; a window W also masks keys j <= i - W (built independently of ops/attention.py)."""
    g = q.shape[1] // k.shape[1]
    k, v = mx.repeat(k, g, axis=1), mx.repeat(v, g, axis=1)
    s = (q @ k.swapaxes(-1, -2)) * scale + plain_mask(q.shape[2], window)
    return mx.softmax(s, axis=-1) @ v


def plain_mask(t, window=None):
    mask = mx.triu(mx.full((t, t), -1e9), k=1)
    return mask if window is None else mask + mx.tril(mx.full((t, t), -1e9), k=-window)


@pytest.mark.parametrize("hq,hkv,t,chunk,window", [(3, 3, 10, 256, None), (6, 2, 1, 256, None),
                                                   (7, 1, 19, 5, None), (4, 2, 16, 8, None),
                                                   # windows: shorter and longer than a query block, T > window,
                                                   # one block holding the whole sequence, a window of 1 (itself)
                                                   (4, 2, 23, 4, 7), (6, 3, 21, 8, 3), (4, 2, 17, 256, 5),
                                                   (2, 1, 9, 4, 1), (4, 2, 12, 5, 40)])
@pytest.mark.parametrize("logsumexp", [False, True])  # the CPU's one-exp form, compiled graphs' fewer kernels
def test_attention(hq, hkv, t, chunk, window, logsumexp):
    q, k, v, do = R(2, hq, t, 8), R(2, hkv, t, 8), R(2, hkv, t, 8), R(2, hq, t, 8)
    scale = 8 ** -0.5
    o, lse = attention_forward(q, k, v, scale, chunk, window=window, logsumexp=logsumexp)
    assert_close(o, plain_attention(q, k, v, scale, window), "o")
    assert_close(lse, mx.logsumexp((q @ mx.repeat(k, hq // hkv, axis=1).swapaxes(-1, -2)) * scale
                                   + plain_mask(t, window), axis=-1), "lse")
    ref = vjp(lambda q, k, v: plain_attention(q, k, v, scale, window), [q, k, v], do)
    for g, r, n in zip(attention_backward(do, q, k, v, o, lse, scale, chunk, window=window), ref, "qkv"):
        assert_close(g, r, "d" + n)
    if window is not None and window < t:  # the window is seen: plain causal attention differs
        assert float(mx.max(mx.abs(o - plain_attention(q, k, v, scale)))) > 1e-2


def test_swiglu():
    g, u, d = R(2, 5, 24) * 3, R(2, 5, 24), R(2, 5, 24)
    ref = vjp(swiglu_forward, [g, u], d)
    for a, b in zip(swiglu_backward(d, g, u), ref):
        assert_close(a, b)


def test_geglu():
    import mlx.nn as nn
    g, u, d = R(2, 5, 24) * 3, R(2, 5, 24), R(2, 5, 24)
    assert_close(geglu_forward(g, u), nn.gelu_approx(g) * u)  # mlx-lm's Gemma MLP gate
    ref = vjp(geglu_forward, [g, u], d)
    for a, b in zip(geglu_backward(d, g, u), ref):
        assert_close(a, b)


@pytest.mark.parametrize("tchunk,vchunk", [(512, 8192), (3, 17)])
@pytest.mark.parametrize("quant,bias", [(False, False), (True, False), (True, True)])
def test_cross_entropy(tchunk, vchunk, quant, bias):
    n, d, vocab = 11, 64, 101
    head = quantized(vocab, d, bias) if quant else Frozen(R(vocab, d) * 0.2)
    h, t = R(n, d), mx.random.randint(0, vocab, (n,))
    m = (mx.random.uniform(shape=(n,)) > 0.3).astype(mx.float32)

    def plain(h):
        z = h @ (mx.dequantize(head.weight, head.scales, head.biases, 32, 4) if quant else head.weight).T
        z = z if head.bias is None else z + head.bias
        ce = mx.logsumexp(z, axis=-1) - mx.take_along_axis(z, t[:, None], axis=-1)[:, 0]
        return mx.sum(ce * m) / mx.sum(m)

    compute = Compute(token_chunk=tchunk, vocab_chunk=vchunk)
    loss, _ = cross_entropy_forward(h, head, t, m, compute)
    ref_loss, ref_dh = mx.value_and_grad(plain)(h)
    assert abs(loss.item() - ref_loss.item()) <= EXACT * abs(ref_loss.item())
    # the one-pass forward and backward: the same loss and the gradient, with the softmax-weighted rows accumulated
    # under a running max
    one_loss, one_dh = cross_entropy_forward_backward(h, head, t, m, compute)
    assert abs(one_loss.item() - ref_loss.item()) <= EXACT * abs(ref_loss.item())
    assert_close(one_dh, ref_dh)



def test_automatic_tiles():
    """attn_chunk / vocab_chunk 0: CPU-sized tiles where chunks are evaluated one at a time, 64 MiB fp32 tiles where a
    block is one graph (a dense copy of the head's rows bounded too), explicit sizes as given."""
    from types import SimpleNamespace
    qwen_head = SimpleNamespace(out_dims=151936, affine=True)  # Qwen2.5's tied 4-bit head, 896 wide
    gpu, cpu = Compute(sync="block", matmul="quantized"), Compute(sync="chunk")
    assert gpu.head_tile(255, qwen_head, 896) == (255, 65793)  # 3 tiles at T=256
    assert gpu.head_tile(1023, qwen_head, 896) == (1023, 16400)
    assert gpu.head_tile(8 * 1023, qwen_head, 896) == (4096, 4096)
    assert gpu.head_tile(255, SimpleNamespace(out_dims=151936, affine=False), 896) == (255, 18724)
    assert Compute(sync="block", matmul="dequantize").head_tile(255, qwen_head, 896) == (255, 18724)
    assert cpu.head_tile(1023, qwen_head, 896) == (512, 4096)
    assert Compute(sync="block", token_chunk=7, vocab_chunk=64).head_tile(31, qwen_head, 896) == (7, 64)
    assert gpu.query_block(1, 14, 1024) == 1024 and cpu.query_block(1, 14, 1024) == 256
    assert gpu.query_block(1, 14, 4096) == 292 and Compute(attn_chunk=5).query_block(1, 14, 1024) == 5

def assert_block_backward(w, lora, spec, t, d):
    """The block's structured backward (dx and every LoRA gradient) against vjp of its forward, batch 2, length t;
    returns the names of what the recompute saved (the backward consumes the arrays)."""
    x, dy = R(2, t, d), R(2, t, d)
    paths = sorted(lora)

    def fn(x, *flat):
        return block_forward(x, w, {p: (flat[2 * j], flat[2 * j + 1]) for j, p in enumerate(paths)}, 2.0, spec)

    ref = vjp(fn, [x] + [a for p in paths for a in lora[p]], dy)
    saved = block_recompute(x, w, lora, 2.0, spec)
    keys = set(saved.arrays())
    dx, grads = block_backward(dy, x, saved, w, lora, 2.0, spec)
    assert_close(dx, ref[0], "dx")
    assert set(grads) == set(paths)
    for j, p in enumerate(paths):
        assert_close(grads[p][0], ref[1 + 2 * j], p + ".lora_a")
        assert_close(grads[p][1], ref[2 + 2 * j], p + ".lora_b")
    return keys


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
    assert_block_backward(w, lora, spec, t, d)


def block_weights(spec, d, f, bias=False):
    hq, hkv, hd = spec.n_heads * spec.head_dim, spec.n_kv_heads * spec.head_dim, spec.head_dim
    norm = lambda n: (0.1 * R(n)) if spec.norm_offset else (1 + 0.1 * R(n))
    w = {"input_layernorm": norm(d), "post_attention_layernorm": norm(d), "self_attn.o_proj": quantized(d, hq),
         "mlp.down_proj": quantized(d, f)}
    if spec.merged:
        w.update({"self_attn.qkv_proj": quantized(hq + 2 * hkv, d, bias), "mlp.gate_up_proj": quantized(2 * f, d)})
    else:
        w.update({"self_attn.q_proj": quantized(hq, d, bias), "self_attn.k_proj": quantized(hkv, d, bias),
                  "self_attn.v_proj": quantized(hkv, d, bias), "mlp.gate_proj": quantized(f, d),
                  "mlp.up_proj": quantized(f, d)})
    if spec.qk_norm:
        w.update({"self_attn.q_norm": norm(hd), "self_attn.k_norm": norm(hd)})
    if spec.sandwich:
        w.update({"pre_feedforward_layernorm": norm(d), "post_feedforward_layernorm": norm(d)})
    return w


GEMMA = dict(qk_norm=True, norm_offset=1.0, sandwich=True, activation="gelu_tanh", scale=24 ** -0.5)


@pytest.mark.parametrize("variant,chunk", [
    # Gemma 3 local layer: 1 + w norms, sandwich norms, GELU, q/k norms, its own scale, a window of 4 < T = 11;
    # with a 256 chunk the reference runs MLX's single-kernel attention with the window's boolean mask
    (dict(GEMMA, window=4), 4), (dict(GEMMA, window=4), 256), (dict(GEMMA), 4),
    (dict(merged=True, rope="partial-longrope"), 4),  # Phi-3 / Phi-4-mini
    (dict(rope=None), 4),  # SmolLM3's NoPE layers
    (dict(window=3), 5),  # Mistral
])
def test_block_variants(variant, chunk):
    mx.random.seed(4)
    d, f, hq, hkv, hd, t = 64, 96, 4, 2, 16, 11
    variant = dict(variant)
    rope = variant.pop("rope", "full")
    rope = {"full": rope_spec(hd, 10000.0, False), None: None,
            "partial-longrope": rope_spec(12, 10000.0, False, LONGROPE, 256, 64)}[rope]
    spec = BlockSpec(hq, hkv, hd, 1e-6, rope, compute=Compute(attn_chunk=chunk, mlp_chunk=4), **variant)
    w = block_weights(spec, d, f)
    shapes = {"self_attn.o_proj": (hq * hd, d), "mlp.down_proj": (f, d)}
    shapes.update({"self_attn.qkv_proj": (d, (hq + 2 * hkv) * hd), "mlp.gate_up_proj": (d, 2 * f)} if spec.merged else
                  {"self_attn.q_proj": (d, hq * hd), "self_attn.k_proj": (d, hkv * hd),
                   "self_attn.v_proj": (d, hkv * hd), "mlp.up_proj": (d, f)})
    lora = {p: (R(i, 3) * 0.1, R(3, o) * 0.1) for p, (i, o) in shapes.items()}
    saved = assert_block_backward(w, lora, spec, t, d)
    assert ("r" in saved) == spec.sandwich
