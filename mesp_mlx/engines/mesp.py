"""MeSP: exact LoRA gradients with hand-derived block backwards, the base streamed from the weight store.

Memory model of one step (batch B, length T, hidden d, MLP width f, heads Hq/Hkv of size D, vocab V, blocks N,
of which the top L carry LoRA; s bytes per float of the compute dtype). `memory_model()` computes it; a test
checks it against MLX's measured peak.
    gradients     the LoRA gradients, collected (4 bytes x trainable params; one block's when the update is fused)
    checkpoints   L * B*T*d*s                         block inputs, kept from the forward (only adapted blocks);
                                                      half with 16-bit checkpoints, ~0 with checkpoints on disk
    then the larger of two phases:
    block phase   one block's quantized weights + ~6 B*T*d*s activations in flight (x, dy, the MLP's dx, the token
                  blocks of the mixer's and their concatenation, the block's dx) + the largest of its phases, which
                  run one after another, each evaluated before the next where chunks are (the CPU; adding them
                  over-predicted the Qwen3.5-4B shape 1.6x at T=512: BENCHMARKS.md), `_block_bytes`:
                    recompute: what the block saves for its backward (below) + its input projections' products over
                           the whole sequence with their outputs and attention's tiles (or, the larger, the delta
                           rule's inputs q, k, v, token blocks and their concatenation, and a head group's
                           temporaries)
                    MLP:   saved + its products (below) over B*mlp_chunk tokens + its temporaries 8 * B*mlp_chunk*f*s
                           (the MLP backward runs one block of tokens at a time)
                    mixer: the saved items not used up (the MLP's input and residual are) + the mixer's backward:
                           attention's query blocks (tiles 5 * B*Hq*chunk*K*s: scores, masked, probabilities, dp,
                           ds; K = T keys, or chunk + window - 1 for a sliding window), do and its grouped copy, dq's
                           blocks and their concatenation, dk and dv with their padded partial sums; or the delta
                           rule's inputs, dy, its input gradients dq, dk, dv twice (a head group's and all of them)
                           and a head group's temporaries, 30 B*T*G*max(Dk, Dv, C)*4 for G value heads at a time
                           (Compute.delta_group; measured ~27 MB per head at T=2048 and 128-wide heads) + two of
                           the group's states
                    token blocks: the mixer's input gradients held + the products of its input projections (or of
                           its output projection, the larger) over B*mlp_chunk tokens with the MLP's compute + a
                           token block's temporaries (ops/block.py: the per-token work runs a token block at a
                           time where chunks are evaluated one at a time)
                  With share_dequant every dense copy lives through the whole block, on top.
                  Products: the dense copies of a graph's weights (the MLP's backward runs down, gate and up
                    together; measured on a tiny Q4_K store at f = 8d: the whole MLP's, not one matrix's); with
                    Compute.mlp_rows the MLP's products hold a row block's copy and its temporary, 2 r*in*s, and
                    their partial results over B*mlp_chunk tokens: ops.linear.Compute.for_mlp. An affine matrix's
                    dense copy is filled 8 MB of rows at a time (ops.linear.dense_for: MLX's CPU dequantize holds a
                    temporary as large as its result)
                  + for GGML blocks kept packed (ops/ggml.py), the dequantization temporaries, t bytes per weight
                    element (ops.ggml.dequant_temp_bytes, measured by tools/bench_ggml_dequant.py): of one matrix
                    with share_dequant; without, a product with such a matrix holds r*in*(s + t) for r = its out
                    rows, or Compute.dequant_rows when row-blocked (each row block evaluated as it goes), plus then
                    its row blocks' partial results (B*T*out*s forward, two fp32 B*T*in accumulators transposed)
                  Saved, the largest over the model's kinds of block:
                    attention: B*T*(4d + (Hq + 2Hkv)D + Hq + 2f)*s (ops/block.py's BlockSaved, what
                      block_backward keeps; o counted as Hq D; no 2f with recompute_mlp; + (Hq + Hkv)D with q/k
                      norms, + d with Gemma's sandwich norms, + Hq D with Qwen3.5's output gate)
                    gated delta rule: B*T*(3d + conv + Hv Dv + 2Hv + 2f)*s + B*T*Hv Dv*4 (y, fp32) + the
                      chunk-boundary states B*ceil(T/C)*Hv*Dv*Dk*4
    head phase    one vocab chunk of head rows (quantized, read from the store) + its dense copy
                  (+ its dequantization temporaries, vocab chunk * d * t, when the head is kept packed)
                  + 4 (token chunk x vocab chunk) fp32 tiles; never B*T*V
                  + ~8 B*T*d*s: x, h, the softmax-weighted rows, the target rows, dh and dx (one-pass loss;
                    measured 135 MB at T=4096 on Qwen2.5-0.5B, resident state included)
Blocks below the lowest adapted one are run forward only; the backward stops there.
"""
from typing import NamedTuple

import mlx.core as mx

from ..lora import num_params
from ..ops.block import CHAIN_ARRAYS, DELTA_INPUTS, BlockSaved, block_backward, block_recompute, token_chunk
from ..ops.gated_delta import chunk_length
from ..ops.ggml import dequant_temp_bytes
from ..ops.linear import FILL_BYTES, Frozen, prepared
from .streaming import StreamingEngine

# the projections whose products one graph holds together (module docstring: block phase): the mixer's output
# projection, its input projections (the recompute's first products, the backward's last), the MLP's
OUTPUTS = ("self_attn.o_proj", "linear_attn.out_proj")
INPUTS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.qkv_proj") + DELTA_INPUTS
MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.gate_up_proj", "mlp.down_proj")


class Mixer(NamedTuple):
    """A block's mixer phases in bytes (`MeSPEngine._block_bytes`): what the block saved for its backward; what its
    recompute holds beyond that and its input projections' products (their outputs, the attention tiles), or beside
    them (the delta rule's inputs, blocks and concatenation, and a head group's temporaries); the peak of its
    mixer's backward with what it holds besides (the saved items not used up yet); what the block holds through
    the token blocks after it (the mixer's input gradients); tokens per such block and a block's temporaries."""
    saved: int
    recompute: int
    rule_inputs: int
    backward: int
    held: int
    tokens: int
    token_temps: int


class MeSPEngine(StreamingEngine):
    """compute.share_dequant: on the dequantize (CPU) path, dequantize each of the block's weights once for both the
    recompute and the backward (as an autodiff graph would) instead of once per product: ~15% faster, for one
    block's dense weights held during its backward. The memory planner turns it off when memory is tight."""

    def memory_model(self, batch_size, seq_len, params, fused=False):
        """Predicted bytes of one loss_and_grad step beyond what is resident before it, by component
        (fused: the update is applied per block, so only one block's gradients exist at a time)."""
        a, c = self.store.args, self.compute
        s = c.dtype.size
        n, d, f = batch_size * seq_len, a.hidden_size, a.intermediate_size
        act = n * d * s
        lowest = min(params) if params else a.num_hidden_layers
        # one block's projections at a time: the largest over the kinds of block (Qwen3.5's linear and
        # full-attention blocks have different ones)
        kinds = {(a.projections(i), self.specs[i]): i for i in range(a.num_hidden_layers)}
        n_mlp = batch_size * min(c.mlp_chunk, seq_len)
        mlp_temps = 8 * n_mlp * f * s
        block = self.store.layer_bytes() + 6 * act + max(
            self._block_bytes(a.projection_shapes(i), spec, batch_size, seq_len, n_mlp, mlp_temps)
            for (_, spec), i in kinds.items())
        head = self.store.head_rows()
        tc, vc = c.head_tile(n, head, d)
        head_type = self.store.packed_types().get(head.module)
        head_temp = dequant_temp_bytes(head_type, c.dtype) if head_type else 0
        head_phase = vc * (head.row_bytes + (2 * s + head_temp) * d) + 4 * tc * vc * max(s, 4) + 8 * act
        kept = 0 if self.checkpoints == "disk" else (a.num_hidden_layers - lowest) * n * d * (
            self.checkpoint_dtype.size if self.checkpoint_dtype is not None else s)
        grads = 4 * (max(num_params({i: m}) for i, m in params.items()) if fused and params else num_params(params))
        out = {"gradients": grads, "checkpoints": kept,
               "block": block, "head": head_phase}
        out["peak"] = out["gradients"] + out["checkpoints"] + max(block, head_phase)
        return out

    def _block_bytes(self, shapes, spec, batch_size, seq_len, n_mlp, mlp_temps):
        """A block's recompute and backward beyond its quantized weights and the activations in flight: what it
        saved, then the largest of its phases, which run one after another, each evaluated before the next where
        chunks are (the CPU): the recompute (its input projections' products over the whole sequence, or the delta
        rule's inputs and a head group's temporaries), the MLP's backward (its products over n_mlp tokens with its
        own compute, Compute.for_mlp, and its temporaries), the mixer's backward (attention's or the rule's, with
        the saved items used up by then gone), and the work that runs a token block at a time after it (the input
        projections' backward, with the mixer's input gradients held). With the dequantized copies shared, every
        dense weight lives through the whole block on top."""
        c = self.compute
        s = c.dtype.size
        m = self._mixer_bytes(spec, batch_size, seq_len)
        products = self._product_bytes(shapes, batch_size * seq_len, c)
        blocked = self._product_bytes(shapes, m.tokens, c.for_mlp())
        mlp = self._product_bytes(shapes, n_mlp, c.for_mlp())
        phase = lambda names, p: sum(p[k][1] for k in names if k in p)
        dense = 0
        if self._shares_dequant():
            dense = sum(i * o * s for i, o in shapes.values()) + max(t for t, _ in products.values())
            products = blocked = mlp = {}
        return dense + max(m.saved + phase(MLP, mlp) + mlp_temps,
                           m.saved + m.recompute + max(phase(INPUTS, products), m.rule_inputs),
                           m.backward,
                           m.held + max(phase(INPUTS, blocked), phase(OUTPUTS, blocked)) + m.token_temps)

    def _mixer_bytes(self, spec, batch_size, seq_len):
        """The bytes of a block of this spec's mixer phases (`Mixer`), from what ops/block.py keeps and makes."""
        a, c = self.store.args, self.compute
        s, n, d, f = c.dtype.size, batch_size * seq_len, a.hidden_size, a.intermediate_size
        used = 2 * n * d * s  # a and z2, used by the MLP's backward
        if spec.delta is None:
            saved = n * s * BlockSaved.floats_per_token(d, f, spec.n_heads, spec.n_kv_heads, spec.head_dim,
                                                        c.recompute_mlp, spec.qk_norm, spec.sandwich,
                                                        spec.output_gate)
            q, kv = spec.n_heads * spec.head_dim, spec.n_kv_heads * spec.head_dim
            width = q * (2 if spec.output_gate else 1) + 2 * kv  # the input projections' outputs
            chunk = c.query_block(batch_size, spec.n_heads, seq_len)
            keys = seq_len if spec.window is None else min(seq_len, chunk + spec.window - 1)
            tiles = 5 * batch_size * spec.n_heads * chunk * keys * s
            gate = n * q * s if spec.output_gate else 0
            d_in = n * (q + 2 * kv) * 4  # dq, dk, dv
            # do, dgate and the grouped copies of do and o; dq's query blocks and their concatenation, dk and dv
            # with their padded partial sums
            backward = saved - used + n * d * s + 3 * n * q * s + gate + 2 * n * q * 4 + 4 * n * kv * 4 + tiles
            tokens = batch_size * token_chunk(spec, seq_len)
            return Mixer(saved, recompute=n * width * s + tiles, rule_inputs=0, backward=backward,
                         held=saved - used + d_in + gate, tokens=tokens, token_temps=6 * tokens * width * s)
        ds = spec.delta
        hv, width = ds.n_v_heads, max(ds.k_dim, ds.v_dim, ds.chunk)
        cl = chunk_length(ds.chunk, seq_len)
        padded = batch_size * -(-seq_len // cl) * cl
        states = padded // cl * hv * ds.v_dim * ds.k_dim * 4
        group = c.delta_group(batch_size, hv, hv // ds.n_k_heads, seq_len, width) or hv
        y = n * hv * ds.v_dim * 4
        saved = n * s * BlockSaved.delta_floats_per_token(d, f, ds, c.recompute_mlp) + y + states
        rule = 30 * padded * group * width * 4 + 2 * states * group // hv  # a head group's chunk matrices, states
        qkv = n * ds.conv_dim * 4  # the rule's inputs q, k, v
        d_in = 2 * padded * (2 * ds.n_k_heads * ds.k_dim + hv * ds.v_dim) * 4  # dq, dk, dv and their concatenation
        # a and z2 used up, y and zg too, with dy and dzg (the same sizes) in their place; q, k, v and dq, dk, dv
        backward = saved - used + qkv + d_in + rule
        tokens = batch_size * token_chunk(spec, seq_len, batch_size, ds.conv_dim)
        return Mixer(saved, recompute=0, rule_inputs=2 * qkv + rule, backward=backward,
                     held=saved - used - y + d_in // 2, tokens=tokens,
                     token_temps=CHAIN_ARRAYS * tokens * ds.conv_dim * 4)

    def _product_bytes(self, shapes, n, c):
        """{projection: (temporaries of dequantizing the whole matrix, bytes one product with it holds beyond its
        output)} under compute c, for products over n tokens, the largest over layers: packed GGML matrices hold t
        bytes per element dequantizing (dequant_temp_bytes), a product r*in*(s + t) for r rows at a time
        (Compute.dequant_rows when row-blocked, ops.linear.row_blocks) and then its blocks' partial results;
        affine matrices row-blocked alike (c.row_affine) r*in*2s (a row block's copy and the dequantization's
        temporary of its size); other matrices their dense copy (filled FILL_BYTES at a time, ops.linear.dense_for,
        each block's temporary on top)."""
        s = c.dtype.size
        packed = self.store.packed_types()
        out = {}
        for name, (i, o) in shapes.items():
            each = []
            for kind in {packed.get(f"model.layers.{layer}.{name}") for layer in range(self.store.num_layers)}:
                if kind is None:
                    blocked = c.row_affine and 0 < c.dequant_rows < o
                    each.append((0, c.dequant_rows * i * 2 * s + n * max(o * s, 2 * i * 4) if blocked
                                 else i * o * s + min(i * o * s, FILL_BYTES)))
                    continue
                t = dequant_temp_bytes(kind, c.dtype)
                blocked = 0 < c.dequant_rows < o
                rows = c.dequant_rows if blocked else o
                partial = n * max(o * s, 2 * i * 4) if blocked else 0
                each.append((i * o * t, rows * i * (s + t) + partial))
            out[name] = max(t for t, _ in each), max(p for _, p in each)
        return out

    def _shares_dequant(self):
        return self.compute.share_dequant and self.compute.path == "dequantize"

    def block_backward(self, dy, x, w, lora, spec, dropout=None, segments=None, positions=None):
        def body(dy, x, w, lora, segments, positions):
            w = self.weights(w)
            if self._shares_dequant():
                w = {k: prepared(v, self.compute) if isinstance(v, Frozen) else v for k, v in w.items()}
            saved = block_recompute(x, w, lora, self.scale, spec, dropout=dropout, segments=segments,
                                    positions=positions)
            if self.compute.sync_chunks:  # the recompute's temporaries are gone before the backward starts
                mx.eval(saved.arrays())
            return block_backward(dy, x, saved, w, lora, self.scale, spec, dropout=dropout, segments=segments,
                                  positions=positions)
        return self.compiled("backward", spec, body, w, lora, dropout)(dy, x, w, lora, segments, positions)
