"""What a training objective is to the rest of the package: a `Batch` it makes, and an `Objective` that encodes its
data, scores a batch and says how its numbers are reported.

Every objective here is a function of the per-token negative log-likelihoods nll (B, T) of a batch's targets, so
the blocks stream and recompute the same way for all of them and only the head pass differs:
    loss_stats(nll, batch)         the loss (under "loss") and its stats, from full logits' nll (autodiff, MeBP);
    head(h, head, batch, ...)      the streaming head (MeSP): the stats and dL/dh from one chunked pass over the
                                   vocabulary, dL/dh_i = dL/dnll_i (sum_v p_iv W_v - W_{t_i}) (ops/loss.py).
Engines read a batch's arrays and call these two; they never ask which objective runs. The trainer asks the
objective for its data, its batches (made ready by `prepare`, where GRPO samples them), what a data-parallel mean
weighs a batch by, and its report lines; the memory planner asks it how many rows one example becomes.
"""
from dataclasses import dataclass, field

import mlx.core as mx

from ..errors import ConfigError
from ..ops.loss import nll_loss_forward, nll_loss_forward_backward


@dataclass(frozen=True, eq=False)
class Batch:
    """inputs, targets, mask: (B, T), mask 1.0 where a target counts; segments (B, T): which packed row each
    position belongs to (--pack), or None; objective: what scores it; fields: the objective's own per-batch arrays
    (DPO, KTO: each row's reference log-probability under "reference"; KTO: its labels under "desirable")."""
    inputs: object
    targets: object
    mask: object
    objective: "Objective"
    segments: object = None
    fields: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Rollout:
    """The model being trained, as an objective that samples its own batches sees it (GRPO): the run's generator
    (sampler.Generator), the tokenizer and the family's stop ids, the adapter now, the key of this batch's draws,
    and reference(inputs, targets) -> (B, T) every token's log-probability under the reference model."""
    generator: object
    tokenizer: object
    stops: tuple
    params: dict
    scale: float
    key: object
    reference: object


class Objective:
    name = None
    stats = ("loss",)  # the names in every stats dict it returns, "loss" first
    rows_per_example = 1  # batch rows one training example becomes (a preference pair, a KTO example: 2)
    needs_reference = False  # scores rows against a reference model's log-probabilities, computed before training
    packs = True  # takes --pack (short rows share batch rows)

    @classmethod
    def from_config(cls, config):
        """The objective a run's settings ask for; ConfigError for settings it cannot use."""
        raise NotImplementedError

    @staticmethod
    def require(checks):
        """checks: [(condition, message)] -> ConfigError with the first failing condition's message."""
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)

    @staticmethod
    def refuse_reference_settings(c):
        """The settings of DPO's reference model are errors for an objective without one."""
        if c.reference_adapter_path or c.dpo_cpo_loss_type != "sigmoid" or c.rpo_alpha:
            raise ConfigError(f"--reference-adapter-path, --dpo-cpo-loss-type and --rpo-alpha are DPO's: --loss "
                              f"{c.loss} has no reference model")

    @staticmethod
    def refuse_label_weights(c):
        """KTO's weights of its labels are errors for an objective without labels."""
        if c.desirable_weight != 1.0 or c.undesirable_weight != 1.0:
            raise ConfigError(f"--desirable-weight and --undesirable-weight are KTO's: --loss {c.loss} has no "
                              "desirable / undesirable labels")

    def load_data(self, tokenizer, config):
        """-> {split: Dataset} of the run's data, encoded for this objective."""
        raise NotImplementedError

    def make_batch(self, dataset, items, packed=False):
        """A `Batch` of the dataset's examples `items` (as data.epoch_groups lists them)."""
        raise NotImplementedError

    def example_rows(self, dataset, i):
        """The positions of each batch row example i becomes (its input tokens, before padding). An objective that
        samples its rows (GRPO) counts them at their longest."""
        return [len(dataset.examples[i][0]) - 1] * self.rows_per_example

    def prepare(self, batch, rollout):
        """The batch to score, given the model being trained (a `Rollout`): a batch of fixed rows as it is; an
        objective that samples its rows from the model (GRPO) makes them here."""
        return batch

    def batch(self, inputs, targets, mask, segments=None, **fields):
        return Batch(inputs, targets, mask, self, segments, fields)

    def weight(self, batch):
        """What a mean over several batches (a data-parallel group, an evaluation) weighs this batch's stats by:
        its target tokens for a per-token mean, its examples for a per-example one. An mx scalar."""
        return mx.sum(batch.mask)

    def loss_stats(self, nll, batch):
        """{"loss": scalar, ...}: the loss and its stats from every token's nll (B, T), unmasked."""
        raise NotImplementedError

    def head(self, h, head, batch, compute, compile_fn, need_grad):
        """The streaming head: h (N, d) after the final norm -> (stats, dL/dh or None), the vocabulary in chunks."""
        loss_fn = lambda nll: self.loss_stats(nll.reshape(batch.mask.shape), batch)
        targets = batch.targets.reshape(-1)
        if need_grad:
            return nll_loss_forward_backward(h, head, targets, loss_fn, compute, compile_fn)
        return nll_loss_forward(h, head, targets, loss_fn, compute, compile_fn), None

    def describe(self, stats, split):
        """The report's words after "<split> loss x" (split: Train, Val, Test), or ''."""
        return ""

    def brief(self, stats):
        """The progress bar's words after the loss, or ''."""
        return ""
