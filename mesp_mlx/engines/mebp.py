"""MeBP (arXiv 2510.03425): the same streaming and block checkpoints as MeSP, but each block's backward is MLX
autodiff (`mx.vjp`) of the block's recomputed forward, which keeps every temporary autodiff needs (the T x T
attention probabilities among them), and the LM head and loss are differentiated the same way over the full
T x V logits, as that paper does. MLX's fused attention kernel is used in the forwards, as mlx-lm does.
"""
import mlx.core as mx

from ..model import full_token_nll
from ..ops.block import block_forward
from .streaming import StreamingEngine


class MeBPEngine(StreamingEngine):
    def head_loss(self, x, batch, need_grad):
        def stats(x):
            out = batch.objective.loss_stats(full_token_nll(self.store, x, batch.targets, self.compute), batch)
            return out["loss"], out

        if not need_grad:
            out = stats(x)[1]
            mx.eval(out)
            return out, None
        (_, out), dx = mx.value_and_grad(stats)(x)
        mx.eval(out, dx)
        return out, dx

    def block_backward(self, dy, x, w, lora, spec, dropout=None, segments=None, positions=None):
        paths = sorted(lora)

        def body(dy, x, w, lora, segments, positions):
            w = self.weights(w)

            def fn(x, *flat):
                pairs = {p: (flat[2 * j], flat[2 * j + 1]) for j, p in enumerate(paths)}
                return block_forward(x, w, pairs, self.scale, spec, dropout=dropout, segments=segments,
                                     positions=positions)

            primals = [x] + [t for p in paths for t in lora[p]]
            _, cots = mx.vjp(fn, primals, [dy])
            return cots[0], {p: (cots[1 + 2 * j], cots[2 + 2 * j]) for j, p in enumerate(paths)}
        return self.compiled("backward", spec, body, w, lora, dropout)(dy, x, w, lora, segments, positions)
