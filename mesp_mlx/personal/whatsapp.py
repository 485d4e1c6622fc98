"""WhatsApp's "Export chat" text file (`_chat.txt`, `WhatsApp Chat with ....txt`): one chat, one message per line
start, in either of the two line forms the apps write,

    [31/12/2023, 21:41:05] Name: text        (iOS; the date and time in the phone's locale)
    31/12/2023, 21:41 - Name: text           (Android)

with lines that start with neither continuing the message above (multi-line messages). The date's order (day
first, month first, year first) is the phone's and is not written down, so it is read from the dates themselves: the
order in which every date is valid and the messages run forward in time. System lines (no sender, or text marked
with a left-to-right mark: "created group", "added", the encryption notice) and placeholders of media, deleted and
view-once messages are dropped with a count; "<This message was edited>" is cut from the text."""
import calendar
import re
from datetime import datetime

from ..errors import DataError
from .common import (INVISIBLE, Conversation, Found, Message, clean_name, first_text_line, head_bytes, others,
                     read_text)

KIND = "whatsapp"
_DATE = r"(?P<date>\d{1,4}[./-]\d{1,2}[./-]\d{1,4})"
_TIME = r"(?P<time>\d{1,2}[:.]\d{2}(?:[:.]\d{2})?(?:[\s\u202f]?[AaPp]\.?\s?[Mm]\.?)?)"
FORMS = {"ios": re.compile(rf"^\u200e?\[{_DATE},?\s{_TIME}\]\s(?P<rest>.*)$"),
         "android": re.compile(rf"^\u200e?{_DATE},?\s{_TIME}\s[-\u2013]\s(?P<rest>.*)$")}
_PARTS = re.compile(r"(\d+)[./-](\d+)[./-](\d+)")
_CLOCK = re.compile(r"(\d+)[:.](\d+)(?:[:.](\d+))?(?:[\s\u202f]?([AaPp])\.?\s?[Mm]\.?)?")
# what the apps write in place of a message that has no text of the sender's (English exports)
MEDIA = ("<media omitted>", "image omitted", "video omitted", "audio omitted", "sticker omitted", "gif omitted",
         "document omitted", "contact card omitted", "null", "<view once voice message omitted>")
DELETED = ("this message was deleted", "you deleted this message")
EDITED = re.compile(r"\s*<this message was edited>\s*$", re.IGNORECASE)


def _form(line):
    """The FORMS pattern a chat's first line is written in, or None."""
    return next((f for f in FORMS.values() if line and f.match(line)), None)


def sniff(path):
    return path.is_file() and _form(first_text_line(head_bytes(path))) is not None


def read(path):
    lines = read_text(path, "WhatsApp exports are UTF-8").lstrip("\ufeff").splitlines()
    form = _form(next((line for line in lines if line.strip()), ""))
    if form is None:
        raise DataError(f"{path}: not a WhatsApp chat export (its first line is not '[date, time] Name: text' or "
                        "'date, time - Name: text')")
    records = []  # [line number, date, time, rest]; rest grows with continuation lines
    for n, line in enumerate(lines, 1):
        m = form.match(line)
        if m:
            records.append([n, m["date"], m["time"], m["rest"]])
        elif records:
            records[-1][3] += "\n" + line
    order = date_order([r[1] for r in records], any(_CLOCK.fullmatch(r[2])[4] for r in records), path)
    found = Found(KIND, str(path), chats=1)
    messages = []
    for n, date, clock, rest in records:
        t = timestamp(date, clock, order, f"{path}:{n}")
        kind, sender, body = classify(rest)
        if kind != "message":
            found.dropped[kind] += 1
            continue
        messages.append(Message(sender, t, body))
    if messages:
        found.conversations.append(Conversation(KIND, str(path), str(path), messages, others=others(messages)))
    return found


def classify(rest):
    """A message's text after the timestamp -> (what it is, sender, text): 'message', or the reason it is dropped."""
    sender, sep, body = rest.partition(": ")
    if not sep or rest.startswith("\u200e"):
        return "system line", None, None
    marked = body.startswith("\u200e")  # iOS marks system lines and media with a left-to-right mark
    plain = body.translate(INVISIBLE).strip()
    low = plain.casefold()
    if low in MEDIA or low.startswith("<attached:") or low.endswith(("(file attached)", "document omitted")) \
            or low.startswith("location: "):
        return "media placeholder", None, None
    if low.rstrip(".") in DELETED:
        return "deleted message", None, None
    if marked:
        return "system line", None, None
    plain = EDITED.sub("", plain).strip()
    if not plain:
        return "empty message", None, None
    return "message", clean_name(sender), plain


def date_order(dates, twelve_hour, path):
    """'ymd', 'dmy' or 'mdy': the order in which every date is valid and the fewest consecutive dates go back."""
    parts = [tuple(map(int, _PARTS.fullmatch(d).groups())) for d in dates]
    if dates and all(len(_PARTS.fullmatch(d)[1]) == 4 for d in dates):
        return "ymd"
    candidates = [o for o in ("dmy", "mdy") if all(_valid(p, o) for p in parts)]
    if not candidates:
        raise DataError(f"{path}: its dates fit no day/month order (day first, month first or year first)")
    if len(candidates) == 1:
        return candidates[0]
    back = {o: sum(_ymd(a, o) > _ymd(b, o) for a, b in zip(parts, parts[1:])) for o in candidates}
    if back["dmy"] != back["mdy"]:
        return min(back, key=back.get)
    return "mdy" if twelve_hour else "dmy"  # both fit and both run forward: a 12-hour clock is the US locale's


def _ymd(p, order):
    d, m, y = {"dmy": (p[0], p[1], p[2]), "mdy": (p[1], p[0], p[2]), "ymd": (p[2], p[1], p[0])}[order]
    return (y + 2000 if y < 100 else y, m, d)


def _valid(p, order):
    y, m, d = _ymd(p, order)
    try:
        datetime(y, m, d)
    except ValueError:
        return False
    return True


def timestamp(date, clock, order, where):
    y, mo, d = _ymd(tuple(map(int, _PARTS.fullmatch(date).groups())), order)
    h, mi, s, ampm = _CLOCK.fullmatch(clock).groups()
    h = int(h)
    if ampm:
        h = h % 12 + (12 if ampm in "Pp" else 0)
    try:
        return float(calendar.timegm(datetime(y, mo, d, h, int(mi), int(s or 0)).timetuple()))
    except ValueError:
        raise DataError(f"{where}: {date} {clock} is not a date and time in the order of the file's other dates "
                        f"({order})") from None
