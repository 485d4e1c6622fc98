"""Personal data as it lies on the machine, read into messages and notes: one module per kind of source, each a
`sniff(path)` that recognises it by content (not by name alone) and a `read(path)` that returns a `Found`, listed
once in SOURCES (sniffed in that order; notes last, as they are any text). Nothing here opens a network connection
or writes a file. `read_sources` takes what the user named: a file of a known kind, a Maildir or Telegram export
folder, or any other folder, whose files (and Maildir / Telegram folders) are each recognised by content; `--me`
and the rows are the caller's (`mesp_mlx.prepare`).
"""
import os
from pathlib import Path

from ..errors import DataError
from . import mail, notes, telegram, whatsapp
from .common import first_text_line, head_bytes

SOURCES = {"telegram": telegram, "mail": mail, "whatsapp": whatsapp, "notes": notes}
EXPECTED = ("expected a WhatsApp chat export (.txt), a Telegram export (result.json or its folder), an mbox file or "
            "Maildir folder, a Markdown note, or a folder of these")


def recognise(path, in_folder=False):
    """The kind of a file or folder, or None. A .txt given on its own must be a chat export: only inside a folder of
    notes is any text file a note (a chat export in an unknown form must not become "your own text")."""
    for kind, module in SOURCES.items():
        if kind == "notes" and not in_folder and path.suffix.lower() == ".txt":
            continue
        if module.sniff(path):
            return kind
    return None


def read_sources(paths, skip=()):
    """-> [Found], one per file or folder read (a folder's files each their own); folders in `skip` (the output)
    are not walked into."""
    found, skip = [], {Path(p).expanduser().resolve() for p in skip}
    for p in map(lambda s: Path(s).expanduser(), paths):
        if not p.exists():
            raise DataError(f"{p}: no such file or folder")
        kind = recognise(p)
        if kind:
            part = [SOURCES[kind].read(p)]
        elif p.is_dir():
            part = _read_folder(p, skip)
            if not part:
                raise DataError(f"{p}: a folder with nothing recognised in it ({EXPECTED})")
        else:
            raise DataError(f"{p}: {describe(p)}; {EXPECTED}")
        for f in part:
            f.origin = str(p)
        found += part
    return found


def _read_folder(root, skip):
    out = []
    for folder, dirs, files in os.walk(root):
        # .git, .obsidian, .trash: not notes
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and (Path(folder) / d).resolve() not in skip)
        for d in list(dirs):
            path = Path(folder) / d
            kind = recognise(path, in_folder=True)  # a Maildir or a Telegram export folder
            if kind:
                out.append(SOURCES[kind].read(path))
                dirs.remove(d)
        for name in sorted(files):
            path = Path(folder) / name
            kind = recognise(path, in_folder=True) if not name.startswith(".") else None
            if kind:
                out.append(SOURCES[kind].read(path))
    return out


def describe(path):
    """What a file that is none of the known kinds looks like, without quoting its content (it may be private)."""
    head = head_bytes(path)
    if not head:
        return "an empty file"
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive (a WhatsApp export comes zipped: unzip it and pass the chat's .txt)"
    line = first_text_line(head)
    if line is None:
        return "binary data, not text"
    if line.lstrip("\ufeff \t").startswith(("{", "[")):
        return "JSON, but not a Telegram export (no \"messages\" list or \"chats\")"
    if path.suffix.lower() == ".txt":
        return ("text, but its first line is no WhatsApp message line ('[date, time] Name: text' or 'date, time - "
                "Name: text'); notes go in a folder")
    return f"text of an unknown kind ({path.suffix or 'no suffix'})"
