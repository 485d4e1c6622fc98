"""Data semantics are mlx-lm's: the same token ids and the same loss mask as mlx-lm's own dataset code on the same
rows (text, completions, chat, chat and completions with tools), with and without prompt masking."""
import types

import mlx.core as mx
import pytest

from mesp_mlx.data import collate, encode_row
from mesp_mlx.io.sources import load_model

# a ChatML template that renders tools, so that rows with tools are told apart from rows without
TEMPLATE = ("{% if tools %}<|im_start|>system\ntools: {{ tools | tojson }}<|im_end|>\n{% endif %}"
            "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TOOLS = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {
    "a": {"type": "number"}, "b": {"type": "number"}}}}}]
ROWS = {
    "text": {"text": "the quick brown fox"},
    "completion": {"prompt": "def main():", "completion": " return 0"},
    "completion+tools": {"prompt": "add 2 and 3", "completion": "5", "tools": TOOLS},
    "chat": {"messages": [{"role": "user", "content": "the fox"}, {"role": "assistant", "content": "quick"}]},
    "chat, multi-turn": {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "a"},
                                      {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
                                      {"role": "assistant", "content": "the lazy dog"}]},
    "chat ending with a user turn": {"messages": [{"role": "user", "content": "the fox"},
                                                  {"role": "assistant", "content": "quick"},
                                                  {"role": "user", "content": "brown"}]},
    "chat+tools": {"messages": [{"role": "user", "content": "add 2 and 3"}, {"role": "assistant", "content": "5"}],
                   "tools": TOOLS},
}


@pytest.fixture(scope="module")
def tokenizer(tiny_gguf):
    tok = load_model(str(tiny_gguf)).tokenizer()
    tok.chat_template = TEMPLATE
    return tok


@pytest.mark.parametrize("mask_prompt", [False, True])
@pytest.mark.parametrize("kind", sorted(ROWS))
def test_same_tokens_and_mask_as_mlx_lm(tokenizer, kind, mask_prompt):
    from mlx_lm.tuner.datasets import create_dataset
    from mlx_lm.tuner.trainer import iterate_batches
    row = ROWS[kind]
    ids, start = encode_row(tokenizer, row, "row", mask_prompt)
    if kind == "text" and mask_prompt:  # mlx-lm refuses to mask text rows; nothing to mask in them for us either
        assert start == 0
        return
    theirs = create_dataset([row], tokenizer, types.SimpleNamespace(mask_prompt=mask_prompt))
    their_ids, their_start = theirs.process(row)
    assert ids == list(their_ids) and start == their_start
    if "tools" in row:
        assert ids != encode_row(tokenizer, {k: v for k, v in row.items() if k != "tools"}, "row", mask_prompt)[0]
    # the loss mask over the targets, as mlx-lm's default_loss builds it from (offset, length)
    other = ([7] * (len(ids) + 5), 0)  # a longer row in the same batch, so this one is padded
    _, _, mask = collate([(ids, start), other])
    (batch, lengths) = next(iterate_batches([(ids, start), other], 2, 4096))
    steps = mx.arange(1, batch.shape[1])
    their_mask = mx.logical_and(steps >= lengths[:, 0:1], steps <= lengths[:, 1:])
    row_of = 0 if len(ids) <= len(other[0]) else 1  # mlx-lm sorts the batch by length
    n = len(ids) - 1  # targets of the real tokens
    assert mask[0, :n].tolist() == their_mask[row_of, :n].astype(mx.float32).tolist()
    # mlx-lm also counts the target after a padded row's last token (the pad id); we do not
    assert mask[0, n:].sum().item() == 0 and their_mask[row_of, n].item()


def test_hub_dataset_id_fails_offline_in_one_line(tmp_path, tiny_gguf, capsys):
    """A --data that is no local path is read as a Hugging Face dataset id, as mlx-lm does; here (no hub, and the
    optional `datasets` package absent or offline) it fails before any work with one line that says what to do."""
    from mesp_mlx.train import main
    rc = main(["--model", str(tiny_gguf), "--data", "someone/some-dataset", "--sample-prompt", "",
               "--adapter-path", str(tmp_path / "a")])
    err = capsys.readouterr().err
    assert rc == 2 and "someone/some-dataset" in err and "train.jsonl" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
