"""One transformer block, forward and structured backward, for every supported family through the switches of
`BlockSpec` (Llama / Mistral / SmolLM3 / Qwen2 / Qwen3 / Phi-3 / Gemma 3 / Qwen3.5).

    z1 = N_in(x);  q,k,v = LoRA-linears(z1) (+bias) [Phi-3: one merged qkv_proj, split];
    [Qwen3, Gemma 3: q,k = N_q(q), N_k(k) per head];  q,k = RoPE(q), RoPE(k) [not on SmolLM3's NoPE layers];
    o = attention(q, k, v) [causal; Gemma 3's local layers, Mistral: over a sliding window];  r = o_proj(o)
    a = x + r                  [Gemma 3 ("sandwich"): a = x + N_post_attn(r)]
    z2 = N_mlp(a);  g, u = gate(z2), up(z2) [Phi-3: one merged gate_up_proj, split];  m = down(f(g) * u)
    y = a + m                  [Gemma 3: y = a + N_post_ff(m)]
N are RMSNorms (Gemma: multiplier 1 + w), f is SiLU or GELU(tanh). N_mlp is post_attention_layernorm in the Llama
naming and pre_feedforward_layernorm in Gemma's, where post_attention_layernorm normalises the attention output.

`block_forward` returns y; `block_recompute` returns instead what the backward needs, hand-picked, as one
`BlockSaved` record: z1, z2 (inputs of the LoRA projections), the roped q and k, v, the attention output o and its
per-query lse, the residual a, and the MLP's g and u; with q/k norms the pre-norm q and k; with sandwich norms r (the
post-attention norm's input). Per token that is 4d + (Hq + 2 Hkv) D + Hq + 2f floats [+ (Hq + Hkv) D with q/k
norms, + d with sandwich norms; - 2f with Compute.recompute_mlp, which redoes g and u per token block in the
backward] (`BlockSaved.floats_per_token`, which the memory model uses); nothing of size
T x T (attention recomputes its probabilities per query block); f(g)*u is recomputed, and with sandwich norms so is m
(one more down-projection product per MLP token block, instead of keeping B*T*d). The block input x is the
checkpoint and is owned by the caller.
Packed rows (--pack) pass `segments` (B, T), the packed row of each token, and `positions` (B, T), each token's
position in its row: attention then stays inside a row and RoPE restarts at each row's start (None: one row).

Qwen3.5 has two kinds of block. Its full-attention blocks are the above with the output gate (`output_gate`):
q_proj gives per head [q | gate] and o is multiplied by sigmoid(gate) before o_proj (the gate is kept for the
backward). Its linear-attention blocks (`delta`) replace the attention by the gated delta rule:

    z1 = N_in(x);  qkv, zg, b, a = in_proj_qkv / _z / _b / _a (z1);  c = causal depthwise conv(qkv)
    q, k, v = split(silu(c)), q = l2norm(q) Dk^-1/2, k = l2norm(k);  beta = sigmoid(b), log g = -exp(A_log)
    softplus(a + dt_bias);  y = rule(q, k, v, log g, beta) (ops/gated_delta.py);  r = out_proj(N_g(y) silu(zg))

with N_g an RMSNorm per value head; the MLP half is shared. Its recompute keeps z1, qkv, zg, b, a, y (fp32) and the
rule's states at the chunk boundaries (`BlockSaved`); c, q, k, v, the gates and N_g's output are recomputed.

Where chunks are evaluated one at a time (the CPU), the work that is per token besides the MLP runs a token block
(mlp_chunk tokens, fewer in the conv's backward: `token_chunk`) at a time too, each block evaluated before the next,
so its T x width temporaries exist for one block: the backward of the mixer's output projection (with the output
gate, and N_g) and of its input projections (with RoPE, the q/k norms, or the conv, SiLU and l2 norms), with the
MLP's compute (row-blocked weights under Compute.mlp_rows); and the forward's conv, SiLU and norms and its output
projection. The conv of a token block reads the K - 1 inputs before it; its backward, the K - 1 output gradients
after it.

Generation passes a `KVCache` (the roped keys and values of the tokens before, per block) with `positions` and
`valid` (B, L): which of the L keys so far are real tokens (left padding is not). The block's new tokens then attend
to the cache and to themselves, causally; a padding column attends to itself only, so it stays finite and never
reaches a real token.
"""
from dataclasses import dataclass, fields
from typing import Optional

import mlx.core as mx

from .attention import attention_backward, attention_forward, visible
from .gated_delta import (DeltaCache, DeltaSpec, causal_conv, causal_conv_backward, gated_delta_backward,
                          gated_delta_forward, l2norm, l2norm_backward, log_decay, log_decay_backward, silu,
                          silu_backward)
from .keys import fold
from .linear import DEFAULT, TILE_BYTES, Compute
from .lora_linear import lora_group_backward, lora_group_forward
from .mlp import gated_act_and_backward, gated_forward
from .rmsnorm import rmsnorm_backward, rmsnorm_forward
from .rope import Rope, rope_backward, rope_forward, segment_positions

# the adaptable projections, in the two layouts (mlx-lm's module paths, so adapters interchange)
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
MERGED_PROJECTIONS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
# fp32 arrays of the conv's width alive at once in a token block of a linear-attention block's backward chain (the
# l2 norms', SiLU's and conv's backward and the input projections' with it): measured on the CPU at Qwen3.5-0.8B's
# shape, one block of 512 tokens held 198 MB above what was live before it, ~16 arrays of 512 x 6144 floats
CHAIN_ARRAYS = 16
# Qwen3.5's linear-attention blocks (its full-attention blocks have PROJECTIONS, q_proj twice as wide)
DELTA_INPUTS = ("linear_attn.in_proj_qkv", "linear_attn.in_proj_z", "linear_attn.in_proj_b", "linear_attn.in_proj_a")
DELTA_PROJECTIONS = DELTA_INPUTS + ("linear_attn.out_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@dataclass(frozen=True)
class BlockSpec:
    n_heads: int
    n_kv_heads: int
    head_dim: int
    eps: float
    rope: Optional[Rope]  # None: no position rotation in this block (SmolLM3's NoPE layers)
    qk_norm: bool = False
    compute: Compute = DEFAULT  # dtype, matmul path, attention and MLP chunk sizes
    sdpa: bool = True  # MLX's single-kernel attention where only the output is needed (save=False)
    norm_offset: float = 0.0  # Gemma: every norm multiplies by 1 + w
    sandwich: bool = False  # Gemma: norms on the attention and MLP outputs too, before the residual adds
    activation: str = "silu"  # the MLP gate: silu or gelu_tanh
    window: Optional[int] = None  # sliding-window attention: each query sees its `window` latest keys
    scale: Optional[float] = None  # attention scale; default head_dim ** -0.5 (Gemma: query_pre_attn_scalar)
    merged: bool = False  # Phi-3: merged qkv_proj and gate_up_proj
    output_gate: bool = False  # Qwen3.5: q_proj gives per head [q | gate]; o times sigmoid(gate) before o_proj
    delta: Optional[DeltaSpec] = None  # Qwen3.5's linear layers: the mixer is the gated delta rule, not attention

    @property
    def attn_scale(self):
        return self.head_dim ** -0.5 if self.scale is None else self.scale

    @property
    def mlp_chunk(self):
        return self.compute.mlp_chunk

    @property
    def mlp_norm(self):
        return "pre_feedforward_layernorm" if self.sandwich else "post_attention_layernorm"

    @property
    def projections(self):
        if self.delta is not None:
            return DELTA_PROJECTIONS
        return MERGED_PROJECTIONS if self.merged else PROJECTIONS


@dataclass
class BlockSaved:
    """What `block_recompute` keeps for `block_backward` (module docstring): the one list of the saved activations,
    for the forward that fills it, the backward that consumes it (`take` drops each item once used, so its memory
    is freed as the backward goes) and the memory model (`floats_per_token`). None: not kept in this configuration."""

    z1: mx.array
    a: mx.array
    z2: mx.array
    q: Optional[mx.array] = None  # attention blocks
    k: Optional[mx.array] = None
    v: Optional[mx.array] = None
    o: Optional[mx.array] = None
    lse: Optional[mx.array] = None
    gate: Optional[mx.array] = None  # with the output gate
    qkv: Optional[mx.array] = None  # linear-attention blocks: the conv's input (in_proj_qkv's output),
    zg: Optional[mx.array] = None  # the output gate's input, the beta and decay projections' outputs,
    b_in: Optional[mx.array] = None
    a_in: Optional[mx.array] = None
    y: Optional[mx.array] = None  # the rule's output (fp32) and its states at the chunk boundaries
    states: Optional[mx.array] = None
    g: Optional[mx.array] = None  # without recompute_mlp
    u: Optional[mx.array] = None
    q_pre: Optional[mx.array] = None  # with q/k norms
    k_pre: Optional[mx.array] = None
    r: Optional[mx.array] = None  # with sandwich norms

    def take(self, name):
        value = getattr(self, name)
        setattr(self, name, None)
        return value

    def arrays(self):
        """The items kept, by name (what to evaluate)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    @staticmethod
    def floats_per_token(d, f, hq, hkv, head_dim, recompute_mlp=False, qk_norm=False, sandwich=False,
                         output_gate=False):
        """Floats kept per token (one batch row's sequence position) by an attention block of these dimensions:
        z1, a, z2 (d each), o (Hq D, which is d in most families), q, k, v, the per-head lse, and the optional
        items."""
        return (3 * d + hq * head_dim + (hq + 2 * hkv) * head_dim + hq + (0 if recompute_mlp else 2 * f)
                + ((hq + hkv) * head_dim if qk_norm else 0) + (d if sandwich else 0)
                + (hq * head_dim if output_gate else 0))

    @staticmethod
    def delta_floats_per_token(d, f, delta, recompute_mlp=False):
        """The same for a linear-attention block: z1, a, z2, c, zg, b, a_in in the compute dtype (y, fp32, and the
        states at the chunk boundaries are counted apart)."""
        return (3 * d + delta.conv_dim + delta.n_v_heads * delta.v_dim + 2 * delta.n_v_heads
                + (0 if recompute_mlp else 2 * f))


class KVCache:
    """One block's roped keys and values (B, Hkv, L, D) of the tokens generated or read so far, in a buffer grown
    `step` columns at a time (a copy per `step` tokens, not per token); `length` columns are filled."""

    def __init__(self, step=256):
        self.k = self.v = None
        self.length, self.step = 0, step

    def extend(self, k, v):
        """Appends this call's keys and values -> all of them so far."""
        b, h, t, _ = k.shape
        end = self.length + t
        if self.k is None or end > self.k.shape[2]:
            grow = -(-(end - self.length) // self.step) * self.step
            new_k = mx.zeros((b, h, self.length + grow, k.shape[3]), k.dtype)
            new_v = mx.zeros((b, h, self.length + grow, v.shape[3]), v.dtype)
            if self.k is not None:
                new_k[:, :, :self.length], new_v[:, :, :self.length] = self.keys(), self.values()
            self.k, self.v = new_k, new_v
        self.k[:, :, self.length:end], self.v[:, :, self.length:end] = k, v
        self.length = end
        return self.keys(), self.values()

    def keys(self):
        return self.k[:, :, :self.length]

    def values(self):
        return self.v[:, :, :self.length]

    def select(self, rows):
        """Keeps only the batch rows `rows` (an index array): rows that finished generating leave the batch."""
        self.k, self.v = self.k[rows], self.v[rows]

    def arrays(self):
        return [a for a in (self.k, self.v) if a is not None]

    def mask(self, valid, t, window=None):
        """(B, 1, t, L) booleans: which keys each of the t newest tokens attends to."""
        n = self.length
        qcol, kcol = mx.arange(n - t, n)[:, None], mx.arange(n)[None]
        mask = kcol <= qcol
        if window is not None:
            mask = mask & (qcol - kcol < window)
        return mask & (valid[:, None, None, :n] | (kcol == qcol))


def _lora(lora, name):
    return lora.get(name, (None, None))


def block_dropout(dropout, i):
    """A step's LoRA dropout (p, key) -> block i's own (p, key), or None without dropout (an int seed is a key)."""
    return None if dropout is None or not dropout[0] else (dropout[0], fold(dropout[1], i))


def _dropout_masks(dropout, lora, batch, length):
    """keep(name, inp, t0) -> the LoRA dropout mask of projection `name` on its input rows t0.. (None: no dropout).
    dropout = (p, key): each projection's mask is drawn from its own key over the whole (B, T, in) input and
    sliced, so the forward, the recompute and the backward, chunked by tokens or not, see the very same mask."""
    if dropout is None or not dropout[0]:
        return lambda name, inp, t0=0: None
    p, key = dropout
    names = PROJECTIONS + MERGED_PROJECTIONS + DELTA_PROJECTIONS[:5]

    def keep(name, inp, t0=0):
        if name not in lora:
            return None
        mask = mx.random.bernoulli(1 - p, (batch, length, inp.shape[-1]), key=fold(key, names.index(name)))[:, t0:t0 + inp.shape[1]]
        return mask.astype(inp.dtype) / (1 - p)
    return keep


def packing(segments):
    """The block keyword arguments of a packed batch (its segment ids and per-token positions); {} unpacked."""
    return {} if segments is None else dict(segments=segments, positions=segment_positions(segments))


def _heads(x, n):
    b, t, _ = x.shape
    return x.reshape(b, t, n, -1).transpose(0, 2, 1, 3)


def _merge(x):
    b, h, t, d = x.shape
    return x.transpose(0, 2, 1, 3).reshape(b, t, h * d)


def _by_tokens(fn, t, chunk, sync=None):
    """fn(t0, t1) over blocks of the sequence axis, each block's result passed to `sync` (if given) as it is made;
    the results concatenated (arrays, or tuples of arrays concatenated item by item); one call when t <= chunk."""
    parts = []
    for t0 in range(0, t, chunk):
        parts.append(fn(t0, min(t, t0 + chunk)))
        if sync is not None:
            sync(parts[-1])
    if len(parts) == 1:
        return parts[0]
    if isinstance(parts[0], tuple):
        return tuple(mx.concatenate(p, axis=1) for p in zip(*parts))
    return mx.concatenate(parts, axis=1)


def _sync(spec):
    """mx.eval where chunks are evaluated one at a time (the CPU), else None: the `sync` of `_by_tokens`."""
    return mx.eval if spec.compute.sync_chunks else None


def _projector(w, lora, scale, spec, keep, compute=None):
    """projs(names, inp, t0=0) -> [y]: the LoRA linears `names` applied to the same input rows t0.. (one shared
    down-projection product for the adapted ones, ops/lora_linear.lora_group_forward); compute: the products'
    (default spec.compute; the MLP's token blocks pass `Compute.for_mlp`)."""
    compute = compute or spec.compute
    return lambda names, inp, t0=0: lora_group_forward(inp, [w[n] for n in names], [_lora(lora, n) for n in names],
                                                       scale, compute, [keep(n, inp, t0) for n in names])


def _qkv(z1, projs, spec):
    """q, k, v in (B, H, T, D) layout, from three projections or one merged one (q rows, then k, then v), and the
    output gate's input (B, T, Hq D) when q_proj gives per head [q | gate] (else None)."""
    gate = None
    if spec.merged:
        nq, nk = spec.n_heads * spec.head_dim, spec.n_kv_heads * spec.head_dim
        q, k, v = mx.split(projs(("self_attn.qkv_proj",), z1)[0], [nq, nq + nk], axis=-1)
    else:
        q, k, v = projs(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), z1)
    if spec.output_gate:
        b, t, _ = q.shape
        q, gate = mx.split(q.reshape(b, t, spec.n_heads, 2 * spec.head_dim), 2, axis=-1)
        q, gate = q.reshape(b, t, -1), gate.reshape(b, t, -1)
    return _heads(q, spec.n_heads), _heads(k, spec.n_kv_heads), _heads(v, spec.n_kv_heads), gate


def _gate_up(z, projs, spec, t0=0):
    if spec.merged:  # gate rows first, then up
        return mx.split(projs(("mlp.gate_up_proj",), z, t0)[0], 2, axis=-1)
    return projs(("mlp.gate_proj", "mlp.up_proj"), z, t0)


def _attention_half(x, w, lora, scale, spec, keep, save, segments, positions, cache=None, valid=None):
    """The block up to the MLP's input: (z1, q_pre, k_pre, q, k, v, o, lse, gate, r, a, z2), lse None unless saved.
    With a cache (generation): k and v returned are those of the new tokens, attention reads the whole cache."""
    norm = lambda inp, name: rmsnorm_forward(inp, w[name], spec.eps, spec.norm_offset)
    projs = _projector(w, lora, scale, spec, keep)
    z1 = norm(x, "input_layernorm")
    q, k, v, gate = _qkv(z1, projs, spec)
    q_pre, k_pre = q, k
    if spec.qk_norm:
        q, k = norm(q, "self_attn.q_norm"), norm(k, "self_attn.k_norm")
    if spec.rope is not None:
        q, k = rope_forward(q, spec.rope, positions), rope_forward(k, spec.rope, positions)
    t, lse = q.shape[2], None
    chunk = spec.compute.query_block(q.shape[0], spec.n_heads, t)
    if cache is not None:
        keys, values = cache.extend(k, v)
        o = mx.fast.scaled_dot_product_attention(q, keys, values, scale=spec.attn_scale,
                                                 mask=cache.mask(valid, t, spec.window))
    elif spec.sdpa and not save and (t <= chunk or mx.default_device() != mx.cpu):
        # MLX's CPU fallback materialises all T x T scores; past one query block the chunked form is used there
        mask = "causal" if spec.window is None or t <= spec.window else visible(0, t, 0, t, spec.window)
        if segments is not None:  # packed rows: causal and within one row, a boolean mask per batch row
            mask = visible(0, t, 0, t, spec.window) & (segments[:, None, :, None] == segments[:, None, None, :])
        o = mx.fast.scaled_dot_product_attention(q, k, v, scale=spec.attn_scale, mask=mask)
    else:
        o, lse = attention_forward(q, k, v, spec.attn_scale, chunk, spec.compute.sync_chunks,
                                   spec.window, segments, logsumexp=spec.compute.compiled)
    o = _merge(o)
    r = projs(("self_attn.o_proj",), o if gate is None else o * mx.sigmoid(gate))[0]
    a = x + (norm(r, "post_attention_layernorm") if spec.sandwich else r)
    return z1, q_pre, k_pre, q, k, v, o, lse, gate, r, a, norm(a, spec.mlp_norm)


def _delta_inputs(c, spec):
    """The conv's output -> the rule's q (l2-normalised, times Dk^-1/2), k (l2-normalised), v, per head."""
    ds = spec.delta
    b, t, _ = c.shape
    h = silu(c)
    nk = ds.n_k_heads * ds.k_dim
    q, k, v = mx.split(h, [nk, 2 * nk], axis=-1)
    q, k = q.reshape(b, t, ds.n_k_heads, ds.k_dim), k.reshape(b, t, ds.n_k_heads, ds.k_dim)
    return l2norm(q) * ds.k_dim ** -0.5, l2norm(k), v.reshape(b, t, ds.n_v_heads, ds.v_dim), q, k


def _gated_out(y, zg, w, spec):
    """The gated RMSNorm: RMSNorm(y) per value head times silu(z) -> (B, T, Hv Dv) (and the gate's backward)."""
    ds = spec.delta
    b, t = zg.shape[:2]
    n = rmsnorm_forward(y, w["linear_attn.norm"], spec.eps).astype(zg.dtype)
    act, back = gated_act_and_backward("silu", zg.reshape(b, t, ds.n_v_heads, ds.v_dim), n)
    return act.reshape(b, t, -1), back


def _tile_heads(o, ds, inverse=False):
    """(B, T, Hv Dv) in grouped value-head order -> tiled (inverse: tiled -> grouped) when out_proj reads tiled
    heads (DeltaSpec.out_tiled); else o as it is. Grouped is (Hk, r) heads, tiled (r, Hk): one swap of the two."""
    if not ds.out_tiled:
        return o
    b, t, _ = o.shape
    hk, r = ds.n_k_heads, ds.n_v_heads // ds.n_k_heads
    split = (r, hk) if inverse else (hk, r)
    return o.reshape(b, t, *split, ds.v_dim).swapaxes(2, 3).reshape(b, t, -1)


def _delta_half(x, w, lora, scale, spec, keep, save, positions, cache=None, valid=None):
    """A linear-attention block up to the MLP's input: (z1, qkv, zg, b_in, a_in, y, states, r, a, z2), states None
    unless saved. With a `DeltaCache` (generation) the conv and the rule start from the cache's state and leave
    theirs in it; tokens not `valid` (left padding) change neither."""
    ds = spec.delta
    projs = _projector(w, lora, scale, spec, keep)
    z1 = rmsnorm_forward(x, w["input_layernorm"], spec.eps, spec.norm_offset)
    qkv, zg, b_in, a_in = projs(DELTA_INPUTS, z1)
    sync = _sync(spec)  # each phase's temporaries gone before the next's starts, where chunks are evaluated
    if sync:
        sync(qkv, zg, b_in, a_in)
    log_g, beta = log_decay(a_in, w["linear_attn.A_log"], w["linear_attn.dt_bias"]), mx.sigmoid(b_in)
    starts = None if positions is None or cache is not None else positions == 0
    if cache is not None:
        real = valid[:, -x.shape[1]:, None]
        qkv, log_g, beta = mx.where(real, qkv, 0), mx.where(real, log_g, 0), mx.where(real, beta, 0)
        c = causal_conv(qkv, w["linear_attn.conv1d"], prefix=cache.conv)
        before = cache.conv if cache.conv is not None else mx.zeros((x.shape[0], ds.conv_kernel - 1, qkv.shape[-1]),
                                                                       qkv.dtype)
        cache.conv = mx.concatenate([before, qkv], axis=1)[:, -(ds.conv_kernel - 1):]
        q, k, v = _delta_inputs(c, spec)[:3]
    else:
        q, k, v = _rule_inputs(qkv, w, spec, positions)
    out = gated_delta_forward(q, k, v, log_g, beta, ds.chunk, None if cache is None else cache.state, starts, save,
                              _delta_group(spec, x.shape[0], x.shape[1]))
    if sync:
        sync(out)
    y, states = out[0], out[2] if save else None
    if cache is not None:
        cache.state = out[1]
    out_proj = _projector(w, lora, scale, spec, keep, spec.compute.for_mlp())
    t = x.shape[1]
    r = _by_tokens(lambda t0, t1: out_proj(("linear_attn.out_proj",), _tile_heads(
        _gated_out(y[:, t0:t1], zg[:, t0:t1], w, spec)[0], ds), t0)[0], t, token_chunk(spec, t), sync)
    a = x + r
    return z1, qkv, zg, b_in, a_in, y, states, r, a, rmsnorm_forward(a, w[spec.mlp_norm], spec.eps, spec.norm_offset)


def token_chunk(spec, t, rows=1, width=0):
    """Tokens per block of the work that runs a token block at a time besides the MLP (a linear-attention block's
    conv, SiLU and norms, and the backward of a mixer's projections): the MLP's where chunks are evaluated one at a
    time (the CPU; one block's temporaries alive at a time, each several T x width arrays for the whole sequence),
    else the whole sequence in one graph. width: where chunks are, also no more than keep CHAIN_ARRAYS fp32 arrays
    of `width` features for `rows` batch rows within a tile (TILE_BYTES): the conv's backward chain."""
    if not spec.compute.sync_chunks:
        return t
    if not width:
        return spec.mlp_chunk
    return min(spec.mlp_chunk, max(1, TILE_BYTES // (CHAIN_ARRAYS * rows * width * 4)))


def _conv_window(qkv, w, spec, positions, t0, t1):
    """(c, q, k, v, q_raw, k_raw) of tokens t0..t1 (`_delta_inputs`), c the conv's output there, from the whole
    projection qkv (the conv reads the K - 1 tokens before t0)."""
    taps = spec.delta.conv_kernel - 1
    prefix = None
    if t0:
        prefix = qkv[:, max(0, t0 - taps):t0]
        if prefix.shape[1] < taps:
            prefix = mx.pad(prefix, [(0, 0), (taps - prefix.shape[1], 0), (0, 0)])
    c = causal_conv(qkv[:, t0:t1], w["linear_attn.conv1d"], None if positions is None else positions[:, t0:t1],
                    prefix)
    return (c, *_delta_inputs(c, spec))


def _rule_inputs(qkv, w, spec, positions):
    """The rule's q, k, v for the whole sequence, computed a token block at a time (`token_chunk`)."""
    t = qkv.shape[1]
    return _by_tokens(lambda t0, t1: _conv_window(qkv, w, spec, positions, t0, t1)[1:4], t, token_chunk(spec, t),
                      _sync(spec))


def _delta_group(spec, batch, t):
    ds = spec.delta
    return spec.compute.delta_group(batch, ds.n_v_heads, ds.n_v_heads // ds.n_k_heads, t,
                                    max(ds.k_dim, ds.v_dim, ds.chunk))


def new_cache(spec, step):
    """Generation's per-block cache: keys and values for attention, the recurrent state for linear attention."""
    return DeltaCache() if spec.delta is not None else KVCache(step)


def block_forward(x, w, lora, scale, spec: BlockSpec, dropout=None, segments=None, positions=None, cache=None,
                  valid=None):
    """y = the block's output. w: the block's frozen weights by module path; lora: {path: (A, B)} for the adapted
    projections; dropout: (p, seed) of the LoRA dropout (training only), or None; cache, valid: generation's
    (module docstring), with positions the new tokens' positions."""
    keep = _dropout_masks(dropout, lora, x.shape[0], x.shape[1])
    projs = _projector(w, lora, scale, spec, keep, spec.compute.for_mlp())
    if spec.delta is not None:
        a, z2 = _delta_half(x, w, lora, scale, spec, keep, False, positions, cache, valid)[-2:]
    else:
        a, z2 = _attention_half(x, w, lora, scale, spec, keep, False, segments, positions, cache, valid)[-2:]

    def mlp(t0, t1):
        g, u = _gate_up(z2[:, t0:t1], projs, spec, t0)
        m = projs(("mlp.down_proj",), gated_forward(spec.activation, g, u), t0)[0]
        m = rmsnorm_forward(m, w["post_feedforward_layernorm"], spec.eps, spec.norm_offset) if spec.sandwich else m
        if spec.compute.sync_chunks and a.shape[1] > spec.mlp_chunk:
            # one token block's T x f temporaries and dequantized MLP weights alive at a time, as in the backward
            mx.eval(m)
        return m
    return a + _by_tokens(mlp, a.shape[1], spec.mlp_chunk)


def block_recompute(x, w, lora, scale, spec: BlockSpec, dropout=None, segments=None, positions=None):
    """The forward again from the block's checkpoint x, keeping what `block_backward` needs (`BlockSaved`). The
    backward never needs y: it stops before the down projection (and, with recompute_mlp, before the gate and up
    projections, which the backward redoes one token block at a time)."""
    keep = _dropout_masks(dropout, lora, x.shape[0], x.shape[1])
    if spec.delta is not None:
        z1, qkv, zg, b_in, a_in, y, states, r, a, z2 = _delta_half(x, w, lora, scale, spec, keep, True, positions)
        saved = BlockSaved(z1=z1, a=a, z2=z2, qkv=qkv, zg=zg, b_in=b_in, a_in=a_in, y=y, states=states)
    else:
        z1, q_pre, k_pre, q, k, v, o, lse, gate, r, a, z2 = _attention_half(x, w, lora, scale, spec, keep, True,
                                                                           segments, positions)
        saved = BlockSaved(z1=z1, q=q, k=k, v=v, o=o, lse=lse, a=a, z2=z2, gate=gate)
    if not spec.compute.recompute_mlp:
        saved.g, saved.u = _gate_up(z2, _projector(w, lora, scale, spec, keep), spec)
    if spec.qk_norm:
        saved.q_pre, saved.k_pre = q_pre, k_pre
    if spec.sandwich:
        saved.r = r
    return saved


def block_backward(dy, x, saved: BlockSaved, w, lora, scale, spec: BlockSpec, dropout=None, segments=None,
                   positions=None):
    """Returns (dx, grads) with grads {path: (dA, dB)}. Consumes `saved`: each intermediate is dropped once used."""
    grads = {}
    norm_back = lambda d, inp, name: rmsnorm_backward(d, inp, w[name], spec.eps, spec.norm_offset)
    keep = _dropout_masks(dropout, lora, x.shape[0], x.shape[1])

    def back(names, d_outs, inp, t0=0, compute=spec.compute):
        """dx of the projections `names` reading `inp` (rows t0..), given their output gradients; their LoRA
        gradients go to grads, summed over the token blocks that call it."""
        dx, pairs = lora_group_backward(d_outs, inp, [w[n] for n in names], [_lora(lora, n) for n in names],
                                        scale, compute, [keep(n, inp, t0) for n in names])
        for name, (da, db) in zip(names, pairs):
            if da is not None:
                grads[name] = (da, db) if name not in grads else (grads[name][0] + da, grads[name][1] + db)
        return dx

    mlp_compute = spec.compute.for_mlp()
    # each token block evaluated with its LoRA gradients where chunks are
    sync = (lambda out: mx.eval(out, grads)) if spec.compute.sync_chunks else None

    def by_tokens(fn, width=0):
        """fn(t0, t1, compute) -> its results for tokens t0..t1, a token block at a time (`token_chunk`, with
        `width`) with the MLP's compute (its row-blocked weights where the plan sets mlp_rows); concatenated."""
        chunk = token_chunk(spec, dy.shape[1], dy.shape[0], width)
        return _by_tokens(lambda t0, t1: fn(t0, t1, mlp_compute), dy.shape[1], chunk, sync)

    # MLP, one block of tokens at a time (its T x f temporaries are the largest of the block)
    g, u, z2, a = saved.take("g"), saved.take("u"), saved.take("z2"), saved.take("a")
    projs = _projector(w, lora, scale, spec, keep, mlp_compute)

    def mlp_backward(t0, t1):
        zc, dyc = z2[:, t0:t1], dy[:, t0:t1]
        if g is None:  # recompute_mlp: this token block's gate and up outputs, from the saved input
            gc, uc = _gate_up(zc, projs, spec, t0)
        else:
            gc, uc = g[:, t0:t1], u[:, t0:t1]
        act, gate_backward = gated_act_and_backward(spec.activation, gc, uc)
        dm = dyc
        if spec.sandwich:  # dm = N_post_ff'(m)^T dy, with m = down(act) recomputed
            m = projs(("mlp.down_proj",), act, t0)[0]
            dm = norm_back(dyc, m, "post_feedforward_layernorm")
        dg, du = gate_backward(back(("mlp.down_proj",), [dm], act, t0, mlp_compute))
        if spec.merged:
            dz2 = back(("mlp.gate_up_proj",), [mx.concatenate([dg, du], axis=-1)], zc, t0, mlp_compute)
        else:
            dz2 = back(("mlp.gate_proj", "mlp.up_proj"), [dg, du], zc, t0, mlp_compute)
        return dyc + norm_back(dz2, a[:, t0:t1], spec.mlp_norm)

    da = _by_tokens(mlp_backward, dy.shape[1], spec.mlp_chunk, sync)
    g = u = z2 = a = None  # freed before the attention half
    if spec.compute.sync_chunks:
        mx.eval(da)

    if spec.delta is not None:
        return da + norm_back(_delta_backward(da, saved, w, spec, back, positions, by_tokens), x,
                              "input_layernorm"), grads

    # attention
    dr = norm_back(da, saved.take("r"), "post_attention_layernorm") if spec.sandwich else da
    o, gate = saved.take("o"), saved.take("gate")

    def out_backward(t0, t1, compute):  # r = o_proj(o), or o_proj(o * sigmoid(gate)) with the output gate
        oc, drc = o[:, t0:t1], dr[:, t0:t1]
        if gate is None:
            return back(("self_attn.o_proj",), [drc], oc, t0, compute)
        sig = mx.sigmoid(gate[:, t0:t1])
        dog = back(("self_attn.o_proj",), [drc], oc * sig, t0, compute)
        return dog * sig, dog * oc * sig * (1 - sig)

    do, dgate = (by_tokens(out_backward), None) if gate is None else by_tokens(out_backward)
    do = _heads(do, spec.n_heads)
    q, k, v = saved.take("q"), saved.take("k"), saved.take("v")
    chunk = spec.compute.query_block(q.shape[0], spec.n_heads, q.shape[2])
    dq, dk, dv = attention_backward(do, q, k, v, _heads(o, spec.n_heads), saved.take("lse"), spec.attn_scale, chunk,
                                    spec.compute.sync_chunks, spec.window, segments)
    del o, do, q, k, v, dr
    if spec.compute.sync_chunks:
        mx.eval(dq, dk, dv)
    q_pre, k_pre, z1 = saved.take("q_pre"), saved.take("k_pre"), saved.take("z1")
    b = z1.shape[0]
    names = ("self_attn.qkv_proj",) if spec.merged else ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")

    def inputs_backward(t0, t1, compute):  # the rope's, q/k norms' and input projections', per token
        dqc, dkc, dvc = dq[:, :, t0:t1], dk[:, :, t0:t1], dv[:, :, t0:t1]
        if spec.rope is not None:
            pos = None if positions is None else positions[:, t0:t1]
            dqc, dkc = rope_backward(dqc, spec.rope, pos, t0), rope_backward(dkc, spec.rope, pos, t0)
        if spec.qk_norm:
            dqc = norm_back(dqc, q_pre[:, :, t0:t1], "self_attn.q_norm")
            dkc = norm_back(dkc, k_pre[:, :, t0:t1], "self_attn.k_norm")
        if gate is not None:  # q_proj's rows per head: [q | gate]
            dg = dgate[:, t0:t1].reshape(b, t1 - t0, spec.n_heads, -1)
            dqc = _heads(mx.concatenate([dqc.transpose(0, 2, 1, 3), dg], axis=-1).reshape(b, t1 - t0, -1),
                         spec.n_heads)
        d_outs = [_merge(dqc), _merge(dkc), _merge(dvc)]
        return back(names, [mx.concatenate(d_outs, axis=-1)] if spec.merged else d_outs, z1[:, t0:t1], t0, compute)

    dz1 = by_tokens(inputs_backward)
    dx = da + norm_back(dz1, x, "input_layernorm")
    return dx, grads


def _delta_backward(da, saved, w, spec, back, positions, by_tokens):
    """dz1 of a linear-attention block's mixer (module docstring of ops/gated_delta.py for the rule), given the
    residual's gradient da; the LoRA gradients go through `back`. After the rule's backward, the conv's, SiLU's and
    norms' and the input projections' run a token block at a time (`by_tokens`)."""
    ds = spec.delta
    zg, y = saved.take("zg"), saved.take("y")
    b, t = zg.shape[:2]

    def out_backward(t0, t1, compute):  # out_proj's, the output gate's and the gated norm's, per token
        yc = y[:, t0:t1]
        o, gate_backward = _gated_out(yc, zg[:, t0:t1], w, spec)
        do = _tile_heads(back(("linear_attn.out_proj",), [da[:, t0:t1]], _tile_heads(o, ds), t0, compute), ds,
                         inverse=True)
        dzg, dn = gate_backward(do.reshape(b, t1 - t0, ds.n_v_heads, ds.v_dim))
        return rmsnorm_backward(dn.astype(yc.dtype), yc, w["linear_attn.norm"], spec.eps), dzg.reshape(b, t1 - t0, -1)

    dy, dzg = by_tokens(out_backward)
    del y, zg
    qkv, b_in, a_in, z1 = saved.take("qkv"), saved.take("b_in"), saved.take("a_in"), saved.take("z1")
    q, k, v = _rule_inputs(qkv, w, spec, positions)
    log_g, beta = log_decay(a_in, w["linear_attn.A_log"], w["linear_attn.dt_bias"]), mx.sigmoid(b_in)
    starts = None if positions is None else positions == 0
    dq, dk, dv, dlog_g, dbeta = gated_delta_backward(dy, q, k, v, log_g, beta, saved.take("states"), ds.chunk,
                                                     starts, _delta_group(spec, b, t))
    del q, k, v, dy
    dt = qkv.dtype
    db_in = (dbeta * beta * (1 - beta)).astype(dt)
    da_in = log_decay_backward(dlog_g, a_in, w["linear_attn.A_log"], w["linear_attn.dt_bias"])

    def inputs_backward(t0, t1, compute):
        end = min(t, t1 + ds.conv_kernel - 1)  # the conv's output at t1.. reads inputs before t1
        c, _, _, _, q_raw, k_raw = _conv_window(qkv, w, spec, positions, t0, end)
        dh = mx.concatenate([l2norm_backward(dq[:, t0:end] * ds.k_dim ** -0.5, q_raw).reshape(b, end - t0, -1),
                             l2norm_backward(dk[:, t0:end], k_raw).reshape(b, end - t0, -1),
                             dv[:, t0:end].reshape(b, end - t0, -1)], axis=-1).astype(dt)
        dqkv = causal_conv_backward(silu_backward(dh, c), w["linear_attn.conv1d"],
                                    None if positions is None else positions[:, t0:end])[:, :t1 - t0]
        return back(DELTA_INPUTS, [dqkv, dzg[:, t0:t1], db_in[:, t0:t1], da_in[:, t0:t1]], z1[:, t0:t1], t0, compute)

    if spec.compute.sync_chunks:
        mx.eval(dq, dk, dv, db_in, da_in)
    return by_tokens(inputs_backward, ds.conv_dim)
