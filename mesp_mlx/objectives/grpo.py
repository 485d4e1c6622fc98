"""GRPO: learning from rewards on the model's own answers (ops/grpo.py has the loss, rewards.py the reward
functions).

A row is {"prompt": str or messages, "answer": ... (optional; what `exact` compares with), any other field} with
an optional "system", or {"messages": [...]} whose messages are the prompt (a trailing assistant message, the
reference answer, is dropped and becomes "answer" when the row has none). The prompt is rendered through the chat
template with the generation prompt (its plain encoding without a template).

A training batch of P prompts becomes N = P G rows, made before the step (`prepare`): the run's generator
(sampler.py: a key/value cache, the G answers of a prompt in one batch with the other prompts') samples G answers
per prompt from the adapter being trained, at --temperature and --top-p, up to --max-completion-length tokens;
each answer is scored by every reward function and their sum is its reward; advantages are normalised within each
prompt's group. The rows are then an ordinary masked batch (prompt + answer, only the answer's tokens count, its
stop token included), so the blocks stream and recompute exactly as in SFT and only the head's loss differs. With
--beta > 0 the reference model's per-token log-probabilities of the sampled rows are computed with a forward only
(the base with the adapter off, or --reference-adapter-path). Every row is at most the prompt's length plus
--max-completion-length: what the memory planner is told.
"""
import mlx.core as mx
import numpy as np

from ..data import Dataset, collate, encode_each, local_splits, read_jsonl, resolve_data, token_ids
from ..errors import DataError
from ..model import prompt_ids
from ..ops.grpo import LOSS_TYPES, SCALED, advantages, grpo_stats
from ..sampler import Sampling
from .base import Objective
from .preference import _messages, with_system
from .rewards import reward_functions, score


def check_prompt_row(row):
    if not (isinstance(row, dict) and ("prompt" in row or "messages" in row)):
        return "expected a GRPO row with 'prompt' (and 'answer'), or 'messages'"
    return None


def prompt_messages(row, where):
    """-> (the prompt as the reward functions see it: its text, or its messages; the messages to render; the row
    as the reward functions see it)."""
    if "prompt" in row:
        prompt = row["prompt"]
    else:
        prompt = row["messages"]
        last = prompt[-1] if isinstance(prompt, list) and prompt else None
        if isinstance(last, dict) and last.get("role") == "assistant":  # the reference answer
            row, prompt = dict(row, answer=row.get("answer", last.get("content"))), prompt[:-1]
    return prompt, with_system(row, _messages(prompt, "prompt", where), where), row


class PromptDataset(Dataset):
    """prompts: [(ids, prompt as given, row, "file:line")]; `examples` holds each prompt's ids followed by room for
    the longest answer, so length grouping and the memory planner see the longest row a sample can make."""

    def __init__(self, prompts, room):
        super().__init__([(ids + [0] * room, len(ids)) for ids, _, _, _ in prompts], chat=True)
        self.prompts = prompts


def encode_prompts(tokenizer, rows, max_seq_length, room, skip_bad=False, skipped=0):
    def encode(row, where):
        prompt, messages, row = prompt_messages(row, where)
        if getattr(tokenizer, "chat_template", None):
            try:
                ids = token_ids(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))
            except Exception as e:
                raise DataError(f"{where}: the chat template rejected this row ({type(e).__name__}: {e})") from None
        else:
            ids = prompt_ids(tokenizer, "\n".join(m["content"] for m in messages), chat=False)
        if len(ids) + room > max_seq_length + 1:
            raise DataError(f"{where}: the prompt ({len(ids)} tokens) and a {room}-token answer do not fit "
                            f"--max-seq-length {max_seq_length}; shorten the prompt, lower --max-completion-length "
                            "or raise --max-seq-length")
        return ids, prompt, row, where

    prompts, bad = encode_each(rows, encode, skip_bad)
    out = PromptDataset(prompts, room)
    out.skipped = skipped + bad
    return out


class GRPO(Objective):
    name = "grpo"
    packs = False

    def __init__(self, functions, group_size=4, max_completion_length=64, temperature=1.0, top_p=1.0,
                 loss_type="grpo", epsilon=0.2, epsilon_high=None, beta=0.0):
        self.functions, self.group_size = functions, group_size
        self.sampling = Sampling(max_completion_length, temperature, top_p)
        self.loss_type, self.beta = loss_type, beta
        self.eps_low, self.eps_high = epsilon, epsilon if epsilon_high is None else epsilon_high
        self.rows_per_example = group_size
        self.stats = ("loss", "reward", "reward_std", *[f"reward_{n}" for n, _ in functions], "completion_length",
                      "clip_ratio", "kl", "sample_seconds", "sample_peak_gb")

    @classmethod
    def from_config(cls, c):
        beta = 0.0 if c.beta is None else c.beta
        problems = [(c.method != "mezo", "--loss grpo needs exact gradients: use --method mesp, mebp or autodiff"),
                    (not (c.pack or c.hf_dataset), "--loss grpo reads prompts from local jsonl files, unpacked (no "
                                                   "--pack, no hf_dataset)"),
                    (c.group_size >= 2, "group_size must be >= 2: advantages compare the answers to one prompt"),
                    (c.max_completion_length >= 1, "max_completion_length must be >= 1"),
                    (c.temperature > 0, "--loss grpo samples: temperature must be > 0 (at 0 a group's answers are "
                                        "all the same and carry no signal)"),
                    (0 < c.top_p <= 1, "top_p must be in (0, 1]"),
                    (c.grpo_loss_type in LOSS_TYPES, f"grpo_loss_type must be one of {', '.join(LOSS_TYPES)}"),
                    (c.epsilon > 0 and (c.epsilon_high is None or c.epsilon_high > 0), "epsilon must be > 0"),
                    (beta >= 0, "beta must be >= 0 (GRPO's weight of the KL to the reference)"),
                    (beta > 0 or not c.reference_adapter_path, "--reference-adapter-path needs --beta > 0 with "
                                                               "--loss grpo (the KL term is its only use)"),
                    (c.dpo_cpo_loss_type == "sigmoid" and not c.rpo_alpha, "--dpo-cpo-loss-type and --rpo-alpha are "
                                                                           "DPO's")]
        cls.require(problems)
        cls.refuse_label_weights(c)
        return cls(reward_functions(c.reward_functions, c.format_pattern), c.group_size, c.max_completion_length,
                   c.temperature, c.top_p, c.grpo_loss_type, c.epsilon, c.epsilon_high, beta)

    def load_data(self, tokenizer, c):
        root = resolve_data(c.data)
        if not root.exists():
            raise DataError(f"{root}: no such data file or directory (GRPO prompts are read from local jsonl files)")

        def load(path):
            rows, skipped = read_jsonl(path, c.skip_bad_rows, check_prompt_row)
            return encode_prompts(tokenizer, rows, c.max_seq_length, self.sampling.max_tokens, c.skip_bad_rows,
                                  skipped)
        out = local_splits(root, load)
        if not out.get("train"):
            raise DataError(f"{root}: no prompts (expected train.jsonl with 'prompt' and 'answer')")
        return out

    def make_batch(self, dataset, items, packed=False):
        """The batch of prompts `items`, to be sampled by `prepare`."""
        return self.batch(None, None, None, prompts=[dataset.prompts[i] for i in items])

    def prepare(self, batch, rollout):
        """Samples the batch's answers from the model being trained and scores them (module docstring)."""
        if batch.inputs is not None:
            return batch
        g, prompts = self.group_size, batch.fields["prompts"]
        replies = rollout.generator.generate([ids for ids, _, _, _ in prompts for _ in range(g)], rollout.params,
                                             rollout.scale, self.sampling, rollout.stops, key=rollout.key)
        rows, rewards = [], []
        for k, reply in enumerate(replies):
            ids, prompt, row, where = prompts[k // g]
            text = rollout.tokenizer.decode(reply.tokens)
            rewards.append(score(self.functions, prompt, text, row, f"{where} (answer {k % g + 1} of {g})"))
            rows.append((ids + reply.tokens + ([reply.stop] if reply.stop is not None else []), len(ids)))
        inputs, targets, mask = collate(rows)
        per_fn = np.array(rewards, np.float32)
        total = mx.array(per_fn.sum(axis=1))
        fields = dict(advantages=advantages(total, g, SCALED[self.loss_type]), reward=mx.mean(total),
                      reward_std=mx.mean(mx.sqrt(mx.var(total.reshape(-1, g), axis=1, ddof=1))),
                      completion_length=mx.mean(mx.sum(mask, axis=1)),
                      sample_seconds=mx.array(rollout.generator.last["seconds"]),
                      sample_peak_gb=mx.array(rollout.generator.last["peak_bytes"] / 1e9))
        for j, (name, _) in enumerate(self.functions):
            fields[f"reward_{name}"] = mx.array(float(per_fn[:, j].mean()))
        if self.beta:
            fields["reference"] = rollout.reference(inputs, targets)
        return self.batch(inputs, targets, mask, **fields)

    def weight(self, batch):
        return mx.array(batch.inputs.shape[0], mx.float32)

    def loss_stats(self, nll, batch):
        f = batch.fields
        out = grpo_stats(nll, batch.mask, f["advantages"], self.loss_type, self.eps_low, self.eps_high, self.beta,
                         f.get("reference"), self.sampling.max_tokens)
        for name in self.stats:
            if name not in out:
                out[name] = f[name].astype(nll.dtype)
        return out

    def describe(self, stats, split):
        parts = ", ".join(f"{n} {stats[f'reward_{n}']:.3f}" for n, _ in self.functions)
        return (f"Reward {stats['reward']:.3f} (std {stats['reward_std']:.3f}; {parts}), completion length "
                f"{stats['completion_length']:.1f}, Clip ratio {stats['clip_ratio']:.3f}, KL {stats['kl']:.4f}, "
                f"sampled in {stats['sample_seconds']:.1f} s (peak {stats['sample_peak_gb']:.3f} GB)")

    def brief(self, stats):
        return f"reward {stats['reward']:.3f}, length {stats['completion_length']:.0f}"
