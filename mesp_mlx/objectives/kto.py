"""KTO (Kahneman-Tversky optimization, Ethayarajh et al. 2024) from single answers marked good or bad, as TRL's
KTOTrainer trains it; its math is in ops/preference.py (`kto_stats`).

A row is TRL's unpaired format {"prompt": str or messages, "completion": str or messages, "label": true|false}
(optional "system"), or {"messages": [...], "label": bool} whose last message, the assistant's, is the completion
and the messages before it the prompt. The completion is rendered through the chat template after the prompt's
messages and only its tokens count (the rule of preference pairs, `encode_pair`).

KTO's reference point is the batch's mean log-ratio of mismatched answers: as TRL builds its KL dataset once at load
time, the completions of each run of --batch-size rows of a file are rotated by one (row k gets row k-1's
completion, the run's first row its last's), and each example's KL row is its own prompt with that completion.
So an example is two rows, its completion and its KL completion, held as a preference pair's two rows are: the
batching, the memory planner's two rows per example and the reference cache (keyed by the rows' tokens, valid as
long as the pairing is) are the pair objectives'.
"""
import json
from functools import partial

import mlx.core as mx

from ..data import encode_each
from ..errors import ConfigError, DataError
from ..ops.preference import KTO_STATS, kto_stats
from .preference import (PairDataset, PairObjective, _messages, beta_of, encode_pair, load_preference_datasets,
                         with_system)

EXPECTED = "labelled completions (expected train.jsonl with 'prompt', 'completion', 'label')"


def check_kto_row(row):
    """The problem of a row that is not a KTO row (None for one), for read_jsonl's one-line errors."""
    if not (isinstance(row, dict) and "label" in row and ({"prompt", "completion"} <= row.keys() or "messages" in row)):
        return "expected a KTO row with 'prompt', 'completion' and 'label' (or 'messages' and 'label')"
    if not isinstance(row["label"], bool):
        return f"'label' must be true or false (a JSON boolean), got {json.dumps(row['label'])[:40]}"
    return None


def kto_messages(row, where):
    """-> (prompt messages, completion messages) of a KTO row, its "system" first in the prompt."""
    if "messages" not in row:
        prompt, completion = _messages(row["prompt"], "prompt", where), _messages(row["completion"], "completion",
                                                                                  where)
    else:
        msgs = row["messages"]
        if not isinstance(msgs, list) or len(msgs) < 2:
            raise DataError(f"{where}: 'messages' must be a list of at least two messages, the answer last")
        msgs = _messages(msgs, "messages", where)
        if msgs[-1]["role"] != "assistant":
            raise DataError(f"{where}: the last of 'messages' must be the assistant's answer (the one 'label' "
                            "judges)")
        prompt, completion = msgs[:-1], msgs[-1:]
    return with_system(row, prompt, where), completion


def kl_partners(n, chunk):
    """For each of n rows, the row whose completion makes its KL row: TRL's rotation by one within each run of
    `chunk` rows (row k -> k - 1, a run's first row -> the run's last)."""
    return [a + (k - a - 1) % (min(a + chunk, n) - a) for a in range(0, n, chunk) for k in range(a, min(a + chunk, n))]


class KTODataset(PairDataset):
    """Examples (completion ids, KL completion ids, prompt length) as a PairDataset holds pairs, and `labels`:
    True for a desirable example."""
    unit = "example"

    def __init__(self, pairs, labels, truncated=0):
        super().__init__(pairs, truncated)
        self.labels = labels


def encode_kto(tokenizer, rows, max_seq_length, skip_bad=False, skipped=0, chunk=2):
    """[(row, "where")] -> KTODataset: each row's prompt with its own completion and with its KL partner's (runs of
    `chunk` rows), through the chat template; truncated to max_seq_length + 1 tokens; an example is kept while both
    its rows keep a target."""
    parsed, bad = encode_each(rows, lambda row, where: (*kto_messages(row, where), row["label"], where), skip_bad)
    partner = kl_partners(len(parsed), chunk)
    paired = [({"prompt": p, "chosen": c, "rejected": parsed[partner[k]][1], "label": label}, where)
              for k, (p, c, label, where) in enumerate(parsed)]
    encoded, bad_template = encode_each(paired, lambda row, where: (*encode_pair(tokenizer, row, where), row["label"]),
                                        skip_bad)
    pairs, labels, truncated = [], [], 0
    for own, kl, start, label in encoded:
        if max(len(own), len(kl)) > max_seq_length + 1:
            own, kl, truncated = own[: max_seq_length + 1], kl[: max_seq_length + 1], truncated + 1
        if min(len(own), len(kl)) - 1 > start:
            pairs.append((own, kl, start))
            labels.append(label)
    out = KTODataset(pairs, labels, truncated)
    out.skipped = skipped + bad + bad_template
    return out


def label_warning(dataset, split):
    """A warning line for a split whose examples are all of one label (KTO then only pushes rewards one way)."""
    if dataset.labels and len(set(dataset.labels)) == 1:
        kind = "desirable (label true)" if dataset.labels[0] else "undesirable (label false)"
        return (f"every {split} example is {kind}: KTO will only push its rewards "
                f"{'up' if dataset.labels[0] else 'down'} against the KL reference point")
    return None


class KTO(PairObjective):
    """KTO against a reference model (the base with the adapter off, or --reference-adapter-path). A batch of B
    examples is 2B rows: their completions, then their KL completions; every stat is a mean over the examples
    (the rewards and logps over the examples of their label)."""
    name = "kto"
    stats = KTO_STATS
    needs_reference = True
    data_kind = "labelled completions"

    def __init__(self, beta=0.1, desirable_weight=1.0, undesirable_weight=1.0):
        super().__init__(beta)
        self.desirable_weight, self.undesirable_weight = desirable_weight, undesirable_weight

    @classmethod
    def from_config(cls, c):
        cls.check(c)
        if c.dpo_cpo_loss_type != "sigmoid" or c.rpo_alpha:
            raise ConfigError("--dpo-cpo-loss-type and --rpo-alpha are DPO's: --loss kto has neither")
        problems = [(c.batch_size > 1, "--loss kto needs --batch-size 2 or more: its KL reference point comes from "
                                       "the batch's mismatched completions, which one example does not have"),
                    (c.desirable_weight > 0, "desirable_weight must be > 0"),
                    (c.undesirable_weight > 0, "undesirable_weight must be > 0")]
        cls.require(problems)
        return cls(beta_of(c), c.desirable_weight, c.undesirable_weight)

    def load_data(self, tokenizer, c):
        data = load_preference_datasets(tokenizer, c.data, c.max_seq_length, c.skip_bad_rows, check_kto_row,
                                        partial(encode_kto, chunk=c.batch_size), EXPECTED)
        warning = label_warning(data["train"], "train")
        if warning:
            data["train"].warnings.append(warning)
        return data

    def make_batch(self, dataset, items, packed=False):
        batch = super().make_batch(dataset, items, packed)
        desirable = mx.array([1.0 if dataset.labels[i] else 0.0 for i in items])
        return self.batch(batch.inputs, batch.targets, batch.mask, **batch.fields, desirable=desirable)

    def loss_stats(self, nll, batch):
        return kto_stats(nll, batch.mask.astype(nll.dtype), batch.fields["desirable"], self.beta,
                         batch.fields.get("reference"), self.desirable_weight, self.undesirable_weight)

    def describe(self, stats, split):
        """As TRL logs them: rewards chosen / rejected, margin, KL, and each label's mean summed log-prob."""
        return (f"Rewards chosen {stats['rewards_chosen']:.3f} / rejected {stats['rewards_rejected']:.3f}, "
                f"Margin {stats['reward_margin']:.3f}, KL {stats['kl']:.3f}, "
                f"Logps chosen {stats['logps_chosen']:.2f} / rejected {stats['logps_rejected']:.2f}")

    def brief(self, stats):
        return f"margin {stats['reward_margin']:.3f}, kl {stats['kl']:.3f}"
