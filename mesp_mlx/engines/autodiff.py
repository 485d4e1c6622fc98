"""The reference: the whole model as one MLX `value_and_grad` graph, every weight resident, full logits.
What one would write without thinking about memory; the engine every other engine's gradients are tested against.
"""
import mlx.core as mx

from ..lora import from_flat, to_flat
from ..model import reference_loss


class AutodiffEngine:
    def __init__(self, store, scale, **kw):
        self.store, self.scale = store, scale
        self.spec = store.args.block_spec()
        self.layers = [store.layer(i) for i in range(store.num_layers)]

    def loss(self, params, batch):
        return reference_loss(self.store, *batch, params, self.scale, self.spec, self.layers)

    def loss_and_grad(self, params, batch):
        def fn(flat):
            return reference_loss(self.store, *batch, from_flat(flat), self.scale, self.spec, self.layers)

        loss, g = mx.value_and_grad(fn)(to_flat(params))
        mx.eval(loss, g)
        return loss, from_flat(g)
