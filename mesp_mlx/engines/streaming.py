"""What every streaming engine shares: the base read from the weight store one block at a time, a forward that
keeps block checkpoints, the chunked head loss, and a backward that walks the blocks top-down and hands each
block's gradients out as they exist (the fused update and the data-parallel all-reduce hook in there).

With `Compute.compiled` each block body (forward, and the subclass's backward) runs as an `mx.compile`d function
whose inputs are everything that varies between calls (activations, the block's streamed weights, its LoRA pairs,
the packing arrays): one trace per block spec and input structure, reused by every layer of that shape and every
step, with the element-wise chains compiled into single kernels; a block's quantization scales are then cast to the
compute dtype in one kernel, and the head's norm, vocabulary tiles and finishing arithmetic are compiled alike.
LoRA dropout draws its masks from the step's seed, a Python constant to a trace, so a step with dropout runs the
plain bodies."""
from functools import partial

import mlx.core as mx

from ..ops.block import block_dropout, block_forward, packing
from ..ops.linear import DEFAULT, cast_scales
from ..ops.rmsnorm import rmsnorm_backward, rmsnorm_forward
from .base import Engine
from .checkpoints import Checkpoints


class StreamingEngine(Engine):
    fuses_update = True

    def __init__(self, store, scale, compute=DEFAULT, checkpoints="memory", checkpoint_dtype=None, lora_dropout=0.0):
        self.store, self.scale, self.compute, self.lora_dropout = store, scale, compute, lora_dropout
        self.specs = store.args.block_specs(compute)  # one per block: windows and rope differ by layer
        Checkpoints(checkpoints)  # an unknown place is refused here, not at the first step
        self.checkpoints, self.checkpoint_dtype = checkpoints, checkpoint_dtype
        self._compiled = {}  # (body, spec, input structure) -> its compiled function

    def compiled(self, name, spec, body, w, lora, dropout=None):
        """`body` or, with Compute.compiled, its compiled form, cached under what its trace depends on besides its
        inputs' shapes: the body's name, the (shared) spec object and which weights and LoRA pairs it receives."""
        if not self.compute.compiled or dropout is not None:
            return body
        key = (name, id(spec), tuple(sorted(w)), tuple(sorted(lora)))
        if key not in self._compiled:
            self._compiled[key] = mx.compile(body)
        return self._compiled[key]

    def compile_fn(self, name, fn):
        """`fn`, a pure function of arrays (the head's tiles, norm and finishing arithmetic), or with
        Compute.compiled its compiled form, cached under `name`: its element-wise chains become single kernels."""
        return self.compiled(name, None, fn, {}, {})

    def weights(self, w):
        """A block's streamed weights as a body uses them: in a compiled body (one graph) every quantized weight's
        scales and biases are cast to the compute dtype by one kernel for the block (ops.linear.cast_scales)."""
        return cast_scales(w, self.compute.dtype) if self.compute.compiled else w

    def block_forward(self, x, w, lora, spec, dropout=None, segments=None, positions=None):
        """One block's forward without saving anything (the checkpointing pass and the loss)."""
        body = lambda x, w, lora, segments, positions: block_forward(
            x, self.weights(w), lora, self.scale, spec, dropout=dropout, segments=segments, positions=positions)
        return self.compiled("forward", spec, body, w, lora, dropout)(x, w, lora, segments, positions)

    def forward(self, params, inputs, keep_from, dropout=None, packed=None):
        """Runs the blocks, keeping the inputs of blocks >= keep_from. Returns (final hidden, checkpoints).
        packed: a packed batch's block arguments (ops.block.packing)."""
        x = self.store.embed(inputs, self.compute.dtype)
        checkpoints = Checkpoints(self.checkpoints, self.checkpoint_dtype)
        for i in range(self.store.num_layers):
            if i >= keep_from:
                checkpoints[i] = x
            x = self.block_forward(x, self.store.layer(i), params.get(i, {}), self.specs[i],
                                   dropout=block_dropout(dropout, i), **(packed or {}))
            mx.eval(x)
        return x, checkpoints

    def head_loss(self, x, batch, need_grad):
        """-> (the objective's stats, dx or None) from the final hidden state x."""
        eps, offset = self.store.args.rms_norm_eps, self.store.args.norm_offset
        norm_w, compile_fn = self.store.final_norm(), self.compile_fn
        h = compile_fn("final_norm", partial(rmsnorm_forward, eps=eps, offset=offset))(x, norm_w)
        stats, dh = batch.objective.head(h.reshape(-1, x.shape[-1]), self.store.head_rows(), batch, self.compute,
                                         compile_fn, need_grad)
        if not need_grad:
            return stats, None
        dx = compile_fn("final_norm_backward", partial(rmsnorm_backward, eps=eps, offset=offset))(
            dh.reshape(x.shape), x, norm_w)
        mx.eval(stats, dx)
        return stats, dx

    def loss(self, params, batch):
        x, _ = self.forward(params, batch.inputs, keep_from=self.store.num_layers, packed=packing(batch.segments))
        return self.head_loss(x, batch, need_grad=False)[0]

    def loss_and_grad(self, params, batch, on_block=None, seed=None):
        packed = packing(batch.segments)
        dropout = None if seed is None else (self.lora_dropout, seed)
        lowest = min(params) if params else self.store.num_layers
        x, checkpoints = self.forward(params, batch.inputs, keep_from=lowest, dropout=dropout, packed=packed)
        loss, dx = self.head_loss(x, batch, need_grad=True)
        del x
        grads = {}
        for i in reversed(range(lowest, self.store.num_layers)):
            dx, g = self.block_backward(dx, checkpoints.pop(i), self.store.layer(i), params.get(i, {}),
                                        self.specs[i], block_dropout(dropout, i), **packed)
            if on_block is None:
                grads[i] = g
            mx.eval(dx, g, None if on_block is None else on_block(i, g))  # the block's update in the same sync
        return loss, grads

    def block_backward(self, dy, x, w, lora, spec, dropout=None, segments=None, positions=None):
        """-> (dx, {path: (dA, dB)}) of one block, given its checkpoint x, its spec and its dropout (p, seed);
        segments, positions: a packed batch's (ops.block.packing)."""
        raise NotImplementedError
