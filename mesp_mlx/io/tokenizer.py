"""Tokenizers: from a model directory (Hugging Face files) or built from a GGUF file's metadata.

GPT-2 style byte-level BPE vocabularies (llama-bpe, qwen2, smollm, gpt2 pre-tokenizers) are rebuilt with the
`tokenizers` library from the GGUF's tokens and merges, with the pre-tokenizer the file names; tokens of type 3
(control) and 4 (user-defined) become special tokens. SentencePiece vocabularies (llama-spm) go through
transformers' own GGUF reader. Either way the result is saved as tokenizer.json + tokenizer_config.json beside
the converted weights, so mlx-lm and transformers load it like any other model directory.
"""
from . import SourceError
from .gguf import field

# Split patterns of the pre-tokenizers named in tokenizer.ggml.pre (public tokenizer configurations).
_GPT2 = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_LLAMA3 = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
           r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
_QWEN2 = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
          r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
_SPLITS = {"llama-bpe": _LLAMA3, "llama3": _LLAMA3, "qwen2": _QWEN2, "deepseek-llm": _LLAMA3}


def _byte_level_tokenizer(reader, path):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    tokens = [str(t) for t in field(reader, "tokenizer.ggml.tokens")]
    merges = [tuple(str(m).split(" ", 1)) for m in field(reader, "tokenizer.ggml.merges") or []]
    types = field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    pre = field(reader, "tokenizer.ggml.pre", "gpt2")
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, fuse_unk=False,
                               ignore_merges=pre in ("llama-bpe", "llama3")))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if pre == "smollm":  # digits split one by one, then GPT-2's pattern
        splits = [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    elif pre in _SPLITS:
        splits = [pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"), byte_level]
    elif pre in ("gpt2", "default"):
        splits = [pre_tokenizers.ByteLevel(add_prefix_space=False)]
    else:
        raise SourceError(f"{path}: GGUF pre-tokenizer {pre!r} is not supported "
                          f"(supported: gpt2, smollm, {', '.join(_SPLITS)})")
    tok.pre_tokenizer = pre_tokenizers.Sequence(splits)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([t for t, ty in zip(tokens, types) if int(ty) in (3, 4)])
    return tok


def tokenizer_from_gguf(reader, path, out_dir):
    """Writes tokenizer files for the GGUF's vocabulary into out_dir."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    kind = field(reader, "tokenizer.ggml.model")
    if kind is None:
        raise SourceError(f"{path}: GGUF file has no tokenizer (tokenizer.ggml.model missing)")
    tokens = field(reader, "tokenizer.ggml.tokens")
    special = lambda key: None if field(reader, key) is None else str(tokens[int(field(reader, key))])
    if kind == "gpt2":
        hf = PreTrainedTokenizerFast(tokenizer_object=_byte_level_tokenizer(reader, path),
                                     bos_token=special("tokenizer.ggml.bos_token_id"),
                                     eos_token=special("tokenizer.ggml.eos_token_id"),
                                     unk_token=special("tokenizer.ggml.unknown_token_id"),
                                     pad_token=special("tokenizer.ggml.padding_token_id"))
        if field(reader, "tokenizer.ggml.add_bos_token", False):
            hf.add_bos_token = True
    elif kind == "llama":
        hf = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    else:
        raise SourceError(f"{path}: GGUF tokenizer model {kind!r} is not supported (supported: gpt2, llama)")
    template = field(reader, "tokenizer.chat_template")
    if template:
        hf.chat_template = str(template)
    hf.save_pretrained(str(out_dir))


def load_tokenizer(model_dir):
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as e:
        raise SourceError(f"{model_dir}: no usable tokenizer ({type(e).__name__}: {e})") from None
