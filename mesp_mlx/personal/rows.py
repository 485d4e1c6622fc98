"""Conversations and notes -> training rows in your voice, and the split by time.

A chat is cut into sessions where the messages pause longer than a gap (a conversation, not years of one chat).
In a session, consecutive messages of one sender are one turn; yours are the assistant's, everyone else's the
user's (in a group, a user turn names who said what: "Name: text" lines, and consecutive turns of others are one
user turn, so the roles alternate as chat templates require). Each of your turns that answers something is a row:
the turns before it as context (at most `context_turns`, opening with a user turn, the oldest dropped first until the
row fits the token budget) and your turn as the final assistant message, the only one the loss counts
(mask_prompt). A note is plain text, cut at paragraphs (then lines) into rows that fit the budget.

`count(row) -> (tokens, tokens in the loss)` measures a candidate row as training will encode it; the rows' sizes
are its answers. The validation split holds the latest conversations (sessions, mail threads, notes) until it has a
tenth of the rows: split by time and by whole conversations, so no conversation is on both sides."""
import math
from collections import Counter
from dataclasses import dataclass

from ..errors import DataError
from .common import Conversation

NOTHING_TO_ANSWER = "your message opens the conversation (nothing to answer)"
OVER_BUDGET = "over the token budget (--max-tokens) even with one turn of context"
NOTE_OVER_BUDGET = "note line over the token budget (--max-tokens)"


@dataclass
class Row:
    row: dict  # {"messages": [...]} or {"text": ...}: the jsonl line
    source: str
    key: str  # the conversation it belongs to (split unit)
    time: float  # when your answer (or note) was written
    tokens: int
    loss_tokens: int
    group: bool = False  # the prompt names speakers (a group chat)


def sessions(conv, gap_seconds):
    """A chat -> its sessions: new one wherever two messages are more than gap_seconds apart."""
    msgs = sorted(conv.messages, key=lambda m: m.time)  # stable: same-second messages keep the file's order
    out, start = [], 0
    for i in range(1, len(msgs) + 1):
        if i == len(msgs) or msgs[i].time - msgs[i - 1].time > gap_seconds:
            out.append(Conversation(conv.kind, conv.source, f"{conv.key}@{len(out)}", msgs[start:i], conv.others))
            start = i
    return out


def turns(messages, is_me, name_speakers, clean=str):
    """Messages -> [(role, text, time of its last message)], roles alternating. clean: applied to every text and
    name that reaches a row (--redact)."""
    out = []
    for m in messages:
        role = "assistant" if is_me(m) else "user"
        text = f"{clean(m.sender)}: {clean(m.text)}" if name_speakers and role == "user" else clean(m.text)
        if out and out[-1][0] == role:
            out[-1] = (role, out[-1][1] + "\n" + text, m.time)
        else:
            out.append((role, text, m.time))
    return out


def reply_rows(conv, is_me, context_turns, budget, count, dropped, clean=str):
    """The rows of one conversation (a session or a mail chain)."""
    ts = turns(conv.messages, is_me, conv.others > 1, clean)
    for i in ([len(ts) - 1] if conv.only_last else range(len(ts))):
        role, answer, when = ts[i]
        if role != "assistant":
            continue
        context = _open_with_user(ts[max(0, i - context_turns):i])
        if not context:
            dropped[NOTHING_TO_ANSWER] += 1
            continue
        while context:
            row = {"messages": [{"role": r, "content": t} for r, t, _ in context] +
                   [{"role": "assistant", "content": answer}]}
            n, loss = count(row)
            if n <= budget:
                yield Row(row, conv.source, conv.key, when, n, loss, conv.others > 1)
                break
            context = _open_with_user(context[1:])
        else:
            dropped[OVER_BUDGET] += 1


def _open_with_user(context):
    while context and context[0][0] != "user":
        context = context[1:]
    return context


def note_rows(note, budget, count, dropped):
    """A note -> plain-text rows of at most `budget` tokens: paragraphs packed in order, a paragraph over the budget
    cut at its lines; a single line over it is dropped with a count."""
    pieces = []  # (text, its count when the first pass made one: a paragraph that fits)
    for para in note.text.split("\n\n"):
        para = para.strip()
        if not para:
            continue
        fit = count({"text": para})
        if fit[0] > budget:
            pieces += [(line, None) for line in para.split("\n") if line.strip()]
        else:
            pieces.append((para, fit))
    chunk = None  # (text, tokens, loss tokens) of the row being packed
    for piece, fit in pieces:
        if chunk is not None:
            joined = chunk[0] + "\n\n" + piece
            n, loss = count({"text": joined})
            if n <= budget:
                chunk = (joined, n, loss)
                continue
            yield _note_row(note, *chunk)
        n, loss = fit or count({"text": piece})
        if n <= budget:
            chunk = (piece, n, loss)
        else:
            dropped[NOTE_OVER_BUDGET] += 1
            chunk = None
    if chunk is not None:
        yield _note_row(note, *chunk)


def _note_row(note, text, n, loss):
    return Row({"text": text}, note.source, f"note:{note.source}", note.time, n, loss)


def split_by_time(rows, fraction=0.1):
    """-> (train, valid): valid holds the latest conversations (by their last row's time) until it has at least
    `fraction` of the rows; at least one conversation stays on each side."""
    last = {}
    for r in rows:
        last[r.key] = max(last.get(r.key, -math.inf), r.time)
    if len(last) < 2:
        raise DataError(f"all {len(rows)} rows come from one conversation: a validation split by time needs at least "
                        "two (add sources, or a smaller --gap-hours to cut a chat into more sessions)")
    order = sorted(last, key=lambda k: (last[k], k))
    size = Counter(r.key for r in rows)
    want, held, n = max(1, math.ceil(fraction * len(rows))), set(), 0
    for k in reversed(order[1:]):
        if n >= want:
            break
        held.add(k)
        n += size[k]
    train = [r for r in rows if r.key not in held]
    valid = [r for r in rows if r.key in held]
    return train, valid
