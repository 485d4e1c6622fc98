"""Supervised fine-tuning: the mean next-token cross-entropy over the target tokens, on mlx-lm's text, completion
and chat rows (data.py). Its streaming head is the fused one-pass cross-entropy of ops/loss.py, whose gradient
needs no autodiff over the nll's."""
import math

import mlx.core as mx

from ..data import load_datasets, make_batch
from ..ops.loss import cross_entropy_forward, cross_entropy_forward_backward
from .base import Objective


class SFT(Objective):
    name = "sft"

    @classmethod
    def from_config(cls, config):
        cls.refuse_reference_settings(config)
        cls.refuse_label_weights(config)
        return cls()

    def load_data(self, tokenizer, c):
        return load_datasets(tokenizer, c.data, c.max_seq_length, c.mask_prompt, c.skip_bad_rows, c.hf_dataset)

    def make_batch(self, dataset, items, packed=False):
        return self.batch(*make_batch(dataset, items, packed))

    def loss_stats(self, nll, batch):
        mask = batch.mask.astype(nll.dtype)
        return {"loss": mx.sum(nll * mask) / mx.maximum(mx.sum(mask), 1.0)}

    def head(self, h, head, batch, compute, compile_fn, need_grad):
        t, m = batch.targets.reshape(-1), batch.mask.reshape(-1).astype(mx.float32)
        if need_grad:
            loss, dh = cross_entropy_forward_backward(h, head, t, m, compute, compile_fn)
            return {"loss": loss}, dh
        return {"loss": cross_entropy_forward(h, head, t, m, compute, compile_fn)[0]}, None

    def describe(self, stats, split):
        if split == "Train":  # mlx-lm's training line reports no perplexity
            return ""
        return f"{split} ppl {math.exp(min(stats['loss'], 50)):.3f}"
