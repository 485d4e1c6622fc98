"""MeSP: exact LoRA gradients with hand-derived block backwards, the base streamed from the weight store.

Memory model of one step (batch B, length T, hidden d, MLP width f, heads Hq/Hkv of size D, vocab V, blocks N,
of which the top L carry LoRA; s bytes per float of the compute dtype). `memory_model()` computes it; a test
checks it against MLX's measured peak.
    gradients     the LoRA gradients, collected (4 bytes x trainable params; one block's when the update is fused)
    checkpoints   L * B*T*d*s                         block inputs, kept from the forward (only adapted blocks);
                                                      half with 16-bit checkpoints, ~0 with checkpoints on disk
    then the larger of two phases:
    block phase   one block's quantized weights (+ its dense copy when share_dequant, else one matrix at a time)
                  + saved B*T*(4d + (Hq + 2Hkv)D + Hq + 2f)*s (what block_backward keeps, ops/block.py)
                  + attention tiles 5 * B*Hq*chunk*T*s (scores, masked, probabilities, dp, ds of a query block)
                  + MLP temporaries 8 * B*mlp_chunk*f*s (the MLP backward runs one block of tokens at a time)
                  + ~12 B*T*d*s gradients and temporaries in flight (the attention half is one graph)
    head phase    one vocab chunk of head rows (quantized, read from the store) + its dense copy
                  + 4 (token chunk x vocab chunk) fp32 tiles; never B*T*V
Blocks below the lowest adapted one are run forward only; the backward stops there.
"""
import dataclasses
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..ops.block import block_backward, block_forward
from ..lora import num_params
from ..ops.linear import Frozen, compute_dtype, matmul_path, prepared
from ..ops.loss import cross_entropy_backward, cross_entropy_forward
from ..ops.rmsnorm import rmsnorm_backward, rmsnorm_forward


class Checkpoints:
    """Where block inputs wait for the backward. "memory": as computed (exact); with `dtype` float16/bfloat16 they
    are kept rounded (half the bytes, gradients no longer exact); "disk": written to a temporary file and mapped
    back when their block's backward comes (exact, as MeBP does; costs a write and a read per block)."""

    PLACES = ("memory", "disk")

    def __init__(self, where="memory", dtype=None):
        self.where, self.dtype, self.items, self.dir = where, dtype, {}, None

    def __setitem__(self, i, x):
        kept = x.astype(self.dtype) if self.dtype is not None else x
        if self.where == "disk":
            if self.dir is None:
                self.dir = tempfile.TemporaryDirectory(prefix="mesp-checkpoints-")
            path = Path(self.dir.name) / f"{i}.npy"
            arr = np.array(kept.view(mx.uint16) if kept.dtype == mx.bfloat16 else kept)
            np.save(path, arr)
            kept = (path, kept.dtype)
        self.items[i] = (kept, x.dtype)

    def pop(self, i):
        kept, dtype = self.items.pop(i)
        if self.where == "disk":
            path, stored = kept
            kept = mx.array(np.load(path))
            kept = kept.view(mx.bfloat16) if stored == mx.bfloat16 else kept
            path.unlink()
        return kept.astype(dtype)


class StreamingEngine:
    """What every streaming engine shares: forward with checkpoints, and the chunked loss."""

    def __init__(self, store, scale, attn_chunk=256, mlp_chunk=1024, token_chunk=512, vocab_chunk=4096,
                 checkpoints="memory", checkpoint_dtype=None):
        self.store, self.scale = store, scale
        self.spec = dataclasses.replace(store.args.block_spec(attn_chunk), mlp_chunk=mlp_chunk)
        self.token_chunk, self.vocab_chunk = token_chunk, vocab_chunk
        if checkpoints not in Checkpoints.PLACES:
            raise ValueError(f"checkpoints must be 'memory' or 'disk', got {checkpoints!r}")
        self.checkpoints, self.checkpoint_dtype = checkpoints, checkpoint_dtype

    def forward(self, params, inputs, keep_from):
        """Runs the blocks, keeping the inputs of blocks >= keep_from. Returns (final hidden, checkpoints)."""
        x = self.store.embed(inputs)
        checkpoints = Checkpoints(self.checkpoints, self.checkpoint_dtype)
        for i in range(self.store.num_layers):
            if i >= keep_from:
                checkpoints[i] = x
            x = block_forward(x, self.store.layer(i), params.get(i, {}), self.scale, self.spec)
            mx.eval(x)
        return x, checkpoints

    def head_loss(self, x, targets, mask, need_grad):
        eps = self.store.args.rms_norm_eps
        norm_w, head = self.store.final_norm(), self.store.head_rows()
        d = x.shape[-1]
        h = rmsnorm_forward(x, norm_w, eps).reshape(-1, d)
        t, m = targets.reshape(-1), mask.reshape(-1).astype(mx.float32)
        loss, lse = cross_entropy_forward(h, head, t, m, self.token_chunk, self.vocab_chunk)
        if not need_grad:
            return loss, None
        dh = cross_entropy_backward(mx.array(1.0), h, head, t, m, lse, self.token_chunk, self.vocab_chunk)
        dx = rmsnorm_backward(dh.reshape(x.shape), x, norm_w, eps)
        mx.eval(loss, dx)
        return loss, dx

    def loss(self, params, batch):
        inputs, targets, mask = batch
        x, _ = self.forward(params, inputs, keep_from=self.store.num_layers)
        return self.head_loss(x, targets, mask, need_grad=False)[0]

    def loss_and_grad(self, params, batch, on_block=None):
        """on_block(i, grads_i) is called as each block's gradients exist (for fused updates / all-reduce);
        without it the gradients are collected and returned."""
        inputs, targets, mask = batch
        lowest = min(params) if params else self.store.num_layers
        x, checkpoints = self.forward(params, inputs, keep_from=lowest)
        loss, dx = self.head_loss(x, targets, mask, need_grad=True)
        del x
        grads = {}
        for i in reversed(range(lowest, self.store.num_layers)):
            dx, g = self.block_backward(dx, checkpoints.pop(i), self.store.layer(i), params.get(i, {}))
            mx.eval(dx, g)
            if on_block is not None:
                on_block(i, g)
            else:
                grads[i] = g
        return loss, grads


class MeSPEngine(StreamingEngine):
    """share_dequant: on the dequantize (CPU) path, dequantize each of the block's weights once for both the
    recompute and the backward (as an autodiff graph would) instead of once per product: ~15% faster, for one
    block's dense weights held during its backward. The memory planner turns it off when memory is tight."""

    def __init__(self, store, scale, share_dequant=True, **kw):
        super().__init__(store, scale, **kw)
        self.share_dequant = share_dequant

    def memory_model(self, batch_size, seq_len, params, fused=False):
        """Predicted bytes of one loss_and_grad step beyond what is resident before it, by component
        (fused: the update is applied per block, so only one block's gradients exist at a time)."""
        a, s = self.store.args, compute_dtype().size
        n, d, f, hd = batch_size * seq_len, a.hidden_size, a.intermediate_size, a.head_dim
        hq, hkv = a.num_attention_heads, a.num_key_value_heads
        act = n * d * s
        lowest = min(params) if params else a.num_hidden_layers
        shapes = a.projection_shapes().values()
        dense = [i * o * s for i, o in shapes]
        saved = 4 * d + (hq + 2 * hkv) * hd + hq + 2 * f + ((hq + hkv) * hd if a.qk_norm else 0)
        block = (self.store.layer_bytes() + (sum(dense) if self._shares_dequant() else max(dense))
                 + n * saved * s + 5 * batch_size * hq * min(self.spec.attn_chunk, seq_len) * seq_len * s + 12 * act
                 + 8 * batch_size * min(self.spec.mlp_chunk, seq_len) * f * s)
        head = self.store.head_rows()
        vc, tc = min(self.vocab_chunk, head.out_dims), min(self.token_chunk, n)
        head_phase = vc * (head.row_bytes + 2 * d * s) + 4 * tc * vc * max(s, 4) + 4 * act
        kept = 0 if self.checkpoints == "disk" else (a.num_hidden_layers - lowest) * n * d * (
            self.checkpoint_dtype.size if self.checkpoint_dtype is not None else s)
        grads = 4 * (max(num_params({i: m}) for i, m in params.items()) if fused and params else num_params(params))
        out = {"gradients": grads, "checkpoints": kept,
               "block": block, "head": head_phase}
        out["peak"] = out["gradients"] + out["checkpoints"] + max(block, head_phase)
        return out

    def _shares_dequant(self):
        return self.share_dequant and matmul_path() == "dequantize"

    def block_backward(self, dy, x, w, lora):
        if self.share_dequant:
            w = {k: prepared(v) if isinstance(v, Frozen) else v for k, v in w.items()}
        saved = block_forward(x, w, lora, self.scale, self.spec, save=True)
        mx.eval(saved)
        return block_backward(dy, x, saved, w, lora, self.scale, self.spec)
