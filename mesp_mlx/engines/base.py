"""The interface every training engine implements, and the only thing the trainer knows about an engine.

    loss(params, batch) -> loss
    loss_and_grad(params, batch, on_block=None, seed=None) -> (loss, grads)
        grads shaped like params ({block: {path: (dA, dB)}}); with on_block, on_block(i, grads_i) is called for each
        block as its gradients exist and the returned grads are empty; what on_block returns (arrays, a tree of
        them, or None) is evaluated with the block's gradients, in the same host sync; seed: the step's LoRA dropout
        masks (an engine built with lora_dropout > 0 applies them; None: no dropout)
    train_step(params, batch, update, reduce, seed=None) -> loss
        one optimizer step: reduce(tree) is the data-parallel mean (identity in one process) and update(i, grads_i)
        applies the optimizer to block i, returning what is left to evaluate (as on_block). First-order engines
        update each block inside the backward, in the evaluation that makes its gradients.
    fuses_update    whether train_step updates blocks during the backward (so whole gradients never exist)
    settings        {keyword argument: run setting (TrainConfig field)}: what the engine takes from a run's config
    state() / load_state(state)    the engine's own resumable state (JSON-able)
A batch is (inputs, targets, mask) of shape (B, T), mask 1.0 where a target token counts; a batch of packed rows
(--pack) has a 4th element, segments (B, T): which packed row each position belongs to. A preference batch
(--loss dpo|orpo) has a 5th, its `ops.preference.Preference` (segments None): its 2P rows are P chosen answers then
their P rejected ones, and `loss` is then a dict of scalars (ops.preference.STATS), the loss under "loss".
"""


def segments_of(batch):
    """A packed batch's segment ids, or None for a plain batch."""
    return batch[3] if len(batch) > 3 else None


def preference_of(batch):
    """A preference batch's `Preference`, or None for an SFT batch."""
    return batch[4] if len(batch) > 4 else None


class Engine:
    fuses_update = False
    settings = {"lora_dropout": "lora_dropout"}

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
