"""MeSP: exact LoRA gradients with hand-derived block backwards, the base streamed from the weight store.

Memory model of one step (batch B, length T, hidden d, MLP width f, heads Hq/Hkv of size D, vocab V, blocks N,
of which the top L carry LoRA; floats in the compute dtype):
    checkpoints   L * B*T*d                           block inputs, kept from the forward (only adapted blocks)
    block weights one block's quantized arrays (+ one transient dequantized matrix on the CPU path)
    working set   B*T*(4d + (Hq + 2Hkv)D + Hq + 2f)   what block_backward keeps (ops/block.py), plus one
                  attention query block: B*Hq*chunk*T floats of probabilities
    loss          B*T lse floats + one (token_chunk x vocab_chunk) logits tile; never B*T*V
    LoRA grads    2 * trainable params (or one block's, when the update is fused)
Blocks below the lowest adapted one are run forward only; the backward stops there.
"""
import mlx.core as mx

from ..ops.block import block_backward, block_forward
from ..ops.linear import Frozen, prepared
from ..ops.loss import cross_entropy_backward, cross_entropy_forward
from ..ops.rmsnorm import rmsnorm_backward, rmsnorm_forward


class StreamingEngine:
    """What every streaming engine shares: forward with checkpoints, and the chunked loss."""

    def __init__(self, store, scale, attn_chunk=256, token_chunk=512, vocab_chunk=4096):
        self.store, self.scale = store, scale
        self.spec = store.args.block_spec(attn_chunk)
        self.token_chunk, self.vocab_chunk = token_chunk, vocab_chunk

    def forward(self, params, inputs, keep_from):
        """Runs the blocks, keeping the inputs of blocks >= keep_from. Returns (final hidden, checkpoints)."""
        x = self.store.embed(inputs)
        checkpoints = {}
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

    def block_backward(self, dy, x, w, lora):
        if self.share_dequant:
            w = {k: prepared(v) if isinstance(v, Frozen) else v for k, v in w.items()}
        saved = block_forward(x, w, lora, self.scale, self.spec, save=True)
        mx.eval(saved)
        return block_backward(dy, x, saved, w, lora, self.scale, self.spec)
