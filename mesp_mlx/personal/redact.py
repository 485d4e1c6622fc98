"""`--redact`: e-mail addresses, phone numbers and URLs in message text and sender names replaced by placeholders
before anything is counted or written, so they never reach a row. Patterns, not a parser: they err on the side of
replacing (a long digit run with separators that starts like a phone number is one), except where a number reads
as a date or a time."""
import re

PLACEHOLDERS = {"url": "[url]", "email": "[email]", "phone": "[phone]"}
# URLs first (they may hold an address or digits), then addresses, then phone numbers
PATTERNS = (
    ("url", re.compile(r"\b(?:https?://|ftp://|www\.)[^\s<>\"']+[^\s<>\"'.,;:!?)\]}]", re.IGNORECASE)),
    ("email", re.compile(r"(?<![\w.+-])[\w.+-]+@[\w-]+(?:\.[\w-]+)*\.[^\W\d_]{2,}\b")),
    # +49 170 1234567, (030) 123 456 78, 0170-1234567, 555-123-4567, 555.123.4567: 7 to 15 digits
    ("phone", re.compile(r"(?<![\w+])(?:\+\d[\d ()./-]{5,}\d|\(\d{2,5}\)[\d ./-]{4,}\d|0\d[\d ./-]{5,}\d|"
                         r"\d{3}[-. ]\d{3}[-. ]\d{4})(?![\w])")),
)
# what the phone pattern must leave alone: dates (01.02.2024, 2024-01-02, 01/02/24) and times
_DATE = re.compile(r"^(\d{1,4}[./-]\d{1,2}[./-]\d{1,4}|\d{1,2}:\d{2}(:\d{2})?)$")


def redact(text):
    for kind, pattern in PATTERNS:
        text = pattern.sub(lambda m: _keep_or_replace(kind, m.group(0)), text)
    return text


def _keep_or_replace(kind, s):
    if kind == "phone":
        digits = sum(c.isdigit() for c in s)
        if not 7 <= digits <= 15 or _DATE.match(s.strip()):
            return s
    return PLACEHOLDERS[kind]
