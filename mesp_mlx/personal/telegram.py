"""Telegram Desktop's JSON export (`result.json`, "Export chat history" of one chat or "Export Telegram data" of
all of them): a chat is {"name", "type", "messages": [...]}, the whole export holds them under "chats": {"list"}.
A message's "text" is a string or a list of strings and entity objects ({"type": "bold", "text": ...}), joined
here; "date_unixtime" (or the local "date") orders it. Service messages (joins, calls, pins), media without a
caption and forwarded messages (someone else's words) are dropped with a count. A folder is read through its
result.json."""
import json
import re
from datetime import datetime, timezone

from ..errors import DataError
from .common import Conversation, Found, Message, clean_name, head_bytes, others, read_text

KIND = "telegram"
_SHAPE = re.compile(rb'"(messages"\s*:\s*\[|chats"\s*:\s*\{|personal_information"\s*:)')


def _file(path):
    return path / "result.json" if path.is_dir() else path


def sniff(path):
    f = _file(path)
    head = head_bytes(f, 1 << 16).lstrip(b"\xef\xbb\xbf \t\r\n")
    # a chat export opens with its "name"/"type"/"id" then "messages": [, the full export with "about",
    # "personal_information" ... "chats": {
    return f.is_file() and head.startswith(b"{") and _SHAPE.search(head) is not None


def read(path):
    f = _file(path)
    text = read_text(f, "Telegram exports are UTF-8 JSON")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{f}:{e.lineno}: not complete JSON ({e.msg}); a Telegram export cut short?") from None
    if isinstance(data, dict) and isinstance(data.get("chats"), dict):
        chats = data["chats"].get("list")
    elif isinstance(data, dict) and "messages" in data:
        chats = [data]
    else:
        chats = None
    if not isinstance(chats, list) or not all(isinstance(c, dict) and isinstance(c.get("messages"), list)
                                              for c in chats):
        raise DataError(f"{f}: JSON, but not a Telegram export (expected an object with a \"messages\" list, or "
                        "\"chats\": {\"list\": [chats with \"messages\"]})")
    found = Found(KIND, str(f), chats=len(chats))
    for k, c in enumerate(chats):
        chat = c.get("id", k)
        key = f"{f}#{chat}"
        messages = []
        for i, m in enumerate(c["messages"]):
            reason = _skip(m)
            if reason:
                found.dropped[reason] += 1
                continue
            where = f"{f}: chat {chat}, message {i}"
            text = _text(m.get("text"), where).strip()
            if not text:
                found.dropped["media placeholder" if _media(m) else "empty message"] += 1
                continue
            sender = clean_name(m.get("from") or "") or str(m.get("from_id") or "unknown")
            messages.append(Message(sender, _time(m, where), text, (str(m.get("from_id") or ""),)))
        if messages:
            found.conversations.append(Conversation(KIND, str(f), key, messages, others=others(messages)))
    return found


def _skip(m):
    if not isinstance(m, dict):
        return "not a message"
    if m.get("type", "message") != "message":
        return "system line"
    if m.get("forwarded_from") is not None or m.get("forwarded_from_id") is not None:
        return "forwarded message"
    return None


def _media(m):
    return any(k in m for k in ("photo", "file", "media_type", "sticker_emoji", "poll", "location_information",
                                "contact_information"))


def _text(text, where):
    if text is None:
        return ""
    if isinstance(text, str):
        return text
    if isinstance(text, list):
        parts = []
        for part in text:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict) and isinstance(part.get("text"), str):
                parts.append(part["text"])
            else:
                raise DataError(f"{where}: a text entity that is neither a string nor an object with a \"text\" "
                                "string")
        return "".join(parts)
    raise DataError(f"{where}: \"text\" is a {type(text).__name__}, expected a string or a list of entities")


def _time(m, where):
    try:
        if "date_unixtime" in m:
            return float(m["date_unixtime"])
        # the local time of older exports, read as UTC like every zone-less time here
        return datetime.fromisoformat(m["date"]).replace(tzinfo=timezone.utc).timestamp()
    except (KeyError, TypeError, ValueError):
        raise DataError(f"{where}: no readable \"date_unixtime\" or \"date\"") from None
