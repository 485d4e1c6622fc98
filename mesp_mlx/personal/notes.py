"""A folder of notes (Markdown or plain text, as Obsidian, Bear or any editor keeps them): each file is your own
text, a plain-text row (no one to answer, nothing masked). YAML front matter is cut; the file's modification time
places it in time for the validation split. Inside a folder, a .txt file that is a chat export is read as one (the
folder is sorted by content before a file is taken as a note)."""
import re

from .common import Found, Note, read_text

KIND = "notes"
SUFFIXES = (".md", ".markdown", ".txt")
_FRONT_MATTER = re.compile(r"\A---\n.*?\n(---|\.\.\.)\n", re.DOTALL)


def sniff(path):
    return path.is_file() and path.suffix.lower() in SUFFIXES


def read(path):
    text = read_text(path, "notes are read as UTF-8 Markdown or text")
    text = _FRONT_MATTER.sub("", text.replace("\r\n", "\n")).strip()
    found = Found(KIND, str(path), chats=1)
    if text:
        found.notes.append(Note(str(path), path.stat().st_mtime, text))
    else:
        found.dropped["empty note"] += 1
    return found
