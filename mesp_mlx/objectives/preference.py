"""Preference objectives (DPO, ORPO; ops/preference.py has their math): rows encoded as mlx-lm-lora encodes them,
batched as pairs, and the reference model's log-probabilities of each row computed once and cached beside the
adapter.

A row is {"prompt", "chosen", "rejected"} with an optional "system" (strings, or "prompt" a list of messages), or
chat-style {"chosen": [...], "rejected": [...]} message lists (with a "prompt" string or list, the lists are the
answers; without one, the messages the two lists share form the prompt, as TRL's implicit prompt). Each answer is
rendered through the chat template after the prompt's messages; the loss counts only the answer's tokens, from the
length of the prompt rendered with the generation prompt on (mlx-lm-lora's DPODataset / ORPODataset rule).

KTO (kto.py) reuses this module's encoding, batching and reference cache: its examples are two rows each, its own
completion and a KL completion, held as a pair's two rows are.

DPO's and KTO's reference is the base with the adapter off, or a reference adapter: its scores come from a streamed
forward without a backward (model.hidden_states reads one block at a time) and the chunked head, once per row, and
are kept in `reference_logps.json` beside the adapter, keyed by the model, the reference adapter and each row's
tokens, and saved after every batch, so an interrupted run and every later run on the same rows reuse them.
"""
import hashlib
import json
import os
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..data import Dataset, collate, encode_each, local_splits, read_jsonl, resolve_data, token_ids
from ..errors import ConfigError, DataError
from ..model import hidden_states
from ..ops.preference import DPO_VARIANTS, STATS, dpo_stats, orpo_stats, reference_logps
from ..ops.rmsnorm import rmsnorm_forward
from .base import Objective

REFERENCE_FILE = "reference_logps.json"


def _messages(value, what, where):
    if isinstance(value, str):
        return [{"role": "assistant" if what != "prompt" else "user", "content": value}]
    if isinstance(value, list) and value and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                 and isinstance(m.get("content", ""), str) for m in value):
        return list(value)
    raise DataError(f"{where}: '{what}' must be a string or a non-empty list of {{\"role\": str, \"content\": str}}")


def pair_messages(row, where):
    """-> (prompt messages, chosen answer messages, rejected answer messages)."""
    if not isinstance(row, dict) or not {"chosen", "rejected"} <= row.keys():
        raise DataError(f"{where}: expected a preference row with 'chosen' and 'rejected' (and 'prompt')")
    chosen, rejected = _messages(row["chosen"], "chosen", where), _messages(row["rejected"], "rejected", where)
    if "prompt" in row:
        prompt = _messages(row["prompt"], "prompt", where)
    elif isinstance(row["chosen"], list) and isinstance(row["rejected"], list):
        k = 0
        while k < min(len(chosen), len(rejected)) - 1 and chosen[k] == rejected[k]:
            k += 1
        prompt, chosen, rejected = chosen[:k], chosen[k:], rejected[k:]
    else:
        raise DataError(f"{where}: 'prompt' is missing (it may be left out only when 'chosen' and 'rejected' are "
                        "message lists that share it)")
    return with_system(row, prompt, where), chosen, rejected


def with_system(row, messages, where):
    """The prompt's messages with the row's optional "system" string first."""
    if "system" not in row:
        return messages
    if not isinstance(row["system"], str):
        raise DataError(f"{where}: 'system' must be a string")
    return [{"role": "system", "content": row["system"]}] + messages


def encode_pair(tokenizer, row, where):
    """-> (chosen ids, rejected ids, prompt length): both answers after the same prompt, through the chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{where}: preference rows need a tokenizer with a chat template")
    prompt, chosen, rejected = pair_messages(row, where)
    try:
        c = token_ids(tokenizer.apply_chat_template(prompt + chosen, tokenize=True))
        r = token_ids(tokenizer.apply_chat_template(prompt + rejected, tokenize=True))
        start = len(token_ids(tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True)))
    except Exception as e:
        raise DataError(f"{where}: the chat template rejected this row ({type(e).__name__}: {e})") from None
    return c, r, start


def check_pair_row(row):
    if not (isinstance(row, dict) and {"chosen", "rejected"} <= row.keys()):
        return ("expected a preference row with 'prompt', 'chosen' and 'rejected' (or 'chosen' and 'rejected' "
                "message lists)")
    return None


class PairDataset(Dataset):
    """Pairs (chosen ids, rejected ids, prompt length). `examples` holds the longer row of each pair with the
    prompt length, so length grouping and the memory planner see the longer answer; `reference` holds each pair's
    reference scores (chosen, rejected) once computed; `unit`: what one example is called in the run's log."""
    unit = "pair"

    def __init__(self, pairs, truncated=0):
        super().__init__([(max(c, r, key=len), s) for c, r, s in pairs], truncated, chat=True)
        self.pairs, self.reference = pairs, None


def encode_pairs(tokenizer, rows, max_seq_length, skip_bad=False, skipped=0):
    encoded, bad = encode_each(rows, lambda row, where: encode_pair(tokenizer, row, where), skip_bad)
    pairs, truncated = [], 0
    for c, r, start in encoded:
        if max(len(c), len(r)) > max_seq_length + 1:
            c, r, truncated = c[: max_seq_length + 1], r[: max_seq_length + 1], truncated + 1
        if min(len(c), len(r)) - 1 > start:  # both answers keep at least one target
            pairs.append((c, r, start))
    out = PairDataset(pairs, truncated)
    out.skipped = skipped + bad
    return out


def load_preference_datasets(tokenizer, data, max_seq_length, skip_bad=False, check=check_pair_row, encode=encode_pairs,
                             expected="preference pairs (expected train.jsonl with 'prompt', 'chosen', 'rejected')"):
    """train.jsonl / valid.jsonl / test.jsonl of preference rows (a folder, or one file as the train split): each
    file's rows checked by check(row) -> a problem or None, then encode(tokenizer, rows, max_seq_length, skip_bad,
    skipped) -> its dataset (pairs by default; KTO's labelled completions)."""
    root = resolve_data(data)
    if not root.exists():
        raise DataError(f"{root}: no such data file or directory (preference data is read from local jsonl files)")
    def load(path):
        rows, skipped = read_jsonl(path, skip_bad, check)
        return encode(tokenizer, rows, max_seq_length, skip_bad, skipped)

    out = local_splits(root, load)
    if not out.get("train"):
        raise DataError(f"{root}: no {expected}")
    return out


DEFAULT_BETA = 0.1


def beta_of(c):
    """The run's beta: the flag's, or the preference objectives' default."""
    return DEFAULT_BETA if c.beta is None else c.beta


class PairObjective(Objective):
    """A loss over pairs: a batch of P pairs is 2P rows, the P chosen answers then their P rejected ones, each
    masked to its answer; every stat is a mean over the pairs."""
    stats = STATS
    rows_per_example = 2
    packs = False
    data_kind = "pairs"  # what its data rows are, for its refusals

    def __init__(self, beta):
        self.beta = beta

    @classmethod
    def check(cls, c):
        problems = [(c.method != "mezo", f"--loss {c.loss} needs exact gradients: use --method mesp, mebp or "
                                         "autodiff (not mezo)"),
                    (not (c.pack or c.hf_dataset), f"--loss {c.loss} reads {cls.data_kind} from local jsonl files, "
                                                   "unpacked (no --pack, no hf_dataset)"),
                    (beta_of(c) > 0, "beta must be > 0")]
        cls.require(problems)

    def load_data(self, tokenizer, c):
        return load_preference_datasets(tokenizer, c.data, c.max_seq_length, c.skip_bad_rows)

    def make_batch(self, dataset, items, packed=False):
        rows = [(dataset.pairs[i][0], dataset.pairs[i][2]) for i in items] + [(dataset.pairs[i][1],
                                                                               dataset.pairs[i][2]) for i in items]
        fields = {}
        if self.needs_reference and dataset.reference is not None:
            fields["reference"] = mx.array([dataset.reference[i][0] for i in items]
                                           + [dataset.reference[i][1] for i in items])
        return self.batch(*collate(rows), **fields)

    def example_rows(self, dataset, i):
        chosen, rejected, _ = dataset.pairs[i]
        return [len(chosen) - 1, len(rejected) - 1]

    def weight(self, batch):
        return mx.array(batch.inputs.shape[0] // 2, mx.float32)

    def describe(self, stats, split):
        """As TRL and mlx-lm-lora print them: rewards chosen / rejected, margin, accuracy."""
        return (f"Rewards chosen {stats['rewards_chosen']:.3f} / rejected {stats['rewards_rejected']:.3f}, "
                f"Margin {stats['reward_margin']:.3f}, Accuracy {stats['accuracy']:.3f}, "
                f"Logps chosen {stats['logps_chosen']:.2f} / rejected {stats['logps_rejected']:.2f}")

    def brief(self, stats):
        return f"margin {stats['reward_margin']:.3f}, acc {stats['accuracy']:.2f}"


class DPO(PairObjective):
    """DPO against a reference model: the base with the adapter off, or with --reference-adapter-path."""
    name = "dpo"
    needs_reference = True

    def __init__(self, beta=0.1, variant="sigmoid", rpo_alpha=0.0):
        super().__init__(beta)
        self.variant, self.rpo_alpha = variant, rpo_alpha

    @classmethod
    def from_config(cls, c):
        cls.check(c)
        cls.refuse_label_weights(c)
        if c.dpo_cpo_loss_type not in DPO_VARIANTS:
            raise ConfigError(f"dpo_cpo_loss_type must be one of {', '.join(DPO_VARIANTS)}")
        if c.rpo_alpha < 0:
            raise ConfigError("rpo_alpha must be >= 0")
        return cls(beta_of(c), c.dpo_cpo_loss_type, c.rpo_alpha)

    def loss_stats(self, nll, batch):
        return dpo_stats(nll, batch.mask.astype(nll.dtype), self.beta, self.variant, batch.fields.get("reference"),
                         self.rpo_alpha)


class ORPO(PairObjective):
    """ORPO: no reference model; beta is its lambda."""
    name = "orpo"

    @classmethod
    def from_config(cls, c):
        cls.check(c)
        cls.refuse_reference_settings(c)
        cls.refuse_label_weights(c)
        return cls(beta_of(c))

    def loss_stats(self, nll, batch):
        return orpo_stats(nll, batch.mask.astype(nll.dtype), self.beta)


def model_fingerprint(store, lora=None):
    """What the reference scores depend on: the store's config and weight files, and the reference adapter."""
    h = hashlib.sha256((store.path / "config.json").read_bytes())
    for p in sorted(store.path.glob("*.safetensors")):
        h.update(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}".encode())
    for i in sorted(lora or {}):
        for path in sorted(lora[i]):
            for t in lora[i][path]:
                h.update(np.array(t.astype(mx.float32)).tobytes())
    return h.hexdigest()


def _row_key(fingerprint, pair):
    c, r, start = pair
    return hashlib.sha256(json.dumps([fingerprint, c, r, start]).encode()).hexdigest()[:32]


def _save(path, cache):
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # processes of a group on one machine may both write
    tmp.write_text(json.dumps(cache))
    os.replace(tmp, path)


def attach_reference(datasets, store, compute, out_dir, lora=None, scale=20.0, batch_pairs=4, log=print):
    """Fills each `PairDataset`'s `reference` with the reference model's summed log-probabilities of each example's
    two rows (DPO: chosen, rejected; KTO: the completion, the KL completion): those cached in
    out_dir/reference_logps.json are read, the rest computed (a forward without a backward, batch_pairs examples
    at a time) and added to the cache after every batch. A row's entry is keyed by the model and the example's
    tokens only, so it holds whichever objective asks. Returns how many examples were computed."""
    path = Path(out_dir) / REFERENCE_FILE
    try:
        cache = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError):
        cache = {}  # a damaged cache is recomputed, never trusted
    fingerprint = model_fingerprint(store, lora)  # part of every row's key: another model never matches
    rows = cache.get("rows") if isinstance(cache, dict) and isinstance(cache.get("rows"), dict) else {}
    rows = {k: v for k, v in rows.items() if isinstance(v, list) and len(v) == 2
            and all(isinstance(x, (int, float)) for x in v)}  # anything else is recomputed, never trusted
    cache = {"rows": rows}
    specs = store.args.block_specs(compute)
    eps, offset = store.args.rms_norm_eps, store.args.norm_offset
    computed, units = 0, set()
    for data in datasets:
        keys = [_row_key(fingerprint, p) for p in data.pairs]
        todo = [i for i, k in enumerate(keys) if k not in rows]
        for b in range(0, len(todo), batch_pairs):
            items = todo[b: b + batch_pairs]
            inputs, targets, mask = collate([(data.pairs[i][0], data.pairs[i][2]) for i in items]
                                            + [(data.pairs[i][1], data.pairs[i][2]) for i in items])
            x = hidden_states(store, inputs, lora, scale, specs)
            h = rmsnorm_forward(x, store.final_norm(), eps, offset).reshape(-1, x.shape[-1])
            logps = reference_logps(h, store.head_rows(), targets.reshape(-1), mask, compute).tolist()
            for j, i in enumerate(items):
                rows[keys[i]] = [logps[j], logps[len(items) + j]]
            computed += len(items)
            units.add(data.unit)
            _save(path, cache)
        data.reference = [rows[k] for k in keys]
    if computed:
        log(f"[mesp-mlx] reference log-probabilities of {computed} {'/'.join(sorted(units))}(s) computed and cached "
            f"in {path}")
    return computed
