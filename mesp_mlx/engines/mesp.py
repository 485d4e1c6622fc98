"""MeSP: exact LoRA gradients with hand-derived block backwards, the base streamed from the weight store.

Memory model of one step (batch B, length T, hidden d, MLP width f, heads Hq/Hkv of size D, vocab V, blocks N,
of which the top L carry LoRA; s bytes per float of the compute dtype). `memory_model()` computes it; a test
checks it against MLX's measured peak.
    gradients     the LoRA gradients, collected (4 bytes x trainable params; one block's when the update is fused)
    checkpoints   L * B*T*d*s                         block inputs, kept from the forward (only adapted blocks);
                                                      half with 16-bit checkpoints, ~0 with checkpoints on disk
    then the larger of two phases:
    block phase   one block's quantized weights (+ its dense copy when share_dequant, else the dense copies of
                    the attention's or the MLP's products, whichever are larger: each half's products are one graph
                    (the MLP's backward runs down, gate and up together), so their copies are alive at once;
                    measured on a tiny Q4_K store at f = 8d: the whole MLP's, not one matrix's; with
                    Compute.mlp_rows the MLP's products hold a row block's copy and its temporary, 2 r*in*s, and
                    their partial results over B*mlp_chunk tokens: ops.linear.Compute.for_mlp). An affine matrix's
                    dense copy is filled 8 MB of rows at a time (ops.linear.dense_for: MLX's CPU dequantize holds a
                    temporary as large as its result)
                  + for GGML blocks kept packed (ops/ggml.py), the dequantization temporaries, t bytes per weight
                    element (ops.ggml.dequant_temp_bytes, measured by tools/bench_ggml_dequant.py): of one matrix
                    with share_dequant; without, a product with such a matrix holds r*in*(s + t) for r = its out
                    rows, or Compute.dequant_rows when row-blocked (each row block evaluated as it goes), plus then
                    its row blocks' partial results (B*T*out*s forward, two fp32 B*T*in accumulators transposed)
                  + the mixer's, the largest over the model's kinds of block:
                    attention: saved B*T*(4d + (Hq + 2Hkv)D + Hq + 2f)*s (ops/block.py's BlockSaved, what
                      block_backward keeps; o counted as Hq D; no 2f with recompute_mlp; + (Hq + Hkv)D with q/k
                      norms, + d with Gemma's sandwich norms, + Hq D with Qwen3.5's output gate)
                      + tiles 5 * B*Hq*chunk*K*s (scores, masked, probabilities, dp, ds of a query block; K = T
                      keys, or chunk + window - 1 for a sliding window)
                    gated delta rule: saved B*T*(3d + conv + Hv Dv + 2Hv + 2f)*s + B*T*Hv Dv*4 (y, fp32)
                      + 3 x the chunk-boundary states (B*ceil(T/C)*Hv*Dv*Dk*4: kept, their gradients, one more)
                      + 30 B*T*G*max(Dk, Dv, C)*4 for G value heads at a time (Compute.delta_group; measured
                      ~27 MB per head at T=2048 and 128-wide heads) + dq, dk, dv twice
                  + MLP temporaries 8 * B*mlp_chunk*f*s (the MLP backward runs one block of tokens at a time)
                  + ~12 B*T*d*s gradients and temporaries in flight (the attention half is one graph)
    head phase    one vocab chunk of head rows (quantized, read from the store) + its dense copy
                  (+ its dequantization temporaries, vocab chunk * d * t, when the head is kept packed)
                  + 4 (token chunk x vocab chunk) fp32 tiles; never B*T*V
                  + ~8 B*T*d*s: x, h, the softmax-weighted rows, the target rows, dh and dx (one-pass loss;
                    measured 135 MB at T=4096 on Qwen2.5-0.5B, resident state included)
Blocks below the lowest adapted one are run forward only; the backward stops there.
"""
import mlx.core as mx

from ..lora import num_params
from ..ops.block import DELTA_PROJECTIONS, BlockSaved, block_backward, block_recompute
from ..ops.gated_delta import chunk_length
from ..ops.ggml import dequant_temp_bytes
from ..ops.linear import FILL_BYTES, Frozen, prepared
from .streaming import StreamingEngine

# the projections whose products one graph holds together (module docstring: block phase)
PHASES = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.qkv_proj", "self_attn.o_proj"),
          DELTA_PROJECTIONS[:5], ("mlp.gate_proj", "mlp.up_proj", "mlp.gate_up_proj", "mlp.down_proj"))


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
        kinds = {a.projections(i): i for i in range(a.num_hidden_layers)}
        n_mlp = batch_size * min(c.mlp_chunk, seq_len)
        held = max(self._held_bytes(a.projection_shapes(i), n, n_mlp) for i in kinds.values())
        mixer = max(self._mixer_bytes(spec, batch_size, seq_len) for spec in set(self.specs))
        block = (self.store.layer_bytes() + held + mixer + 12 * act
                 + 8 * batch_size * min(c.mlp_chunk, seq_len) * f * s)
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

    def _held_bytes(self, shapes, n, n_mlp):
        """What a block with projections `shapes` holds of its weights in its products: all of them dense when the
        dequantized copies are shared, else the largest phase's products (the MLP's with its own compute, over
        n_mlp tokens, its token blocks: Compute.for_mlp)."""
        c = self.compute
        s = c.dtype.size
        products = self._product_bytes(shapes, n, c)
        if self._shares_dequant():
            return sum(i * o * s for i, o in shapes.values()) + max(t for t, _ in products.values())
        mlp = self._product_bytes(shapes, n_mlp, c.for_mlp())
        return max(sum((mlp if names is PHASES[-1] else products)[k][1] for k in names if k in products)
                   for names in PHASES)

    def _mixer_bytes(self, spec, batch_size, seq_len):
        """What one block of this spec keeps for its backward (BlockSaved) plus its mixer's largest temporaries:
        attention's score tiles, or the gated delta rule's chunk matrices, per-token products and boundary states."""
        a, c = self.store.args, self.compute
        s, n, d, f = c.dtype.size, batch_size * seq_len, a.hidden_size, a.intermediate_size
        if spec.delta is None:
            saved = BlockSaved.floats_per_token(d, f, spec.n_heads, spec.n_kv_heads, spec.head_dim, c.recompute_mlp,
                                                spec.qk_norm, spec.sandwich, spec.output_gate)
            chunk = c.query_block(batch_size, spec.n_heads, seq_len)
            keys = seq_len if spec.window is None else min(seq_len, chunk + spec.window - 1)
            return n * saved * s + 5 * batch_size * spec.n_heads * chunk * keys * s
        ds = spec.delta
        saved = BlockSaved.delta_floats_per_token(d, f, ds, c.recompute_mlp)
        hv, width = ds.n_v_heads, max(ds.k_dim, ds.v_dim, ds.chunk)
        cl = chunk_length(ds.chunk, seq_len)
        padded = batch_size * -(-seq_len // cl) * cl
        states = padded // cl * hv * ds.v_dim * ds.k_dim * 4
        group = c.delta_group(batch_size, hv, hv // ds.n_k_heads, seq_len, width) or hv
        grads = 2 * padded * (2 * ds.n_k_heads * ds.k_dim + hv * ds.v_dim) * 4  # dq, dk, dv and their concatenation
        return n * saved * s + n * hv * ds.v_dim * 4 + 3 * states + 30 * padded * group * width * 4 + grads

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
