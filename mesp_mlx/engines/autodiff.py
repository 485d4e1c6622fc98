"""The reference: the whole model as one MLX `value_and_grad` graph, every weight resident, full logits.
What one would write without thinking about memory; the engine every other engine's gradients are tested against.
Its gradients all exist at the end, so a per-block callback sees them then.
"""
import mlx.core as mx

from ..lora import from_flat, to_flat
from ..model import reference_loss
from ..ops.linear import DEFAULT
from .base import Engine


class AutodiffEngine(Engine):
    weight_passes = 2  # the graph's forward and its backward; no recompute
    def __init__(self, store, scale, compute=DEFAULT, checkpoints=None, checkpoint_dtype=None, lora_dropout=0.0):
        # one resident graph: there are no block checkpoints to place
        self.store, self.scale, self.lora_dropout = store, scale, lora_dropout
        self.specs = store.args.block_specs(compute)
        self.layers = [store.layer(i) for i in range(store.num_layers)]

    def loss(self, params, batch):
        stats = reference_loss(self.store, batch, params, self.scale, self.specs, self.layers)[1]
        mx.eval(stats)
        return stats

    def loss_and_grad(self, params, batch, on_block=None, seed=None):
        dropout = None if seed is None else (self.lora_dropout, seed)

        def fn(flat):
            return reference_loss(self.store, batch, from_flat(flat), self.scale, self.specs, self.layers, dropout)

        (_, loss), g = mx.value_and_grad(fn)(to_flat(params))
        mx.eval(loss, g)
        grads = from_flat(g)
        if on_block is None:
            return loss, grads
        for i in sorted(grads, reverse=True):
            mx.eval(on_block(i, grads.pop(i)))
        return loss, {}
