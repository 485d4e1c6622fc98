"""The retention check: does the fine-tuned model still know what its base knew?

A personalised model that has forgotten general knowledge is worse than none, and a user on a device has no
benchmark suite to notice. So a run scores the model twice, the base (adapter off) before training and the adapted
model after it, on a small set shipped with the package (or the user's own, --retention-data): questions with
checkable answers, answered greedily (an answer counts when one of its accepted forms appears as a word in the
reply), and the mean next-token loss on a short general text. The replies come from the run's generator (a key/value
cache, all questions as one batch, the weights held only as the run's memory allows: sampler.py), the loss from the
run's engine, so the check stays within the run's memory; a reply stops at the family's stop ids, at `max_tokens`, or
as soon as an accepted form has appeared.

The questions go through the model's chat template whenever its tokenizer has one, whatever the run trains on: the
knowledge is asked for as a user of the model asks (an instruct model given a bare question continues it instead
of answering: SmolLM2-135M-Instruct answers 0 of the ten so, 7 through its template), so a run on raw text (the
code recipe) is checked the same way as a chat run.

A set is a folder with `questions.jsonl` (rows {"prompt": str, "answers": [str, ...]}) and `general.txt`.
"""
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from .errors import DataError
from .model import prompt_ids
from .models import stop_ids
from .objectives import SFT
from .sampler import Generator, Sampling

SHIPPED = Path(__file__).parent / "data" / "retention"
# the longest reply a question gets: a persona may open with a greeting before the answer ("Ahoy! By the compass
# and the chart: 7 times 8 is 56" puts it at the 16th token); a reply that has the answer stops there
MAX_TOKENS = 32


@dataclass
class RetentionSet:
    questions: list  # [(prompt ids, [accepted answer patterns])]
    text: list  # the general text's token ids


def _pattern(answer):
    """An accepted form as a whole word (so '7' is not found in '17'), case-insensitive."""
    return re.compile(r"(?<!\w)" + re.escape(answer) + r"(?!\w)", re.IGNORECASE)


def load_retention_set(path, tokenizer, chat, context, max_tokens):
    """The set in folder `path` (None: the shipped one), encoded; DataError, naming the file and line, for a row
    that is not a question with answers or a prompt that cannot fit the model's context with its reply."""
    root = Path(path) if path else SHIPPED
    qfile, tfile = root / "questions.jsonl", root / "general.txt"
    for f in (qfile, tfile):
        if not f.is_file():
            raise DataError(f"{f}: missing (a retention set is a folder with questions.jsonl and general.txt)")
    questions = []
    for n, line in enumerate(qfile.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{qfile}:{n}: not a valid JSON line ({e})") from None
        if not (isinstance(row, dict) and isinstance(row.get("prompt"), str) and isinstance(row.get("answers"), list)
                and row["answers"] and all(isinstance(a, str) and a.strip() for a in row["answers"])):
            raise DataError(f"{qfile}:{n}: expected {{\"prompt\": str, \"answers\": [str, ...]}}")
        try:
            ids = prompt_ids(tokenizer, row["prompt"], chat)
        except Exception as e:
            raise DataError(f"{qfile}:{n}: the model's chat template rejected this prompt ({type(e).__name__}: "
                            f"{e})") from None
        if len(ids) + max_tokens > context:
            raise DataError(f"{qfile}:{n}: the prompt ({len(ids)} tokens) and a {max_tokens}-token answer do not "
                            f"fit the model's context of {context} tokens")
        questions.append((ids, [_pattern(a.strip()) for a in row["answers"]]))
    text = list(tokenizer.encode(tfile.read_text(encoding="utf-8")))
    if not questions or len(text) < 2:
        raise DataError(f"{root}: a retention set needs at least one question and a general text")
    return RetentionSet(questions, text)


def answers_correct(generator, tokenizer, questions, lora, scale, stops, max_tokens):
    """Greedy replies to all questions at once (one batch; a row leaves it when an accepted form has appeared in
    its reply, at a stop id, or after max_tokens) -> how many were answered correctly."""
    right = lambda i, out: any(p.search(tokenizer.decode(out)) for p in questions[i][1])
    replies = generator.generate([ids for ids, _ in questions], lora, scale, Sampling(max_tokens), stops,
                                 finished=right)
    return sum(right(i, r.tokens) for i, r in enumerate(replies))


def general_loss(engine, params, text, seq_len):
    """Mean next-token loss over the text, in rows of at most seq_len targets (token-weighted)."""
    total, count = 0.0, 0
    for i in range(0, len(text) - 1, seq_len):
        ids = mx.array([text[i: i + seq_len + 1]])
        if ids.shape[1] < 2:
            continue
        n = ids.shape[1] - 1
        loss = engine.loss(params, SFT().batch(ids[:, :-1], ids[:, 1:], mx.ones((1, n))))["loss"].item()
        total, count = total + loss * n, count + n
    return total / count


def score(generator, tokenizer, rset, engine, params, scale, seq_len, max_tokens=MAX_TOKENS):
    """{"answers": questions answered correctly, "questions": how many, "general_loss": mean loss on the text} of the
    model with `params` (an empty dict: the base)."""
    stops = stop_ids(tokenizer, generator.store.args.model_type)
    right = answers_correct(generator, tokenizer, rset.questions, params or None, scale, stops, max_tokens)
    return {"answers": right, "questions": len(rset.questions),
            "general_loss": general_loss(engine, params, rset.text, seq_len)}


class RetentionCheck:
    """A run's check: the set loaded and checked when built (before any training), `before()` scores the base,
    `after(params)` the adapted model -> (the report line, the metrics record)."""

    def __init__(self, generator, tokenizer, engine, config, max_tokens=MAX_TOKENS):
        self.generator, self.tokenizer, self.engine = generator, tokenizer, engine
        store = generator.store
        self.scale, self.seq_len, self.max_tokens = config.scale, config.max_seq_length, max_tokens
        self.set = load_retention_set(config.retention_data, tokenizer, True, store.args.max_position_embeddings,
                                      max_tokens)
        self.base = None

    def _score(self, params):
        """The score, with the seconds it took under "seconds" (the check's cost, reported with it)."""
        t0 = time.perf_counter()
        out = score(self.generator, self.tokenizer, self.set, self.engine, params, self.scale, self.seq_len,
                    self.max_tokens)
        return dict(out, seconds=time.perf_counter() - t0)

    def before(self):
        self.base = b = self._score({})
        return (f"knowledge before training: {b['answers']}/{b['questions']} answers, general-text loss "
                f"{b['general_loss']:.3f} (scored in {b['seconds']:.1f} s)")

    def after(self, params):
        base, now = self.base, self._score(params)
        change = (now["general_loss"] - base["general_loss"]) / base["general_loss"]
        line = (f"knowledge kept: {now['answers']}/{now['questions']} answers (base {base['answers']}/"
                f"{base['questions']}), general-text loss {base['general_loss']:.3f} -> {now['general_loss']:.3f} "
                f"({change:+.1%}; scored in {now['seconds']:.1f} s)")
        return line, {"retention_answers": now["answers"], "retention_answers_base": base["answers"],
                      "retention_questions": now["questions"], "general_loss": now["general_loss"],
                      "general_loss_base": base["general_loss"], "retention_seconds": now["seconds"]}
