"""`python -m mesp_mlx.prepare SOURCE ... --me NAME --out DIR`: your chat exports, mail and notes as training rows in
your own voice (DIR/train.jsonl, DIR/valid.jsonl in mlx-lm's chat format, DIR/summary.json), ready for
`python -m mesp_mlx.train --data DIR`. The command line is thin over `prepare()`.

Sources are read by `mesp_mlx.personal` (one module per kind); `--me` names the senders that are you; rows,
token budgets and the split by time are `personal/rows.py`'s. Rows are measured with the tokenizer of the model to
be trained (the default model's unless --model), through the same encoding training uses (`data.encode_row`), so
the budget is the row's real length. Privacy: nothing reads from or writes to the network (the model must be on
disk: no download is started), nothing is written outside DIR (the tokenizer of a GGUF is built in a scratch folder
inside it and removed), and what is printed or kept in summary.json is counts, file paths and names: no message
text, except the sample prompt (a user turn of the validation split, or --sample-prompt's) that the printed train
command asks the model before and after training.
"""
import argparse
import dataclasses
import json
import shlex
import sys
import tempfile
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

from .errors import ConfigError, DataError
from .personal.common import identity

CONTEXT_TURNS, MAX_TOKENS, GAP_HOURS, VALID_FRACTION = 6, 512, 6.0, 0.1
RECIPE = "recipes/my-voice.yaml"
SENDERS_LISTED = 12


def parser():
    p = argparse.ArgumentParser(prog="python -m mesp_mlx.prepare", allow_abbrev=False,
                                description="Turn your chat exports, mail and notes into training rows in your voice "
                                            "(nothing leaves this machine).")
    p.add_argument("sources", nargs="+", metavar="SOURCE",
                   help="WhatsApp chat .txt, Telegram result.json (or its folder), mbox file or Maildir folder, "
                        "Markdown note, or a folder of any of these")
    p.add_argument("--me", action="append", default=[], metavar="NAME",
                   help="a name or address you write under (repeat for several); without it the senders are listed")
    p.add_argument("--out", required=True, metavar="DIR", help="where train.jsonl, valid.jsonl and summary.json go")
    p.add_argument("--model", help="the model to be trained, whose tokenizer measures the rows (a local directory "
                                   "or GGUF file; default: the train default, smollm2-135m-instruct)")
    p.add_argument("--context-turns", type=int, default=CONTEXT_TURNS,
                   help=f"turns before your answer kept as its context (default: {CONTEXT_TURNS})")
    p.add_argument("--max-tokens", type=int, default=MAX_TOKENS,
                   help=f"token budget of a row; older context is dropped to fit (default: {MAX_TOKENS})")
    p.add_argument("--gap-hours", type=float, default=GAP_HOURS,
                   help=f"a pause this long starts a new conversation in a chat (default: {GAP_HOURS:g})")
    p.add_argument("--redact", action="store_true",
                   help="replace e-mail addresses, phone numbers and URLs with [email], [phone], [url]")
    p.add_argument("--sample-prompt", help="the prompt the train command answers before and after (default: one "
                                           "of the validation split's; '' for none)")
    return p


def main(argv=None):
    from .console import quiet_transformers
    quiet_transformers()
    a = parser().parse_args(argv)
    from .errors import MespError
    try:
        summary = prepare(a.sources, a.out, me=a.me, model=a.model, context_turns=a.context_turns,
                          max_tokens=a.max_tokens, gap_hours=a.gap_hours, redact=a.redact,
                          sample_prompt=a.sample_prompt)
    except MespError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    for line in report(summary):
        print(line)
    return 0


def prepare(sources, out, me=(), tokenizer=None, model=None, context_turns=CONTEXT_TURNS, max_tokens=MAX_TOKENS,
            gap_hours=GAP_HOURS, redact=False, sample_prompt=None):
    """Read `sources`, write out/train.jsonl, out/valid.jsonl and out/summary.json; returns the summary (a dict).
    tokenizer: measures rows (default: --model's, loaded from disk)."""
    from .personal import mail, read_sources
    from .personal.redact import redact as redact_text
    from .personal.rows import note_rows, reply_rows, sessions, split_by_time
    for ok, msg in ((context_turns > 0, "--context-turns must be > 0"), (max_tokens > 1, "--max-tokens must be > 1"),
                    (gap_hours > 0, "--gap-hours must be > 0")):
        if not ok:
            raise ConfigError(msg)
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: a file, not a folder")
    found = read_sources(sources, skip=[out])  # a DIR inside a source folder is not read back as a source
    chats = [s for f in found for c in f.conversations for s in sessions(c, gap_hours * 3600)]
    threads = mail.threads([m for f in found for m in f.mails])
    messages = [m for f in found for m in f.messages()]
    me_ids = check_me(me, messages)
    is_me = lambda m: bool(m.identities() & me_ids)  # noqa: E731
    clean = redact_text if redact else str

    made = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"{out}: cannot create it ({e.strerror or e})") from None
    try:
        if tokenizer is None:
            with tempfile.TemporaryDirectory(dir=out, prefix=".tokenizer-") as scratch:
                tokenizer = load_tokenizer(model, scratch)
        dropped = {f.source: Counter(f.dropped) for f in found}
        rows = []
        for conv in chats + threads:
            count = _counter(tokenizer, conv.source)
            rows += reply_rows(conv, is_me, context_turns, max_tokens, count, dropped[conv.source], clean)
        for f in found:
            for note in f.notes:
                note = dataclasses.replace(note, text=clean(note.text))
                rows += note_rows(note, max_tokens, _counter(tokenizer, note.source), dropped[note.source])
        dropped_total = Counter()
        for c in dropped.values():
            dropped_total.update(c)
        if not rows:
            n = len(messages)
            raise DataError(f"{', '.join(map(str, sources))}: no training rows ({n} message{'s' * (n != 1)}, "
                            f"{sum(map(is_me, messages))} of them yours" +
                            (f"; dropped: {_counts(dropped_total)}" if dropped_total else "") + "); nothing written")
        rows.sort(key=lambda r: (r.time, r.key))
        train, valid = split_by_time(rows, VALID_FRACTION)
        prompt = choose_prompt(valid) if sample_prompt is None else (sample_prompt or None)
        summary = _summary(found, chats + threads, rows, train, valid, dropped, dropped_total, is_me, me, prompt, out,
                           dict(model=model, context_turns=context_turns, max_tokens=max_tokens, gap_hours=gap_hours,
                                redact=redact))
        write_rows(out, {"train.jsonl": [r.row for r in train], "valid.jsonl": [r.row for r in valid]}, summary)
    except BaseException:
        if made and not any(out.iterdir()):
            out.rmdir()  # an error leaves no trace: not even the folder it would have written
        raise
    return summary


def check_me(me, messages):
    """The identities `--me` names; an error that lists the senders when it is missing or names nobody."""
    if not messages:  # notes alone: every word is yours
        return set()
    if not me:
        raise ConfigError(f"say which sender is you with --me NAME (repeat it for each name or address you write "
                          f"under); the senders found: {_senders(messages)}")
    known = {i for m in messages for i in m.identities()}
    missing = [m for m in me if identity(m) not in known]
    if missing:
        raise ConfigError(f"--me {missing[0]!r} writes in none of the sources; the senders found: "
                          f"{_senders(messages)}")
    return {identity(m) for m in me}


def _senders(messages):
    """The most frequent senders with their message counts, for an error about --me."""
    senders = Counter(m.sender for m in messages)
    listed = ", ".join(f"{s} ({n})" for s, n in senders.most_common(SENDERS_LISTED))
    if len(senders) > SENDERS_LISTED:
        listed += f" and {len(senders) - SENDERS_LISTED} more"
    return listed


def load_tokenizer(model, scratch):
    """The tokenizer of `model` from disk alone: a model directory's own files, or a GGUF's vocabulary rebuilt in
    `scratch`. No download: a model that is not on this machine is an error that says how to get it."""
    from .io.gguf import open_gguf
    from .io.sources import DEFAULT_MODEL, QWEN_CODER, qwen_coder_gguf, smollm2_gguf
    from .io.tokenizer import load_tokenizer as from_dir, tokenizer_from_gguf
    if model in (None, DEFAULT_MODEL):
        path = smollm2_gguf(install=False)  # never pip: an error naming the package when it is not installed
    elif model == QWEN_CODER:
        path = qwen_coder_gguf(fetch=False)  # never pip: an error saying how to get it when it is not cached
    else:
        path = Path(model).expanduser()
    if path.is_dir():
        return from_dir(path)
    if path.is_file():
        tokenizer_from_gguf(open_gguf(path), path, scratch)
        return from_dir(scratch)
    raise ConfigError(f"--model {model}: no such directory or GGUF file (prepare reads nothing from the network: "
                      "give a local model)")


def _counter(tokenizer, where):
    """count(row) -> (tokens, tokens in the loss), as training encodes the row (prompt masked)."""
    from .data import encode_row

    def count(row):
        ids, start = encode_row(tokenizer, row, f"a row from {where}", mask_prompt=True)
        return len(ids), len(ids) - start
    return count


def choose_prompt(valid):
    """A user turn of the validation split to ask before and after training: the latest short one-line question,
    else the latest short one-line turn; a two-person conversation's before a group's (whose turns name their
    speakers); None when there is none."""
    for group in (False, True):
        short = [r.row["messages"][-2]["content"] for r in valid if "messages" in r.row and r.group == group]
        short = [t for t in short if 8 <= len(t) <= 200 and "\n" not in t]
        questions = [t for t in short if t.rstrip().endswith("?")]
        if short:
            return (questions or short)[-1]
    return None


def _counts(counts):
    """{reason: count} as "3 reason, 1 other", the most frequent first."""
    return ", ".join(f"{n} {why}" for why, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def _summary(found, convs, rows, train, valid, dropped, dropped_total, is_me, me, prompt, out, options):
    by_origin = {}
    for f in found:
        by_origin.setdefault((f.origin, f.kind), []).append(f)
    conv_keys = {(c.source, c.key) for c in convs}
    sources = []
    for (origin, kind), fs in by_origin.items():
        paths = {f.source for f in fs}
        msgs = [m for f in fs for m in f.messages()]
        notes = sum(len(f.notes) for f in fs)  # a note is a conversation and a message, and yours
        mine = [r for r in rows if r.source in paths]
        drop = Counter()
        for p in paths:
            drop.update(dropped[p])
        sources.append({
            "path": origin, "kind": kind, "files": len(fs), "chats": sum(f.chats for f in fs),
            "conversations": len({k for s, k in conv_keys if s in paths}) + notes,
            "messages": len(msgs) + notes, "yours": sum(map(is_me, msgs)) + notes,
            "rows": len(mine), "tokens": sum(r.tokens for r in mine), "dropped": dict(drop.most_common())})
    total = {k: sum(s[k] for s in sources) for k in ("conversations", "messages", "yours")}
    cmd = ["python", "-m", "mesp_mlx.train", "-c", RECIPE, "--data", str(out)]
    if options["model"]:
        cmd += ["--model", str(options["model"])]
    if options["max_tokens"] > MAX_TOKENS:  # the recipe's max_seq_length is the default budget
        cmd += ["--max-seq-length", str(options["max_tokens"])]
    if prompt:
        cmd += ["--sample-prompt", prompt]
    first_valid = min((r.time for r in valid), default=None)
    return {
        "out": str(out), "me": list(me), "options": options, "sources": sources,
        "conversations": total["conversations"], "messages": total["messages"], "yours": total["yours"],
        "rows": len(rows), "train_rows": len(train), "valid_rows": len(valid),
        "valid_conversations": len({r.key for r in valid}),
        "valid_from": datetime.fromtimestamp(first_valid, timezone.utc).isoformat() if first_valid is not None
        else None,
        "tokens": sum(r.tokens for r in rows), "loss_tokens": sum(r.loss_tokens for r in rows),
        "plain_text_rows": sum("text" in r.row for r in rows),
        "dropped": dict(dropped_total.most_common()),
        "sample_prompt": prompt, "train_command": shlex.join(cmd),
    }


def write_rows(out, files, summary):
    """Each file written beside its target and renamed over it: a file is whole or absent (and its owner's alone)."""
    from .io.adapters import atomic_write_text
    texts = {name: "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rs) for name, rs in files.items()}
    texts["summary.json"] = json.dumps(summary, ensure_ascii=False, indent=2) + "\n"
    for name, text in texts.items():
        atomic_write_text(out / name, text, DataError, private=True)


def report(s):
    """The summary as lines for the terminal: counts, never message text (the sample prompt aside)."""
    lines = []
    for src in s["sources"]:
        what = {"whatsapp": "chat", "telegram": "chat", "mail": "folder", "notes": "note"}[src["kind"]]
        lines.append(f"  {src['kind']:<9} {src['path']}: {src['chats']} {what}{'s' * (src['chats'] != 1)}, "
                     f"{src['conversations']} conversations, {src['messages']} messages ({src['yours']} yours) "
                     f"-> {src['rows']} rows")
    lines.insert(0, f"read {len(s['sources'])} source{'s' * (len(s['sources']) != 1)}: {s['conversations']} "
                    f"conversations, {s['messages']} messages, {s['yours']} yours")
    n = s["valid_conversations"]
    lines.append(f"rows: {s['rows']} (train {s['train_rows']}, valid {s['valid_rows']}: the latest "
                 f"{n} conversation{'s' * (n != 1)}, from {s['valid_from'][:10]})")
    lines.append(f"tokens: {s['tokens']:,} ({s['loss_tokens']:,} yours, the only ones in the loss); at most "
                 f"{s['options']['max_tokens']} a row")
    if s["dropped"]:
        lines.append(f"dropped: {_counts(s['dropped'])}")
    if s["plain_text_rows"] and s["plain_text_rows"] < s["rows"]:
        lines.append("note: notes are plain-text rows beside the chat rows: mesp_mlx.train reads both; "
                     "mlx_lm.lora takes the first row's format for a whole file")
    lines.append(f"wrote {s['out']}/train.jsonl, valid.jsonl, summary.json")
    lines.append(f"next: {s['train_command']}")
    return lines


if __name__ == "__main__":
    sys.exit(main())
