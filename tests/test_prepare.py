"""`mesp_mlx.prepare` (issue 34): chat exports, mail and notes as rows in your voice. Each test writes a small export
of one kind the way the app writes it (non-ASCII names, emoji, empty and multi-line messages, two people with the
same first name) and checks the rows written exactly; then --redact, the token budget, the split by time, the bad
inputs, privacy (no network, nothing written outside DIR, no message text printed) and the Ollama Modelfile.
Rows are measured with a real tokenizer: the tiny GGUF's byte-level BPE with its ChatML template (the default
model's takes seconds to build; the code path is the same)."""
import json
import re
import mailbox
import os
import socket
from collections import Counter
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml

from mesp_mlx.data import encode_row
from mesp_mlx.errors import ConfigError, DataError
from mesp_mlx.personal import read_sources
from mesp_mlx.personal.redact import redact
from mesp_mlx.personal.rows import reply_rows, sessions
from mesp_mlx.personal.whatsapp import date_order
from mesp_mlx.prepare import MAX_TOKENS, RECIPE, load_tokenizer, main, prepare


@pytest.fixture(scope="module")
def tok(tiny_gguf, tmp_path_factory):
    return load_tokenizer(str(tiny_gguf), tmp_path_factory.mktemp("tok"))


def rows(out):
    return {split: [json.loads(line) for line in (Path(out) / f"{split}.jsonl").read_text("utf-8").splitlines()]
            for split in ("train", "valid")}


def chat(*turns):
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


def t(y, mo, d, h, mi, s=0):
    return datetime(y, mo, d, h, mi, s, tzinfo=timezone.utc).timestamp()


# --- WhatsApp ---------------------------------------------------------------------------------------------------

# iOS form, a group: two Annas, day-first dates that also read as month-first and run forward both ways (03.01 ->
# 04.01 vs 1 March -> 1 April): a 24-hour clock decides for day first
IOS_GROUP = """\ufeff[03.01.24, 09:00:00] Familie 👪: \u200eMessages and calls are end-to-end encrypted.
[03.01.24, 09:00:05] Anna Schmidt: Guten Morgen ☀️
[03.01.24, 09:00:09] ~\u202fJörg: Wer kommt heute?
[03.01.24, 09:01:00] Anna Müller: Ich!

Bringe Kuchen mit 🎂
[03.01.24, 09:01:30] Anna Müller: \u200eimage omitted
[03.01.24, 09:02:00] Anna Schmidt: Super
[03.01.24, 09:02:30] Anna Schmidt: \u200e<attached: 00000042-PHOTO-2024-01-03-09-02-30.jpg>
[03.01.24, 09:03:00] Anna Müller: Bis später <This message was edited>
[04.01.24, 18:00:00] Jörg: Danke für gestern!
[04.01.24, 18:05:00] Anna Müller: Gern geschehen 😊
[04.01.24, 18:06:00] Anna Müller: \u200eThis message was deleted.
"""


def test_whatsapp_ios_group_rows(tmp_path, tok):
    src = tmp_path / "WhatsApp Chat - Familie.txt"
    src.write_text(IOS_GROUP, "utf-8")
    s = prepare([src], tmp_path / "out", me=["anna müller"], tokenizer=tok)
    first = ("user", "Anna Schmidt: Guten Morgen ☀️\nJörg: Wer kommt heute?")
    assert rows(tmp_path / "out") == {
        "train": [chat(first, ("assistant", "Ich!\n\nBringe Kuchen mit 🎂")),
                  chat(first, ("assistant", "Ich!\n\nBringe Kuchen mit 🎂"), ("user", "Anna Schmidt: Super"),
                       ("assistant", "Bis später"))],
        "valid": [chat(("user", "Jörg: Danke für gestern!"), ("assistant", "Gern geschehen 😊"))]}
    assert s["dropped"] == {"system line": 1, "media placeholder": 2, "deleted message": 1}
    assert (s["messages"], s["yours"], s["conversations"], s["rows"]) == (7, 3, 2, 3)
    assert s["valid_from"].startswith("2024-01-04T18:05")


# Android form, two people, a US 12-hour clock (with the narrow no-break space newer exports put before PM): month
# first, because 1/13 cannot be day first
ANDROID = """1/12/24, 9:00\u202fAM - Messages and calls are end-to-end encrypted. No one outside of this chat can \
read them.
1/12/24, 9:01\u202fAM - Zoë Ørsted: Are you coming to the 🎉 party?
1/12/24, 9:02\u202fAM - Max Mustermann: <Media omitted>
1/12/24, 9:03\u202fAM - Max Mustermann: Yes!
1/12/24, 9:03\u202fAM - Max Mustermann: Bringing snacks
1/12/24, 9:04\u202fAM - Zoë Ørsted: 
1/13/24, 8:15\u202fPM - Zoë Ørsted: Thanks for coming, it was great.
Really.
1/13/24, 8:20\u202fPM - Max Mustermann: Anytime 🙂
"""


def test_whatsapp_android_rows(tmp_path, tok):
    src = tmp_path / "chat.txt"
    src.write_text(ANDROID, "utf-8")
    s = prepare([src], tmp_path / "out", me=["Max Mustermann"], tokenizer=tok)
    assert rows(tmp_path / "out") == {
        "train": [chat(("user", "Are you coming to the 🎉 party?"), ("assistant", "Yes!\nBringing snacks"))],
        "valid": [chat(("user", "Thanks for coming, it was great.\nReally."), ("assistant", "Anytime 🙂"))]}
    assert s["dropped"] == {"system line": 1, "media placeholder": 1, "empty message": 1}
    assert s["sample_prompt"] is None  # the only validation prompt has two lines
    assert s["valid_from"].startswith("2024-01-13T20:20")  # 8:20 PM, month first


def test_date_order_is_read_from_the_dates():
    assert date_order(["12/01/24", "13/01/24"], False, "f") == "dmy"  # 13 is no month
    assert date_order(["01/02/24", "02/01/24"], False, "f") == "mdy"  # day first would run back in time
    assert date_order(["02/01/24", "03/01/24"], True, "f") == "mdy"  # both run forward: the 12-hour clock's order
    assert date_order(["02/01/24", "03/01/24"], False, "f") == "dmy"
    assert date_order(["2024-01-02", "2024-01-03"], False, "f") == "ymd"
    with pytest.raises(DataError, match="f: its dates fit no day/month order"):
        date_order(["13/01/24", "01/13/24"], False, "f")


def test_me_is_exact_and_lists_the_senders(tmp_path, tok):
    src = tmp_path / "chat.txt"
    src.write_text(IOS_GROUP, "utf-8")
    for me in ([], ["Anna"]):  # two Annas: a first name alone is nobody
        with pytest.raises(ConfigError) as e:
            prepare([src], tmp_path / "out", me=me, tokenizer=tok)
        assert "Anna Müller (3), Anna Schmidt (2), Jörg (2)" in str(e.value)
    assert "--me 'Anna' writes in none of the sources" in str(e.value)
    assert not (tmp_path / "out").exists()
    # Anna Schmidt's rows: Anna Müller is now one of the others (and one row is no split)
    with pytest.raises(DataError, match="all 1 rows come from one conversation"):
        prepare([src], tmp_path / "out", me=["Anna Schmidt"], tokenizer=tok)
    (conv,) = read_sources([src])[0].conversations
    got = [r.row for s in sessions(conv, 3600) for r in reply_rows(s, lambda m: m.sender == "Anna Schmidt", 6, 99,
                                                                   lambda row: (1, 1), Counter())]
    assert got == [chat(("user", "Jörg: Wer kommt heute?\nAnna Müller: Ich!\n\nBringe Kuchen mit 🎂"),
                        ("assistant", "Super"))]


# --- Telegram --------------------------------------------------------------------------------------------------

def telegram_chat(chat_id, name, kind, messages):
    """A chat as Telegram Desktop writes it: local time as "date", the instant as "date_unixtime"."""
    rows = [dict({"id": i, "type": "message", "date_unixtime": str(int(ts)),
                  "date": datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")}, **m)
            for i, (ts, m) in enumerate(messages, 1)]
    return {"name": name, "type": kind, "id": chat_id, "messages": rows}


def test_telegram_whole_export(tmp_path, tok):
    me = {"from": "Łukasz Nowak", "from_id": "user42"}
    dm = telegram_chat(7, "Zoë", "personal_chat", [
        (t(2024, 2, 1, 10, 0), {"from": "Zoë", "from_id": "user7", "text": [
            "Did you see ", {"type": "link", "text": "this"}, "? ", {"type": "bold", "text": "🔥"}]}),
        (t(2024, 2, 1, 10, 1), {"type": "service", "actor": "Zoë", "action": "pin_message", "text": ""}),
        (t(2024, 2, 1, 10, 2), dict(me, text="Not yet")),
        (t(2024, 2, 1, 10, 2, 30), dict(me, text="Send it again?")),
        (t(2024, 2, 1, 10, 3), {"from": "Zoë", "from_id": "user7", "photo": "photos/1.jpg", "text": ""}),
        (t(2024, 2, 1, 10, 4), dict(me, text="Lol, who wrote that", forwarded_from="Some Channel")),
    ])
    group = telegram_chat(9, "Ανθρώπινο Δίκτυο", "private_group", [
        (t(2024, 3, 5, 20, 0), {"from": "Zoë", "from_id": "user7", "text": "Pizza tonight?"}),
        (t(2024, 3, 5, 20, 1), {"from": "Zoë Ortiz", "from_id": "user8", "text": "🍕🍕"}),
        (t(2024, 3, 5, 20, 2), dict(me, text=[{"type": "plain", "text": "Count me in"}])),
    ])
    export = tmp_path / "DataExport_2024-03-06"
    export.mkdir()
    (export / "result.json").write_text(json.dumps({"about": "...", "personal_information": {"user_id": 42},
                                                    "chats": {"about": "...", "list": [dm, group]}},
                                                   ensure_ascii=False), "utf-8")
    s = prepare([export], tmp_path / "out", me=["user42"], tokenizer=tok)  # an account id names you too
    assert rows(tmp_path / "out") == {
        "train": [chat(("user", "Did you see this? 🔥"), ("assistant", "Not yet\nSend it again?"))],
        "valid": [chat(("user", "Zoë: Pizza tonight?\nZoë Ortiz: 🍕🍕"), ("assistant", "Count me in"))]}
    assert s["dropped"] == {"system line": 1, "media placeholder": 1, "forwarded message": 1}
    assert s["sources"][0]["chats"] == 2 and s["sources"][0]["kind"] == "telegram"


def test_telegram_one_chat_and_a_truncated_one(tmp_path, tok):
    one = telegram_chat(3, "Zoë", "personal_chat", [
        (t(2024, 1, 1, 8, 0), {"from": "Zoë", "from_id": "user7", "text": "Frohes neues Jahr!"}),
        (t(2024, 1, 1, 8, 5), {"from": "Ich", "from_id": "user1", "text": "Dir auch! 🎆"}),
        (t(2024, 1, 9, 8, 0), {"from": "Zoë", "from_id": "user7", "text": "Wie war der Urlaub?"}),
        (t(2024, 1, 9, 8, 5), {"from": "Ich", "from_id": "user1", "text": "Wunderbar"})])
    f = tmp_path / "result.json"
    text = json.dumps(one, ensure_ascii=False, indent=1)
    f.write_text(text, "utf-8")
    s = prepare([f], tmp_path / "out", me=["Ich"], tokenizer=tok)
    assert rows(tmp_path / "out")["valid"] == [chat(("user", "Wie war der Urlaub?"), ("assistant", "Wunderbar"))]
    assert s["sample_prompt"] == "Wie war der Urlaub?"
    assert "--sample-prompt 'Wie war der Urlaub?'" in s["train_command"]
    f.write_text(text[: len(text) // 2], "utf-8")
    with pytest.raises(DataError, match=r"result.json:\d+: not complete JSON .*cut short"):
        prepare([f], tmp_path / "out2", me=["Ich"], tokenizer=tok)


# --- Mail ------------------------------------------------------------------------------------------------------

def mail(sender, to, when, body, subject="Abendessen", reply_to=None, html=None):
    m = EmailMessage()
    m["From"], m["To"], m["Subject"] = sender, to, subject
    m["Date"] = format_datetime(datetime.fromtimestamp(when, timezone.utc))
    m["Message-ID"] = make_msgid(domain="example.org")
    if reply_to is not None:
        m["In-Reply-To"] = reply_to["Message-ID"]
        m["References"] = reply_to["Message-ID"]
    m.set_content(html, subtype="html") if html else m.set_content(body)
    return m


def test_mail_sent_answers_inbox(tmp_path, tok):
    me, jorg, zoe = "Åsa Lindqvist <asa@example.org>", "Jörg Weiß <joerg@example.org>", "Zoë <zoe@example.net>"
    q1 = mail(jorg, me, t(2024, 4, 1, 9, 0), "Hallo Åsa,\n\nhast du Freitag Zeit? 🍝\n\nGrüße\nJörg")
    a1 = mail(me, jorg, t(2024, 4, 1, 12, 0), "Ja, gerne!\nUm acht?\n\nOn Mon, 1 Apr 2024 at 09:00, Jörg Weiß\n"
              "<joerg@example.org> wrote:\n> Hallo Åsa,\n> hast du Freitag Zeit?\n\n-- \nÅsa\n+46 70 123 45 67",
              reply_to=q1)
    q2 = mail(zoe, me, t(2024, 5, 2, 9, 0), "Can you review my draft?", subject="Draft")
    a2 = mail(me, zoe, t(2024, 5, 2, 10, 0), None, subject="Re: Draft", reply_to=q2,
              html="<html><body><p>Sure, send it over.</p><div class=\"gmail_quote\">On Thu Zoë wrote:"
                   "<blockquote>Can you review my draft?</blockquote></div></body></html>")
    alone = mail(me, zoe, t(2024, 5, 3, 9, 0), "Ping!", subject="Hi")  # opens a thread: nothing to answer
    inbox = mailbox.Maildir(str(tmp_path / "Inbox"), create=True)
    for m in (q1, q2):
        inbox.add(m)
    sent = mailbox.mbox(str(tmp_path / "Sent.mbox"), create=True)
    for m in (a1, a2, alone, q1):  # q1 twice (a copy in Sent): one message
        sent.add(m)
    sent.flush()
    s = prepare([tmp_path / "Sent.mbox", tmp_path / "Inbox"], tmp_path / "out", me=["ASA@example.org"],
                tokenizer=tok)
    assert rows(tmp_path / "out") == {
        "train": [chat(("user", "Hallo Åsa,\n\nhast du Freitag Zeit? 🍝\n\nGrüße\nJörg"),
                       ("assistant", "Ja, gerne!\nUm acht?"))],
        "valid": [chat(("user", "Can you review my draft?"), ("assistant", "Sure, send it over."))]}
    assert s["dropped"] == {"your message opens the conversation (nothing to answer)": 1}
    assert [(x["kind"], x["yours"]) for x in s["sources"]] == [("mail", 3), ("mail", 0)]


# --- Notes -----------------------------------------------------------------------------------------------------

def test_notes_folder(tmp_path, tok):
    notes = tmp_path / "Notes"
    (notes / "Reisen").mkdir(parents=True)
    (notes / ".obsidian").mkdir()
    (notes / ".obsidian" / "workspace.md").write_text("not a note", "utf-8")
    (notes / "Reisen" / "Kyoto.md").write_text("---\ntags: [reise]\n---\n# Kyōto 🍵\n\nTempel am Morgen.\n", "utf-8")
    (notes / "leer.md").write_text("\n\n", "utf-8")
    (notes / "Ideen.txt").write_text("Erste Idee.\r\n\r\nZweite Idee,\r\nüber zwei Zeilen.\r\n", "utf-8")
    (notes / "chat.txt").write_text(ANDROID, "utf-8")  # a chat export in the folder is read as one
    os.utime(notes / "Reisen" / "Kyoto.md", (t(2023, 1, 1, 0, 0),) * 2)
    os.utime(notes / "Ideen.txt", (t(2023, 6, 1, 0, 0),) * 2)
    s = prepare([notes], tmp_path / "out", me=["Max Mustermann"], tokenizer=tok)
    assert rows(tmp_path / "out")["train"] == [
        {"text": "# Kyōto 🍵\n\nTempel am Morgen."}, {"text": "Erste Idee.\n\nZweite Idee,\nüber zwei Zeilen."},
        chat(("user", "Are you coming to the 🎉 party?"), ("assistant", "Yes!\nBringing snacks"))]
    assert [(x["kind"], x["files"]) for x in s["sources"]] == [("notes", 3), ("whatsapp", 1)]
    assert s["dropped"]["empty note"] == 1 and s["plain_text_rows"] == 2
    # a budget that one paragraph fits but not two: a note is cut at its paragraphs, each row within the budget
    more = tmp_path / "Ideen"
    more.mkdir()
    (more / "Ideen.txt").write_text("Erste Idee.\r\n\r\nZweite Idee,\r\nüber zwei Zeilen.\r\n", "utf-8")
    (more / "kurz.md").write_text("Kurz.", "utf-8")
    os.utime(more / "kurz.md", (t(2023, 7, 1, 0, 0),) * 2)
    os.utime(more / "Ideen.txt", (t(2023, 6, 1, 0, 0),) * 2)
    budget = max(len(encode_row(tok, {"text": p}, "", True)[0]) for p in ("Erste Idee.",
                                                                          "Zweite Idee,\nüber zwei Zeilen."))
    prepare([more], tmp_path / "out", tokenizer=tok, max_tokens=budget)  # notes alone: no --me needed
    assert rows(tmp_path / "out") == {"train": [{"text": "Erste Idee."}, {"text": "Zweite Idee,\nüber zwei Zeilen."}],
                                      "valid": [{"text": "Kurz."}]}


def test_out_inside_a_source_folder_is_not_read_back(tmp_path, tok):
    (tmp_path / "a.md").write_text("Eins.", "utf-8")
    (tmp_path / "b.md").write_text("Zwei.", "utf-8")
    os.utime(tmp_path / "a.md", (t(2023, 1, 1, 0, 0),) * 2)
    os.utime(tmp_path / "b.md", (t(2023, 2, 1, 0, 0),) * 2)
    for _ in range(2):
        s = prepare([tmp_path], tmp_path / "prepared", tokenizer=tok)
        assert rows(tmp_path / "prepared") == {"train": [{"text": "Eins."}], "valid": [{"text": "Zwei."}]}
        assert s["sources"][0]["files"] == 2


# --- Budget, redaction ------------------------------------------------------------------------------------------

def test_budget_drops_the_oldest_context(tmp_path, tok):
    src = tmp_path / "chat.txt"
    src.write_text(IOS_GROUP, "utf-8")
    full = chat(("user", "Anna Schmidt: Guten Morgen ☀️\nJörg: Wer kommt heute?"),
                ("assistant", "Ich!\n\nBringe Kuchen mit 🎂"), ("user", "Anna Schmidt: Super"),
                ("assistant", "Bis später"))
    n = len(encode_row(tok, full, "", True)[0])
    s = prepare([src], tmp_path / "out", me=["Anna Müller"], tokenizer=tok, max_tokens=n - 1)
    second = rows(tmp_path / "out")["train"][1]
    assert second == chat(("user", "Anna Schmidt: Super"), ("assistant", "Bis später"))
    assert all(len(encode_row(tok, r, "", True)[0]) <= n - 1 for r in sum(rows(tmp_path / "out").values(), []))
    assert s["tokens"] == sum(len(encode_row(tok, r, "", True)[0]) for r in sum(rows(tmp_path / "out").values(), []))
    prepare([src], tmp_path / "out", me=["Anna Müller"], tokenizer=tok, context_turns=1)
    assert rows(tmp_path / "out")["train"][1] == second


def test_the_recipe_holds_a_row_of_the_default_budget():  # the printed train command adds no --max-seq-length
    assert yaml.safe_load((Path(__file__).resolve().parents[1] / RECIPE).read_text())["max_seq_length"] == MAX_TOKENS


def test_redact():
    text = ("Mail max.mustermann+x@mail.example.de or see https://example.com/a?b=1, www.foo.org. Call +49 170 "
            "1234567, (030) 123 456 78, 0170-1234567 or 555-123-4567. Not: 01.02.2024, 2024-01-02, 12:30, "
            "3.5 kg, 1,000,000 people, room 101, version 2.0.1")
    assert redact(text) == (
        "Mail [email] or see [url], [url]. Call [phone], [phone], [phone] or [phone]. Not: 01.02.2024, "
        "2024-01-02, 12:30, 3.5 kg, 1,000,000 people, room 101, version 2.0.1")


def test_redact_reaches_every_row_and_name(tmp_path, tok):
    src = tmp_path / "chat.txt"
    src.write_text("[1/2/24, 10:00:00 AM] +49 151 2345678: mail me: a.b@c.de 📧\n"
                   "[1/2/24, 10:00:10 AM] Zoë: or https://zoe.example/x\n"
                   "[1/2/24, 10:01:00 AM] Me: ok, 0170 1234567\n"
                   "[1/3/24, 10:00:00 AM] Zoë: ?\n[1/3/24, 10:01:00 AM] Me: !\n", "utf-8")
    prepare([src], tmp_path / "out", me=["Me"], tokenizer=tok, redact=True)
    assert rows(tmp_path / "out")["train"] == [
        chat(("user", "[phone]: mail me: [email] 📧\nZoë: or [url]"), ("assistant", "ok, [phone]"))]


# --- Bad input, privacy ----------------------------------------------------------------------------------------

def test_bad_sources_name_the_file_and_what_it_looked_like(tmp_path, tok):
    cases = {"empty.txt": (b"", "an empty file"),
             "blob.bin": (bytes(range(256)), "binary data, not text"),
             "chat.zip": (b"PK\x03\x04rest", "a zip archive .*unzip it"),
             "data.json": (b'{"rows": []}', "JSON, but not a Telegram export"),
             "diary.txt": ("Liebes Tagebuch, heute 🌧".encode(),
                           "text, but its first line is no WhatsApp message line")}
    for name, (content, what) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(DataError, match=f"^{tmp_path / name}: {what}") as e:
            prepare([tmp_path / name], tmp_path / "out", me=["x"], tokenizer=tok)
        assert "Tagebuch" not in str(e.value)  # never the file's text
    with pytest.raises(DataError, match="nope: no such file or folder"):
        prepare([tmp_path / "nope"], tmp_path / "out", tokenizer=tok)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="a folder with nothing recognised in it"):
        prepare([tmp_path / "empty"], tmp_path / "out", tokenizer=tok)
    only_media = tmp_path / "media.txt"
    only_media.write_text("[1/2/24, 10:00:00 AM] Zoë: hi\n[1/2/24, 10:01:00 AM] Me: \u200eimage omitted\n", "utf-8")
    with pytest.raises(DataError, match=r"no training rows \(1 message, 1 of them yours; dropped: 1 media "
                                        r"placeholder, 1 your message opens the conversation \(nothing to answer\)\)"
                                        "; nothing written"):
        prepare([only_media], tmp_path / "out", me=["zoë"], tokenizer=tok)
    assert not (tmp_path / "out").exists()


def test_cli_offline_writes_only_dir_and_prints_no_text(tmp_path, tiny_gguf, monkeypatch, capsys):
    src = tmp_path / "src"
    src.mkdir()
    (src / "chat.txt").write_text(IOS_GROUP, "utf-8")
    for var in ("HOME", "TMPDIR", "MESP_MLX_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        (tmp_path / var).mkdir()
        monkeypatch.setenv(var, str(tmp_path / var))

    def refuse(*a, **k):
        raise AssertionError("prepare opened a network connection")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    before = {p for p in tmp_path.rglob("*")}
    rc = main([str(src), "--me", "Anna Müller", "--out", str(tmp_path / "out"), "--model", str(tiny_gguf)])
    io = capsys.readouterr()
    assert rc == 0, io.err
    assert {p for p in tmp_path.rglob("*")} - before == {tmp_path / "out" / f for f in
                                                         ("", "train.jsonl", "valid.jsonl", "summary.json")}
    # no message text, except the validation prompt the printed command asks (and summary.json keeps)
    printed = io.out + io.err + (tmp_path / "out" / "summary.json").read_text("utf-8")
    for text in ("Kuchen", "Guten Morgen", "Super", "Bis später", "Gern geschehen", "Wer kommt"):
        assert text not in printed
    assert printed.count("Danke für gestern") == 3  # the command printed, and in summary.json: the command, itself
    assert io.out.endswith(" --sample-prompt 'Jörg: Danke für gestern!'\n")
    assert "rows: 3 (train 2, valid 1: the latest 1 conversation, from 2024-01-04)" in io.out
    assert "dropped: 2 media placeholder, 1 system line, 1 deleted message" in io.out
    assert f"next: python -m mesp_mlx.train -c recipes/my-voice.yaml --data {tmp_path / 'out'} --model " in io.out
    rc = main([str(src), "--out", str(tmp_path / "out2")])
    assert rc == 2 and capsys.readouterr().err.startswith("error: say which sender is you with --me")


# --- Ollama ----------------------------------------------------------------------------------------------------

def parse_modelfile(text):
    """Ollama's Modelfile grammar, written out from its parser's rules: a command word, a space, then the value to
    the end of the line, or in "..." / \"\"\"...\"\"\" quotes that may span lines; PARAMETER takes a name first;
    '#' lines are comments. -> [(command, value)]; an AssertionError where Ollama would refuse the file."""
    out, i = [], 0
    commands = {"from", "adapter", "template", "system", "parameter", "license", "message"}
    while i < len(text):
        line_end = text.find("\n", i) if "\n" in text[i:] else len(text)
        line = text[i:line_end]
        if not line.strip() or line.lstrip().startswith("#"):
            i = line_end + 1
            continue
        word, _, rest = line.lstrip().partition(" ")
        assert word.lower() in commands, f"unknown command {word!r}"
        name = None
        if word.lower() == "parameter":
            name, _, rest = rest.partition(" ")
            assert re.fullmatch(r"\w+", name), name
        start = text.index(rest, i) if rest else line_end
        for quote in ('"""', '"'):
            if rest.startswith(quote):
                close = text.index(quote, start + len(quote))
                value, i = text[start + len(quote):close], close + len(quote)
                assert text[i:text.find("\n", i) if "\n" in text[i:] else len(text)].strip() == "", "text after quote"
                break
        else:
            value, i = rest.strip(), line_end
        i = text.find("\n", i) + 1 if "\n" in text[i:] else len(text)
        out.append((word.upper(), (name, value) if name else value))
    assert any(c == "FROM" for c, _ in out), "no FROM line"
    return out


def render_go(template, messages):
    """The subset of Go's text/template the TEMPLATEs use: {{- ... -}} trimming, range .Messages ... end, .Role,
    .Content, text. Anything else fails, so a template that needs more is not passed by accident."""
    tokens = re.split(r"({{-?\s*.*?\s*-?}})", template)
    for k, tok in enumerate(tokens):  # trim markers eat the whitespace next to them
        if tok.startswith("{{-") and k > 0:
            tokens[k - 1] = tokens[k - 1].rstrip()
        if tok.endswith("-}}") and k + 1 < len(tokens):
            tokens[k + 1] = tokens[k + 1].lstrip()
    actions = [re.sub(r"^{{-?\s*|\s*-?}}$", "", tok) if tok.startswith("{{") else None for tok in tokens]

    def run(k, msg):
        out = ""
        while k < len(tokens):
            act = actions[k]
            if act is None:
                out += tokens[k]
            elif act == "end":
                return out, k
            elif act == "range .Messages":
                for m in messages:
                    body, stop = run(k + 1, m)
                    out += body
                k = stop if messages else _skip_to_end(actions, k + 1)
            elif act in (".Role", ".Content") and msg is not None:
                out += msg[act[1:].lower()]
            else:
                raise AssertionError(f"action {act!r} is outside the subset")
            k += 1
        return out, k
    return run(0, None)[0]


def _skip_to_end(actions, k):
    depth = 0
    while actions[k] != "end" or depth:
        depth += (actions[k] or "").startswith("range") - (actions[k] == "end")
        k += 1
    return k


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """A tiny Llama GGUF (ChatML tokens and template), its store and an adapter folder trained on it."""
    from builders import write_tiny_gguf
    from mesp_mlx.io.adapters import save_adapter
    from mesp_mlx.io.sources import load_model
    from mesp_mlx.lora import LoRAConfig, init_lora
    root = tmp_path_factory.mktemp("ollama")
    write_tiny_gguf(root / "base model.gguf", "llama", "F32")
    store = load_model(str(root / "base model.gguf"), quantize=None)
    lora = LoRAConfig(rank=4, scale=2.5)
    save_adapter(root / "adapters", init_lora(store.args, lora, 0), lora, store.path)
    return root, store


def test_ollama_modelfile(adapter, capsys):
    from mesp_mlx.export import main as export_main
    from mesp_mlx.io.formats.gguf_lora import is_gguf
    root, store = adapter
    assert export_main(["--adapter-path", str(root / "adapters"), "--format", "ollama", "-o", str(root / "ol")]) == 0
    assert "ollama create NAME -f Modelfile" in capsys.readouterr().out
    assert sorted(p.name for p in (root / "ol").iterdir()) == ["Modelfile", "adapter-lora.gguf"]
    cmds = parse_modelfile((root / "ol" / "Modelfile").read_text("utf-8"))
    assert [c for c, _ in cmds] == ["FROM", "ADAPTER", "TEMPLATE", "PARAMETER", "PARAMETER"]
    values = dict(cmds[:3])
    assert values["FROM"] == str((root / "base model.gguf").resolve())  # a space in the path: to the line's end
    assert values["ADAPTER"] == "./adapter-lora.gguf" and is_gguf(root / "ol" / "adapter-lora.gguf")
    assert [v for c, v in cmds if c == "PARAMETER"] == [("stop", "<|endoftext|>"), ("stop", "<|im_end|>")]
    # the TEMPLATE writes a conversation as the model's own chat template does (what the adapter was trained on)
    conv = [{"role": "system", "content": "Sei kurz."}, {"role": "user", "content": "Grüß dich 👋\nWie geht's?"},
            {"role": "assistant", "content": "Gut!"}, {"role": "user", "content": "Und sonst?"}]
    tok = store.tokenizer()
    assert render_go(values["TEMPLATE"], conv) == tok.apply_chat_template(conv, tokenize=False,
                                                                          add_generation_prompt=True)


def test_ollama_system_and_templates_of_other_formats(adapter):
    from mesp_mlx.io.formats.ollama import DIALECTS, default_system, dialect_of
    from mesp_mlx.io.gguf import field, open_gguf
    from mesp_mlx.io import SourceError
    from mesp_mlx.io.sources import smollm2_gguf
    _, store = adapter
    tok = store.tokenizer()
    assert default_system(tok, "chatml") is None  # the tiny template has no default system prompt
    # SmolLM2's own template (the default model's, read from its GGUF) writes one into every conversation, so the
    # Modelfile's SYSTEM must say it: Ollama then sends it as the first message, and the TEMPLATE renders it
    try:
        path = smollm2_gguf(install=False)
    except SourceError as e:
        pytest.skip(f"the default model is not installed ({e})")
    tok.chat_template = str(field(open_gguf(path), "tokenizer.chat_template"))
    system = default_system(tok, dialect_of(tok.chat_template))
    assert system == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    conv = [{"role": "user", "content": "Hallo"}, {"role": "assistant", "content": "Hi"}]
    assert render_go(DIALECTS["chatml"][1], [{"role": "system", "content": system}] + conv) == \
        tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    # Llama 3 and Phi-3, against their formats written as Jinja
    jinja = {"llama3": "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                       "{{ m['content'] }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
                       "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}",
             "phi3": "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
                     "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"}
    for name, template in jinja.items():
        tok.chat_template = template
        assert dialect_of(template) == name
        assert render_go(DIALECTS[name][1], conv) == tok.apply_chat_template(conv, tokenize=False,
                                                                             add_generation_prompt=True)
    assert dialect_of("{{ '<start_of_turn>' }}") is None and dialect_of(None) is None


def test_ollama_needs_a_gguf_base(tmp_path):
    from builders import write_tiny
    from mesp_mlx.io import SourceError
    from mesp_mlx.io.adapters import save_adapter
    from mesp_mlx.io.formats import export_adapter
    from mesp_mlx.io.sources import load_model
    from mesp_mlx.lora import LoRAConfig, init_lora
    store = load_model(str(write_tiny(tmp_path / "hf", "llama")), quantize=None)
    lora = LoRAConfig(rank=2, scale=1.0)
    save_adapter(tmp_path / "ad", init_lora(store.args, lora, 0), lora, store.path)
    with pytest.raises(SourceError, match="which is not a GGUF file: Ollama's FROM must be the GGUF"):
        export_adapter(tmp_path / "ad", "ollama")
    assert not (tmp_path / "ad" / "ollama").exists()
