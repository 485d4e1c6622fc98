"""What every reader of personal data hands back, whatever the file looked like: messages (who, when, what) grouped
into conversations, notes (your own text, no one to answer), mail items still to be threaded, and counts of what was
left out and why. Readers know their file format and nothing of training rows; `rows.py` turns these into rows.

Times are POSIX seconds. A chat export's local times carry no zone, so they are read as UTC: only their order
matters (within a chat, and for the time split, where an hour's shift moves at most a conversation's side).
"""
import unicodedata
from collections import Counter
from dataclasses import dataclass, field

from ..errors import DataError

# Invisible marks chat apps put around names and system lines (left-to-right and bidi isolates, the narrow no-break
# space WhatsApp puts after "~" for senders not in the contacts); they would make one person two senders.
INVISIBLE = dict.fromkeys(map(ord, "\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\ufeff"))


def clean_name(name):
    """A sender's name as one spelling: invisible marks and WhatsApp's "~" for non-contacts removed, NFC, single
    spaces."""
    name = unicodedata.normalize("NFC", name.translate(INVISIBLE)).replace("\u202f", " ").strip()
    if name.startswith("~"):
        name = name[1:].strip()
    return " ".join(name.split())


def identity(name):
    """The key two spellings of one name share (case and Unicode form ignored); `--me` values are compared by it."""
    return unicodedata.normalize("NFKC", clean_name(name)).casefold()


@dataclass(frozen=True)
class Message:
    """One message. `sender` is the name shown to the model in group chats; `ids` are every identity it was
    written under (name, address, account id) that `--me` may name."""
    sender: str
    time: float
    text: str
    ids: tuple = ()

    def identities(self):
        return {identity(i) for i in (self.sender, *self.ids) if i}


@dataclass
class Conversation:
    """Messages in the order they were written. `key` groups conversations for the validation split (a chat
    session, a mail thread): rows of one key never land on both sides. only_last: only the final message may be
    an answer (a mail thread given as the chain that leads to one reply)."""
    kind: str
    source: str
    key: str
    messages: list
    others: int = 1  # how many other people write in the whole chat: above one, turns are prefixed with names
    only_last: bool = False


@dataclass
class Note:
    """Your own text, a row of plain text."""
    source: str
    time: float
    text: str


@dataclass
class Mail:
    """A mail message before threading: ids from its Message-ID / In-Reply-To / References headers."""
    source: str
    message_id: str
    parent_id: str
    message: Message


@dataclass
class Found:
    """What one source held."""
    kind: str
    source: str
    conversations: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    mails: list = field(default_factory=list)
    dropped: Counter = field(default_factory=Counter)  # reason -> count
    chats: int = 0  # chat files / chats of an export / mail folders / note files
    origin: str = ""  # the path the user named (a folder's files share it)

    def messages(self):
        """Every message it holds: its conversations' and its mails'."""
        return [m for c in self.conversations for m in c.messages] + [m.message for m in self.mails]


def head_bytes(path, n=4096):
    """The first n bytes of a file ('' when it cannot be read): what content sniffing looks at."""
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError:
        return b""


def first_text_line(data):
    """The first non-blank line of a file's head as text, BOM and invisible marks kept; None when not UTF-8."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(data) - 4:  # a multi-byte character cut by the head's end is not an error
            return None
        text = data[:e.start].decode("utf-8")
    for line in text.lstrip("\ufeff").splitlines():
        if line.strip():
            return line
    return ""


def read_text(path, expected):
    """A file's text, a leading BOM removed; not UTF-8 is an error that says what the file was expected to be."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text at byte {e.start} ({expected})") from None
    return text.removeprefix("\ufeff")


def others(messages):
    """How many people besides you write in a chat (at least one): above one, its turns are prefixed with names."""
    return max(1, len({m.sender for m in messages}) - 1)
