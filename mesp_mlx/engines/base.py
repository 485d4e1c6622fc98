"""The interface every training engine implements, and the only thing the trainer knows about an engine.

    loss(params, batch) -> stats
    loss_and_grad(params, batch, on_block=None, seed=None) -> (stats, grads)
        grads shaped like params ({block: {path: (dA, dB)}}); with on_block, on_block(i, grads_i) is called for each
        block as its gradients exist and the returned grads are empty; what on_block returns (arrays, a tree of
        them, or None) is evaluated with the block's gradients, in the same host sync; seed: the step's LoRA dropout
        masks (an engine built with lora_dropout > 0 applies them; None: no dropout)
    train_step(params, batch, update, reduce, seed=None) -> stats
        one optimizer step: reduce(tree) is the data-parallel mean (identity in one process) and update(i, grads_i)
        applies the optimizer to block i, returning what is left to evaluate (as on_block). First-order engines
        update each block inside the backward, in the evaluation that makes its gradients.
    fuses_update    whether train_step updates blocks during the backward (so whole gradients never exist)
    settings        {keyword argument: run setting (TrainConfig field)}: what the engine takes from a run's config
    state() / load_state(state)    the engine's own resumable state (JSON-able)
    weight_passes   how many times one loss_and_grad multiplies every frozen weight, whatever the batch's length
                    (the streaming engines: forward, recompute, backward): the trainer's tokens-per-pass note
A batch is an `objectives.Batch`: inputs, targets, mask (B, T), segments (packed rows, or None), and the objective
that scores it. Every method returns the objective's stats, a dict of scalars with the loss under "loss"; an engine computes them through `batch.objective` (loss_stats from full logits, or its streaming
head) and never asks which objective it is.
"""


class Engine:
    fuses_update = False
    settings = {"lora_dropout": "lora_dropout"}
    weight_passes = 3

    def loss(self, params, batch):
        raise NotImplementedError

    def loss_and_grad(self, params, batch, on_block=None, seed=None):
        raise NotImplementedError

    def train_step(self, params, batch, update, reduce, seed=None):
        """Each block's (reduced) gradients go to update() as soon as they exist, then are dropped."""
        loss, _ = self.loss_and_grad(params, batch, on_block=lambda i, g: update(i, reduce(g)), seed=seed)
        return loss

    def state(self):
        return {}

    def load_state(self, state):
        pass
