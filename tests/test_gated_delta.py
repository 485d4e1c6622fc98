"""The gated delta rule (ops/gated_delta.py) and Qwen3.5's two blocks (ops/block.py) against mlx-lm's own code:
the rule against `gated_delta_ops` (the per-token loop mlx-lm trains with) under MLX autodiff, the blocks against
mlx-lm's Qwen3.5 DecoderLayer with LoRA on every projection, under autodiff."""
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models.gated_delta import gated_delta_ops
from mlx_lm.models.qwen3_5 import DecoderLayer, TextModelArgs
from mlx_lm.tuner.lora import LoRALinear

from helpers import EXACT, assert_close, rel_err
from mesp_mlx.ops.block import (DELTA_PROJECTIONS, PROJECTIONS, BlockSpec, block_backward, block_forward,
                                block_recompute, new_cache)
from mesp_mlx.ops.gated_delta import (DeltaSpec, causal_conv, causal_conv_backward, gated_delta_backward,
                                      gated_delta_forward, unit_lower_inverse)
from mesp_mlx.ops.linear import Compute, Frozen
from mesp_mlx.ops.rope import rope_spec

R = lambda *s: mx.random.normal(s)


def rule_inputs(b, t, hk, hv, dk, dv, dtype=mx.float32, seed=0):
    mx.random.seed(seed)
    q, k = R(b, t, hk, dk), R(b, t, hk, dk)
    q = q / mx.linalg.norm(q, axis=-1, keepdims=True) * dk ** -0.5
    k = k / mx.linalg.norm(k, axis=-1, keepdims=True)
    v, log_g, beta = R(b, t, hv, dv), -mx.random.uniform(0.01, 2.0, (b, t, hv)), mx.random.uniform(0, 1, (b, t, hv))
    return [x.astype(dtype) for x in (q, k, v, log_g, beta)]


def reference(q, k, v, log_g, beta):
    """mlx-lm's loop, from a zero state of the inputs' dtype (its default state is fp32)."""
    state = mx.zeros((q.shape[0], v.shape[2], v.shape[3], q.shape[3]), q.dtype)
    return gated_delta_ops(q, k, v, mx.exp(log_g), beta, state)[0]


# T not a multiple of C, T < C, C = 1, GQA 2 and 1, Dk != Dv
@pytest.mark.parametrize("b,t,hk,hv,dk,dv,chunk", [(2, 37, 2, 4, 16, 8, 8), (1, 64, 2, 2, 16, 16, 16),
                                                   (1, 5, 1, 2, 8, 8, 64), (2, 50, 2, 4, 16, 8, 64),
                                                   (1, 6, 1, 1, 8, 4, 1)])
def test_rule_against_mlx_lm(b, t, hk, hv, dk, dv, chunk):
    inputs = rule_inputs(b, t, hk, hv, dk, dv)
    y, _, states = gated_delta_forward(*inputs, chunk, save=True)
    assert states.shape == (b, hv, -(-t // min(chunk, t)), dv, dk)
    assert_close(y, reference(*inputs), "y")
    dy = R(*y.shape)
    ref = mx.vjp(reference, inputs, [dy])[1]
    for name, mine, theirs in zip(("dq", "dk", "dv", "dlog_g", "dbeta"), gated_delta_backward(dy, *inputs, states, chunk), ref):
        assert_close(mine, theirs, name)


def test_rule_fp64():
    """In float64 both sides agree to MLX's float64 exp, which is only fp32-accurate (~6e-8 relative, measured
    against numpy): 1e-6 bounds it with room, and is 100x under what fp32 rounding would give."""
    inputs = rule_inputs(2, 29, 1, 2, 8, 4, mx.float64, seed=1)
    with mx.stream(mx.cpu):
        y, _, states = gated_delta_forward(*inputs, 8, save=True)
        assert rel_err(y, reference(*inputs)) < 1e-6
        dy = R(*y.shape).astype(mx.float64)
        ref = mx.vjp(reference, inputs, [dy])[1]
        for mine, theirs in zip(gated_delta_backward(dy, *inputs, states, 8), ref):
            assert mine.dtype == mx.float64 and rel_err(mine, theirs) < 1e-6


@pytest.mark.parametrize("chunk", [4, 8, 64])
def test_rule_packed_rows(chunk):
    """Packed rows restart from a zero state: each row equals the rule run on it alone, values and gradients."""
    b, t = 2, 29
    inputs = rule_inputs(b, t, 1, 2, 8, 4, seed=2)
    seg = np.zeros((b, t), int)
    seg[0, 7:], seg[0, 20:], seg[1, 3:], seg[1, 8:], seg[1, 9:] = 1, 2, 1, 2, 3  # a 1-token row too
    starts = np.concatenate([np.ones((b, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)

    def by_rows(*xs):
        rows = []
        for r in range(b):
            parts = []
            for s in np.unique(seg[r]):
                i = np.nonzero(seg[r] == s)[0]
                parts.append(reference(*(x[r:r + 1, int(i[0]):int(i[-1]) + 1] for x in xs)))
            rows.append(mx.concatenate(parts, axis=1))
        return mx.concatenate(rows, axis=0)

    y, _, states = gated_delta_forward(*inputs, chunk, starts=mx.array(starts), save=True)
    assert_close(y, by_rows(*inputs), "y")
    dy = R(*y.shape)
    ref = mx.vjp(by_rows, inputs, [dy])[1]
    for mine, theirs in zip(gated_delta_backward(dy, *inputs, states, chunk, starts=mx.array(starts)), ref):
        assert_close(mine, theirs)


def test_rule_carries_state():
    """Generation: the rule over 11 tokens equals 7 then 4 (and one at a time) from the carried state."""
    inputs = rule_inputs(2, 11, 2, 4, 8, 8, seed=3)
    whole, final = gated_delta_forward(*inputs, 4)
    y1, s = gated_delta_forward(*(x[:, :7] for x in inputs), 4)
    y2, s = gated_delta_forward(*(x[:, 7:] for x in inputs), 4, state=s)
    assert_close(mx.concatenate([y1, y2], axis=1), whole)
    assert_close(s, final)


def test_unit_lower_inverse():
    """(I + A)^-1 by the Neumann product, against float64 numpy, for c = 64 with entries as large as a chunk's."""
    a = np.tril(np.random.default_rng(0).uniform(-1, 1, (3, 64, 64)), -1)
    exact = np.linalg.inv(np.eye(64) + a)
    mine = np.array(unit_lower_inverse(mx.array(a.astype(np.float32))))
    assert np.abs(mine - exact).max() / np.abs(exact).max() < 1e-5


def test_causal_conv_packed_and_backward():
    mx.random.seed(5)
    x, w = R(2, 9, 6), R(6, 4)
    positions = mx.array([[0, 1, 2, 0, 1, 2, 3, 4, 0], list(range(9))])
    out = causal_conv(x, w, positions)
    # row 0's third row (token 8) sees only itself; its second row's first token only itself
    assert_close(out[0, 8], x[0, 8] * w[:, 3])
    assert_close(out[0, 3], x[0, 3] * w[:, 3])
    assert_close(out[1, 3], sum(x[1, s] * w[:, s] for s in range(4)))
    dout = R(*out.shape)
    ref = mx.vjp(lambda x: causal_conv(x, w, positions), [x], [dout])[1][0]
    assert_close(causal_conv_backward(dout, w, positions), ref)


# Qwen3.5's blocks against mlx-lm's DecoderLayer

TINY = dict(model_type="qwen3_5_text", hidden_size=48, intermediate_size=80, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6, vocab_size=100,
            linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=8,
            linear_conv_kernel_dim=4, full_attention_interval=4, tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})


def mlx_lm_layer(layer_idx, seed):
    args = TextModelArgs.from_dict(TINY)
    mx.random.seed(seed)
    layer = DecoderLayer(args, layer_idx)
    # random weights everywhere (norms near 1, the decay's A_log and dt_bias as checkpoints hold them)
    layer.update({k: v for k, v in _randomised(layer)})
    return args, layer


def _randomised(layer):
    out = []
    for name, p in tree_flatten(layer.parameters()):
        if name.endswith("norm.weight"):
            p = 1 + 0.1 * R(*p.shape)
        elif name.endswith("A_log"):
            p = mx.log(mx.random.uniform(1, 16, p.shape))
        elif name.endswith("dt_bias"):
            p = mx.random.uniform(-1, 1, p.shape)
        else:
            p = 0.2 * R(*p.shape)
        out.append((name, p))
    return tree_unflatten(out).items()


def our_weights(layer):
    w = {}
    for name, p in tree_flatten(layer.parameters()):
        module, leaf = name.rsplit(".", 1)
        if module.endswith("conv1d"):
            w[module] = p[:, :, 0]
        elif leaf in ("A_log", "dt_bias"):
            w[name] = p
        elif module.endswith("norm"):
            w[module] = p
        else:
            w[module] = Frozen(p)
    return w


def spec_of(args, linear, chunk=4, **compute):
    compute = Compute(**dict(dict(attn_chunk=4, mlp_chunk=4), **compute))
    if linear:
        return BlockSpec(1, 1, 1, args.rms_norm_eps, None, compute=compute,
                         delta=DeltaSpec(args.linear_num_key_heads, args.linear_num_value_heads,
                                         args.linear_key_head_dim, args.linear_value_head_dim,
                                         args.linear_conv_kernel_dim, chunk))
    rope = rope_spec(int(args.head_dim * args.partial_rotary_factor), args.rope_theta, False)
    return BlockSpec(args.num_attention_heads, args.num_key_value_heads, args.head_dim, args.rms_norm_eps, rope,
                     qk_norm=True, compute=compute, output_gate=True)


def vjp_layer(layer, x, dy, mask):
    """(dx, {module path.lora_a / lora_b: gradient}) of mlx-lm's layer under MLX autodiff."""
    names, values = zip(*tree_flatten(layer.trainable_parameters()))

    def fn(x, *flat):
        layer.update(tree_unflatten(list(zip(names, flat))))
        return layer(x, mask=mask)

    grads = mx.vjp(fn, [x, *values], [dy])[1]
    layer.update(tree_unflatten(list(zip(names, values))))
    return grads[0], dict(zip(names, grads[1:]))


def tiled_columns(args):
    """perm with tiled[j] = grouped[perm[j]] over out_proj's Hv Dv inputs: llama.cpp's value head j is the grouped
    head (j % Hk) r + j // Hk (r = Hv / Hk)."""
    hk, hv, dv = args.linear_num_key_heads, args.linear_num_value_heads, args.linear_value_head_dim
    heads = np.arange(hv).reshape(hk, hv // hk).T.reshape(-1)
    return mx.array((heads[:, None] * dv + np.arange(dv)).reshape(-1))


@pytest.mark.parametrize("linear,chunk,t,tiled,compute", [
    (True, 4, 11, False, {}), (True, 64, 11, False, {}), (True, 3, 7, False, {}), (True, 4, 11, True, {}),
    (False, 4, 11, False, {}), (True, 4, 11, False, dict(mlp_chunk=2)), (True, 4, 11, False, dict(sync="block"))])
def test_qwen35_block_against_mlx_lm(linear, chunk, t, tiled, compute):
    """Our block's forward equals mlx-lm's DecoderLayer; our recompute + backward give its autodiff gradients
    (dx and every LoRA A, B) with LoRA (rank 3) on every projection of the block. tiled: out_proj's columns (and
    its LoRA A's rows) in llama.cpp's tiled value-head order with DeltaSpec.out_tiled, which must compute the same
    block (out_proj's A gradient in tiled order too). The conv, SiLU, norms and input projections run in token
    blocks of mlp_chunk tokens where chunks are evaluated one at a time (the CPU's default sync): 4 (the conv reads
    3 tokens before each block), 2 (fewer than the conv's 3 before the second block), or one graph (sync=block)."""
    args, layer = mlx_lm_layer(0 if linear else 3, seed=7)
    spec = spec_of(args, linear, chunk, **compute)
    w = our_weights(layer)
    assert args.linear_num_key_heads < args.linear_num_value_heads  # else tiled is grouped
    paths = DELTA_PROJECTIONS if linear else PROJECTIONS
    assert set(spec.projections) == set(paths)
    lora = {}
    for p in paths:
        base = w[p].weight
        lora[p] = (0.1 * R(base.shape[1], 3), 0.1 * R(3, base.shape[0]))
    modules = []
    for p in paths:
        parent, name = p.rsplit(".", 1)
        mod = LoRALinear.from_base(getattr(getattr(layer, parent), name), r=3, scale=2.0)
        mod.lora_a, mod.lora_b = lora[p]
        modules.append((p, mod))
    layer.update_modules(tree_unflatten(modules))
    layer.freeze()
    layer.unfreeze(keys=["lora_a", "lora_b"])
    x, dy = R(2, t, args.hidden_size), R(2, t, args.hidden_size)
    dx_ref, g_ref = vjp_layer(layer, x, dy, None if linear else "causal")
    if tiled:
        from dataclasses import replace
        perm, out = tiled_columns(args), "linear_attn.out_proj"
        spec = replace(spec, delta=replace(spec.delta, out_tiled=True))
        w = dict(w, **{out: Frozen(w[out].weight[:, perm])})
        lora = dict(lora, **{out: (lora[out][0][perm], lora[out][1])})
        g_ref = dict(g_ref, **{out + ".lora_a": g_ref[out + ".lora_a"][perm]})
    assert_close(block_forward(x, w, lora, 2.0, spec), layer(x, mask=None if linear else "causal"), "forward")

    saved = block_recompute(x, w, lora, 2.0, spec)
    dx, grads = block_backward(dy, x, saved, w, lora, 2.0, spec)
    assert_close(dx, dx_ref, "dx")
    for p in paths:
        assert_close(grads[p][0], g_ref[p + ".lora_a"], p + ".lora_a")
        assert_close(grads[p][1], g_ref[p + ".lora_b"], p + ".lora_b")


def test_qwen35_linear_block_generation_cache():
    """Generation through a DeltaCache: a left-padded prompt read in two blocks, then tokens one at a time, gives
    each real token the output of the plain forward over that row's real tokens alone."""
    args, layer = mlx_lm_layer(0, seed=8)
    spec, w = spec_of(args, True, 4), our_weights(layer)
    x = R(2, 9, args.hidden_size)
    pad = 3  # row 1 has 3 padding columns first
    valid = mx.array([[True] * 9, [False] * pad + [True] * (9 - pad)])
    cache = new_cache(spec, 9)
    outs = [block_forward(x[:, :5], w, {}, 2.0, spec, cache=cache, valid=valid[:, :5])]
    for t in range(5, 9):
        outs.append(block_forward(x[:, t:t + 1], w, {}, 2.0, spec, cache=cache, valid=valid[:, :t + 1]))
    got = mx.concatenate(outs, axis=1)
    assert_close(got[0], block_forward(x[:1], w, {}, 2.0, spec)[0])
    assert_close(got[1, pad:], block_forward(x[1:, pad:], w, {}, 2.0, spec)[0])


def test_rule_by_head_groups():
    """Groups of value heads (each evaluated alone, bounding the temporaries) give the very same results."""
    inputs = rule_inputs(2, 19, 2, 8, 8, 4, seed=4)
    state = R(2, 8, 4, 8)
    y, s, st = gated_delta_forward(*inputs, 4, state=state, save=True)
    yg, sg, stg = gated_delta_forward(*inputs, 4, state=state, save=True, group=4)
    for a, b in ((y, yg), (s, sg), (st, stg)):
        assert mx.array_equal(a, b)
    dy = R(*y.shape)
    for a, b in zip(gated_delta_backward(dy, *inputs, st, 4), gated_delta_backward(dy, *inputs, st, 4, group=4)):
        assert rel_err(b, a) < EXACT
