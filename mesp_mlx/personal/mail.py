"""Mail folders as the standard library's `mailbox` reads them: an mbox file (Thunderbird, Apple Mail and Google
Takeout exports: messages separated by "From " lines) or a Maildir folder (cur/ new/ tmp/). Each message keeps its
sender (name and address), date, Message-ID and the message it replies to (In-Reply-To, else the last of its
References); the body is its text part (HTML reduced to text when there is none) with quoted text, the attribution
line above it ("On ... wrote:"), forwarded copies and the signature cut off, so what is left is what its sender wrote.

Threading happens after every source is read (`threads`): a reply in Sent and the message it answers in Inbox are
usually two folders. A thread reaches the rows as the chain that leads to each message, whose last message is the
only candidate answer (the chain is that answer's context)."""
import email
import email.errors
import email.policy
import email.utils
import mailbox
import re
from datetime import timezone
from html.parser import HTMLParser

from ..errors import DataError
from .common import Conversation, Found, Mail, Message, clean_name, head_bytes

KIND = "mail"
MAX_DEPTH = 100  # a chain longer than this is a References loop, not a conversation
_ATTRIBUTION = re.compile(r"^(on\s.+|am\s.+|le\s.+|el\s.+|il\s.+)(wrote|schrieb|a écrit|escribió|ha scritto)\s*:$",
                          re.IGNORECASE | re.DOTALL)
_CUT = re.compile(r"^(-{2,}\s*(original message|ursprüngliche nachricht|forwarded message|weitergeleitete "
                  r"nachricht)\s*-{2,}|_{10,}|begin forwarded message:)$", re.IGNORECASE)
_MOBILE = re.compile(r"^(sent from my \w+.*|von meinem \w+.* gesendet|get outlook for \w+.*)$", re.IGNORECASE)


def sniff(path):
    if path.is_dir():
        return (path / "cur").is_dir() and (path / "new").is_dir()
    return path.is_file() and head_bytes(path, 5) == b"From "


def read(path):
    parse = lambda f: email.message_from_binary_file(f, policy=email.policy.default)  # noqa: E731
    try:
        box = mailbox.Maildir(str(path), factory=parse, create=False) if path.is_dir() else \
            mailbox.mbox(str(path), factory=parse, create=False)
        keys = list(box.keys())
    except (OSError, mailbox.Error) as e:
        raise DataError(f"{path}: not a readable mail folder ({e})") from None
    found = Found(KIND, str(path), chats=1)
    for key in keys:
        try:
            msg = box[key]
            item = _mail(msg, path, key)
        except (LookupError, ValueError, TypeError, UnicodeError, email.errors.MessageError):
            found.dropped["unreadable mail"] += 1
            continue
        if isinstance(item, str):
            found.dropped[item] += 1
        else:
            found.mails.append(item)
    return found


def _mail(msg, path, key):
    date = msg["Date"]
    try:
        when = email.utils.parsedate_to_datetime(str(date)) if date is not None else None
    except (TypeError, ValueError):
        when = None
    if when is None:
        return "mail without a date"
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    name, addr = email.utils.parseaddr(str(msg["From"] or ""))
    if not (name or addr):
        return "mail without a sender"
    body = strip_reply(body_text(msg))
    if not body:
        return "empty message"
    mid = _ids(msg["Message-ID"])
    parent = _ids(msg["In-Reply-To"]) or _ids(msg["References"])
    message = Message(clean_name(name) or addr, when.timestamp(), body, (addr,))
    return Mail(str(path), mid[0] if mid else f"{path}#{key}", parent[-1] if parent else "", message)


def _ids(header):
    return re.findall(r"<([^<>\s]+)>", str(header)) if header is not None else []


def body_text(msg):
    """The message's text: its text/plain part, else (none, or an empty one) its HTML as text; '' when neither."""
    for kind in ("plain", "html"):
        part = msg.get_body(preferencelist=(kind,))
        if part is None:
            continue
        try:
            text = part.get_content()
        except (LookupError, UnicodeError):  # an unknown charset: the bytes as UTF-8, what cannot be decoded replaced
            text = (part.get_payload(decode=True) or b"").decode("utf-8", "replace")
        if not isinstance(text, str):
            continue
        text = html_text(text) if kind == "html" else text.replace("\r\n", "\n").replace("\r", "\n")
        if text.strip():
            return text
    return ""


def strip_reply(text):
    """What the sender wrote: the text above the attribution line, quoted block, forwarded copy or signature
    delimiter, without quoted ("> ") lines, trailing blank lines or runs of blank lines."""
    lines = text.split("\n")
    out = []
    for i, line in enumerate(lines):
        s = line.strip()
        if line in ("-- ", "--") or _CUT.match(s) or _MOBILE.match(s):
            break
        two = s + " " + lines[i + 1].strip() if i + 1 < len(lines) else s
        if _ATTRIBUTION.match(s) or (_ATTRIBUTION.match(two) and not s.endswith(":")):
            break
        if re.match(r"^from:\s", s, re.IGNORECASE) and any(re.match(r"^(sent|date|to|subject):\s", x.strip(),
                                                                     re.IGNORECASE) for x in lines[i + 1:i + 4]):
            break  # Outlook's quoted header block
        if s.startswith(">"):
            continue
        out.append(line.rstrip())
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip()


class _Text(HTMLParser):
    """HTML -> text: block elements as line breaks; scripts, styles and quoted blocks (blockquote, Gmail's
    gmail_quote) left out."""
    SKIP = {"script", "style", "blockquote", "head"}
    BREAK = {"br", "p", "div", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6"}
    VOID = {"br", "img", "hr", "meta", "link", "input", "wbr"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts, self.stack = [], []

    def handle_starttag(self, tag, attrs):
        if tag in self.BREAK:
            self.parts.append("\n")
        if tag in self.VOID:
            return
        skip = tag in self.SKIP or "gmail_quote" in (dict(attrs).get("class") or "")
        self.stack.append(skip or (self.stack[-1] if self.stack else False))

    def handle_endtag(self, tag):
        if tag in self.VOID:
            return
        if self.stack:
            self.stack.pop()
        if tag in self.BREAK:
            self.parts.append("\n")

    def handle_data(self, data):
        if not (self.stack and self.stack[-1]):
            self.parts.append(data)


def html_text(html):
    p = _Text()
    p.feed(html)
    p.close()
    lines = [" ".join(line.split()) for line in "".join(p.parts).split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def threads(mails):
    """Mail items of every mail source -> one conversation per message: the chain of messages it replies to (up to
    MAX_DEPTH) and itself, keyed by the chain's first message (the thread's root as far as the folders go). A
    message found in two folders counts once."""
    by_id = {}
    for m in mails:
        by_id.setdefault(m.message_id, m)
    out = []
    for m in by_id.values():
        chain, seen = [m], {m.message_id}
        while chain[0].parent_id in by_id and chain[0].parent_id not in seen and len(chain) < MAX_DEPTH:
            chain.insert(0, by_id[chain[0].parent_id])
            seen.add(chain[0].message_id)
        out.append(Conversation(KIND, m.source, f"mail:{chain[0].message_id}", [c.message for c in chain],
                                others=1, only_last=True))
    return out
