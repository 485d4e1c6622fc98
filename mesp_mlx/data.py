"""Datasets in mlx-lm's formats, tokenized, masked and batched by length.

A data directory holds train.jsonl / valid.jsonl / test.jsonl; each row is {"text"}, {"prompt", "completion"} or
{"messages"} (rendered with the tokenizer's chat template). With mask_prompt, only completion / final assistant tokens
count in the loss. A directory without jsonl files is read as a source tree: every text file is one document,
chunked to max_seq_length, and a deterministic tenth of the files (at least one) is held out as the validation
split. `python-stdlib:<package>` names a package folder of the running Python's standard library (real source
every machine has, used by the "learn my code" recipe).
Batches group rows of similar length (sorted, then chunked, then shuffled), right-padded. With packing (--pack),
short rows share a batch row of up to max_seq_length positions (first-fit over the epoch's shuffled order): each
row keeps its own (input, target) pairs, so no target ever crosses rows, and `segments` tells the model which row
each position belongs to (attention stays inside it, positions restart at its start).
"""
import json
import random
from pathlib import Path

import mlx.core as mx
import numpy as np

from .errors import DataError

SOURCE_SUFFIXES = (".py", ".md", ".txt", ".rst", ".c", ".h", ".js", ".ts", ".rs", ".go", ".java", ".sh")


def check_row(row):
    """Why a row of mlx-lm's formats cannot be used, or None."""
    if not isinstance(row, dict) or not ({"text"} <= row.keys() or {"prompt", "completion"} <= row.keys()
                                         or "messages" in row):
        return "expected an object with 'text', 'prompt'+'completion' or 'messages'"
    return None


def read_jsonl(path, skip_bad=False, check=check_row):
    """-> ([(row, "file:line")], number of bad lines skipped). A bad line (not JSON, or a row `check` finds fault
    with) is an error unless skip_bad."""
    rows, skipped = [], 0
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                try:
                    row = json.loads(raw.decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError) as e:
                    raise DataError(f"{path}:{n}: not a valid JSON line ({e})") from None
                problem = check(row)
                if problem:
                    raise DataError(f"{path}:{n}: {problem}")
            except DataError:
                if not skip_bad:
                    raise
                skipped += 1
                continue
            rows.append((row, f"{path}:{n}"))
    return rows, skipped


def encode_each(rows, encode, skip_bad=False):
    """[(row, "where")] -> ([encode(row, where)], rows skipped): a row that raises DataError stops the run unless
    skip_bad, which skips it."""
    out, skipped = [], 0
    for row, where in rows:
        try:
            out.append(encode(row, where))
        except DataError:
            if not skip_bad:
                raise
            skipped += 1
    return out, skipped


def local_splits(root, load):
    """{split: load(path)} for the train.jsonl / valid.jsonl / test.jsonl in folder `root` (or `root` itself, one
    file, as the train split)."""
    out = {}
    for split in ("train", "valid", "test"):
        f = root / f"{split}.jsonl" if root.is_dir() else (root if split == "train" else None)
        if f is not None and f.exists():
            out[split] = load(f)
    return out


def encode_row(tokenizer, row, where, mask_prompt):
    """-> (token ids, index of the first token that counts in the loss), as mlx-lm's datasets make them: chat rows
    (with their `tools`) and prompt/completion rows go through the tokenizer's chat template, a completion as one
    user turn and one assistant turn; with mask_prompt everything before the final turn is masked. Completions on a
    tokenizer without a chat template are joined as plain text (mlx-lm refuses them)."""
    tools = row.get("tools")
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise DataError(f"{where}: 'tools' must be a list of objects (JSON schemas of the functions)")
    if "messages" in row:
        msgs = row["messages"]
        if not (isinstance(msgs, list) and msgs and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                        and isinstance(m.get("content", ""), str) for m in msgs)):
            raise DataError(f"{where}: 'messages' must be a non-empty list of {{\"role\": str, \"content\": str}}")
        return _chat(tokenizer, msgs, tools, where, mask_prompt)
    fields = ("prompt", "completion") if "prompt" in row else ("text",)
    bad = [k for k in fields if not isinstance(row[k], str)]
    if bad:
        raise DataError(f"{where}: '{bad[0]}' must be a string, got {type(row[bad[0]]).__name__}")
    if "prompt" in row:
        if getattr(tokenizer, "chat_template", None):
            msgs = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}]
            return _chat(tokenizer, msgs, tools, where, mask_prompt)
        prompt = tokenizer.encode(row["prompt"])
        full = prompt + tokenizer.encode(row["completion"], add_special_tokens=False)
        return _eos(tokenizer, full), (len(prompt) if mask_prompt else 0)
    return _eos(tokenizer, tokenizer.encode(row["text"])), 0


def _chat(tokenizer, msgs, tools, where, mask_prompt):
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{where}: chat data needs a chat template and this model has none (a GGUF without "
                        "tokenizer.chat_template); pass rows that need none: {\"text\": ...} or "
                        "{\"prompt\": ..., \"completion\": ...}")
    try:
        ids = token_ids(tokenizer.apply_chat_template(msgs, tools=tools, tokenize=True))
        if not mask_prompt:
            return ids, 0
        # the prompt ends where the final turn starts: with the assistant header when that turn is the assistant's
        prompt = token_ids(tokenizer.apply_chat_template(msgs[:-1], tools=tools, tokenize=True,
                                                    add_generation_prompt=msgs[-1]["role"] == "assistant"))
    except Exception as e:
        raise DataError(f"{where}: the chat template rejected this row ({type(e).__name__}: {e})") from None
    return ids, len(prompt)


def token_ids(x):
    """apply_chat_template's result (a list, or a mapping with input_ids) -> a list of ids."""
    return list(x["input_ids"] if isinstance(x, dict) or hasattr(x, "input_ids") else x)


def _eos(tokenizer, ids):
    eos = tokenizer.eos_token_id
    return ids + [eos] if eos is not None and (not ids or ids[-1] != eos) else ids


class Dataset:
    """Tokenized examples: list of (ids, loss_start)."""

    def __init__(self, examples, truncated=0, chat=False):
        self.examples, self.truncated, self.skipped = examples, truncated, 0
        self.warnings = []  # lines the run's log gives as warnings (the train split's), once
        self.chat = chat  # rows were conversations: samples are asked through the chat template

    def __len__(self):
        return len(self.examples)


def load_split(tokenizer, path, max_seq_length, mask_prompt, skip_bad=False):
    rows, skipped = read_jsonl(path, skip_bad)
    return encode_rows(tokenizer, rows, max_seq_length, mask_prompt, skip_bad, skipped)


def encode_rows(tokenizer, rows, max_seq_length, mask_prompt, skip_bad=False, skipped=0):
    """[(row, "where")] -> Dataset: tokenized, truncated to max_seq_length + 1 tokens, rows with no target dropped."""
    encoded, bad = encode_each(rows, lambda row, where: (encode_row(tokenizer, row, where, mask_prompt),
                                                         "messages" in row), skip_bad)
    examples, truncated = [], 0
    for (ids, start), _ in encoded:
        if len(ids) > max_seq_length + 1:
            ids, truncated = ids[: max_seq_length + 1], truncated + 1
        if len(ids) >= 2 and start < len(ids) - 1:
            examples.append((ids, start))
    out = Dataset(examples, truncated, any(chat for _, chat in encoded))
    out.skipped = skipped + bad
    return out


def load_source_tree(tokenizer, root, max_seq_length):
    files = sorted(p for p in Path(root).rglob("*") if p.is_file() and p.suffix in SOURCE_SUFFIXES)
    held_out = {p for p in files if sum(p.name.encode()) % 10 == 0} or set(files[-1:] if len(files) > 1 else [])
    splits = {"train": [], "valid": []}
    for p in files:
        try:
            text = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        split = "valid" if p in held_out else "train"
        ids = _eos(tokenizer, tokenizer.encode(text))
        for i in range(0, len(ids) - 1, max_seq_length):
            chunk = ids[i: i + max_seq_length + 1]
            if len(chunk) >= 2:
                splits[split].append((chunk, 0))
    return {k: Dataset(v) for k, v in splits.items()}


def resolve_data(data):
    if data.startswith("python-stdlib:"):
        import sysconfig
        name = data.split(":", 1)[1]
        root = Path(sysconfig.get_paths()["stdlib"]) / name
        if not root.is_dir():
            raise DataError(f"{data}: the standard library has no package folder {root}")
        return root
    return Path(data)


HF_SPLITS = {"train": ("train",), "valid": ("valid", "validation"), "test": ("test",)}
FEATURES = {"text_feature": "text", "prompt_feature": "prompt", "completion_feature": "completion",
            "chat_feature": "messages"}


def load_hf_datasets(tokenizer, specs, max_seq_length, mask_prompt, skip_bad=False):
    """Hugging Face datasets (a hub id, or mlx-lm's hf_dataset entries: path, train_split / valid_split /
    test_split, *_feature keys, config) with the same row formats and checks as local files. Several entries are
    concatenated split by split. Needs the optional `datasets` package, and the hub or its cache."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"{specs[0]['path']}: not a local path; loading it as a Hugging Face dataset needs the "
                        "`datasets` package (pip install datasets). Offline, pass local files: a folder with "
                        "train.jsonl / valid.jsonl") from None
    rows = {"train": [], "valid": [], "test": []}
    for spec in specs:
        path = spec["path"]
        rename = {spec[k]: v for k, v in FEATURES.items() if k in spec}
        try:
            loaded = datasets.load_dataset(path, **spec.get("config", {}))
        except Exception as e:
            raise DataError(f"{path}: could not load this Hugging Face dataset ({type(e).__name__}); offline? Pass "
                            "local files instead: a folder with train.jsonl / valid.jsonl") from None
        for split, names in HF_SPLITS.items():
            name = spec.get(f"{split}_split") or next((n for n in names if n in loaded), None)
            if name is None:
                continue
            try:
                part = loaded[name] if name in loaded else datasets.load_dataset(path, split=name,
                                                                                 **spec.get("config", {}))
            except Exception as e:
                raise DataError(f"{path}: no split {name!r} ({type(e).__name__}: {e})") from None
            rows[split] += [({rename.get(k, k): v for k, v in r.items()}, f"{path}[{name}] row {i}")
                            for i, r in enumerate(part)]
    return {s: encode_rows(tokenizer, r, max_seq_length, mask_prompt, skip_bad) for s, r in rows.items() if r}


def load_datasets(tokenizer, data, max_seq_length, mask_prompt, skip_bad=False, hf_dataset=None):
    if hf_dataset:
        specs = hf_dataset if isinstance(hf_dataset, list) else [hf_dataset]
        if not all(isinstance(s, dict) and isinstance(s.get("path"), str) for s in specs):
            raise DataError("hf_dataset: expected a mapping with a 'path' (or a list of them), as in mlx-lm")
        out = load_hf_datasets(tokenizer, specs, max_seq_length, mask_prompt, skip_bad)
        if not out.get("train"):
            raise DataError(f"{specs[0]['path']}: no training rows")
        return out
    root = resolve_data(data)
    if not root.exists():
        if data.count("/") == 1 and not data.startswith((".", "/", "~")):  # a hub id, as mlx-lm takes it
            return load_datasets(tokenizer, data, max_seq_length, mask_prompt, skip_bad, {"path": data})
        raise DataError(f"{root}: no such data file or directory")
    if root.is_dir() and not list(root.glob("*.jsonl")):
        out = load_source_tree(tokenizer, root, max_seq_length)
    else:
        out = local_splits(root, lambda f: load_split(tokenizer, f, max_seq_length, mask_prompt, skip_bad))
    if not out.get("train"):
        raise DataError(f"{root}: no training examples (expected train.jsonl with at least one usable row)")
    return out


def pack_rows(lengths, capacity):
    """First-fit: indices into `lengths` (in the order given) -> bins, lists of indices whose lengths sum to at most
    `capacity`; an item longer than that gets a bin of its own. Bins that cannot take the shortest item any more are
    closed, so a pass costs about (items x bins still open)."""
    bins, room, open_ = [], [], []
    shortest = min(lengths, default=0)
    for i, n in enumerate(lengths):
        for j in open_:
            if room[j] >= n:
                bins[j].append(i)
                room[j] -= n
                break
        else:
            j = len(bins)
            bins.append([i])
            room.append(capacity - n)
            open_.append(j)
        if room[j] < shortest:
            open_.remove(j)
    return bins


def epoch_groups(dataset, batch_size, seed, epoch, pack=0):
    """Length-grouped batches for one epoch, in a deterministic order given (seed, epoch): lists of example indices,
    or with pack = L > 0 lists of packed rows, each a list of example indices with at most L (input, target) pairs
    in all (first-fit over the epoch's shuffled order of the examples)."""
    rng = random.Random(seed * 100_003 + epoch)
    pairs = lambda i: len(dataset.examples[i][0]) - 1
    if pack:
        order = list(range(len(dataset)))
        rng.shuffle(order)
        items = [[order[k] for k in b] for b in pack_rows([pairs(i) for i in order], pack)]
        items.sort(key=lambda b: sum(pairs(i) for i in b))
    else:
        items = sorted(range(len(dataset)), key=pairs)
    groups = [items[i: i + batch_size] for i in range(0, len(items), batch_size)]
    rng.shuffle(groups)
    return groups


def make_batch(dataset, items, packed=False):
    """(inputs, targets, mask) or, packed, (inputs, targets, mask, segments) from epoch_groups' items: example
    indices, or (packed) lists of them."""
    if packed:
        return collate_packed([[dataset.examples[i] for i in b] for b in items])
    return collate([dataset.examples[i] for i in items])


def collate(examples):
    """-> (inputs, targets, mask) right-padded to the longest row."""
    t = max(len(ids) for ids, _ in examples) - 1
    inputs = np.zeros((len(examples), t), np.int32)
    targets = np.zeros((len(examples), t), np.int32)
    mask = np.zeros((len(examples), t), np.float32)
    for r, (ids, start) in enumerate(examples):
        n = len(ids) - 1
        inputs[r, :n], targets[r, :n] = ids[:-1], ids[1:]
        mask[r, max(start - 1, 0):n] = 1.0
    return mx.array(inputs), mx.array(targets), mx.array(mask)


def collate_packed(rows):
    """rows: lists of examples, each list one batch row -> (inputs, targets, mask, segments), right-padded to the
    longest. Each example contributes its own (input, target) pairs and mask, as in `collate`; segments[r, t] is
    the index of the example that position t of row r belongs to (padding: one more segment after the last)."""
    t = max(sum(len(ids) - 1 for ids, _ in row) for row in rows)
    inputs = np.zeros((len(rows), t), np.int32)
    targets = np.zeros((len(rows), t), np.int32)
    mask = np.zeros((len(rows), t), np.float32)
    segments = np.zeros((len(rows), t), np.int32)
    for r, row in enumerate(rows):
        c = 0
        for k, (ids, start) in enumerate(row):
            n = len(ids) - 1
            inputs[r, c:c + n], targets[r, c:c + n] = ids[:-1], ids[1:]
            mask[r, c + max(start - 1, 0):c + n] = 1.0
            segments[r, c:c + n] = k
            c += n
        segments[r, c:] = len(row)
    return mx.array(inputs), mx.array(targets), mx.array(mask), mx.array(segments)
