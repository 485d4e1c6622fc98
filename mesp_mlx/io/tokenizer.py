"""Tokenizers: from a model directory (Hugging Face files) or built from a GGUF file's metadata.

Both kinds are rebuilt with the `tokenizers` library alone (transformers' GGUF reader needs torch for SentencePiece
files, and we do not install it). GPT-2 style byte-level BPE vocabularies (`gpt2`: llama-bpe, qwen2, smollm, gpt2
pre-tokenizers) from the GGUF's tokens and merges, with the pre-tokenizer the file names. SentencePiece vocabularies
(`llama`: Llama 2, Gemma, Mistral v1) as llama.cpp tokenizes them: the text's spaces escaped to "▁" (with one
prefixed at the start and after every special token when the file's add_space_prefix says so), then the adjacent
pair whose join is a vocabulary piece of the highest score merged first, and what stays outside the vocabulary
spelled as byte tokens <0xXX>; a BPE whose merges are every such pair ranked by that score does exactly this.
Either way tokens of type 3 (control) and 4 (user-defined) become special tokens, and the result is saved as
tokenizer.json + tokenizer_config.json (chat template, bos/eos) and generation_config.json (eos and end-of-turn ids)
beside the converted weights, so mlx-lm and transformers load it like any other model directory.
"""
import json
from pathlib import Path

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


# llama.cpp's token types: normal, unknown, control, user-defined, unused, byte
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def _sentencepiece_tokenizer(reader, path, tokens, types):
    from tokenizers import Tokenizer, decoders, models, normalizers

    scores = field(reader, "tokenizer.ggml.scores")
    if scores is None or len(scores) != len(tokens):
        raise SourceError(f"{path}: SentencePiece GGUF needs tokenizer.ggml.scores, one per token "
                          f"({len(tokens)} tokens, {0 if scores is None else len(scores)} scores)")
    vocab = {t: i for i, t in enumerate(tokens)}
    mergeable = [i for i, ty in enumerate(types) if int(ty) in (NORMAL, USER_DEFINED)]
    pairs = []
    for i in mergeable:
        t = tokens[i]
        for k in range(1, len(t)):
            if t[:k] in vocab and t[k:] in vocab:
                pairs.append((-float(scores[i]), i, t[:k], t[k:]))
    pairs.sort()
    unk = field(reader, "tokenizer.ggml.unknown_token_id")
    tok = Tokenizer(models.BPE(vocab, [(a, b) for _, _, a, b in pairs], fuse_unk=True, byte_fallback=True,
                               unk_token=None if unk is None else tokens[int(unk)]))
    prefix = bool(field(reader, "tokenizer.ggml.add_space_prefix", True))
    # normalizers run on each stretch of text between special tokens, as llama.cpp's prefix does (Metaspace's
    # "always" would skip a stretch that already starts with a space)
    escape = [normalizers.Prepend("\u2581")] if prefix else []
    tok.normalizer = normalizers.Sequence(escape + [normalizers.Replace(" ", "\u2581")])
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    return tok


def tokenizer_from_gguf(reader, path, out_dir):
    """Writes tokenizer files for the GGUF's vocabulary into out_dir."""
    from transformers import PreTrainedTokenizerFast

    kind = field(reader, "tokenizer.ggml.model")
    if kind is None:
        raise SourceError(f"{path}: GGUF file has no tokenizer (tokenizer.ggml.model missing)")
    tokens = field(reader, "tokenizer.ggml.tokens")
    if not tokens:
        raise SourceError(f"{path}: GGUF tokenizer has no pieces (tokenizer.ggml.tokens missing or empty)")
    tokens = [str(t) for t in tokens]
    types = field(reader, "tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise SourceError(f"{path}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")

    def special(key):
        i = field(reader, key)
        if i is None:
            return None
        if not 0 <= int(i) < len(tokens):
            raise SourceError(f"{path}: {key} is {i}, outside the {len(tokens)}-token vocabulary")
        return tokens[int(i)]

    if kind == "gpt2":
        tok = _byte_level_tokenizer(reader, path)
    elif kind == "llama":
        tok = _sentencepiece_tokenizer(reader, path, tokens, types)
        tok.add_special_tokens([t for t, ty in zip(tokens, types) if int(ty) in (CONTROL, USER_DEFINED)])
    else:
        raise SourceError(f"{path}: GGUF tokenizer model {kind!r} is not supported (supported: gpt2, llama)")
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=special("tokenizer.ggml.bos_token_id"),
                                 eos_token=special("tokenizer.ggml.eos_token_id"),
                                 unk_token=special("tokenizer.ggml.unknown_token_id"),
                                 pad_token=special("tokenizer.ggml.padding_token_id"))
    # llama.cpp's defaults when the file does not say: a BOS for SentencePiece vocabularies, none for GPT-2's
    hf.add_bos_token = bool(field(reader, "tokenizer.ggml.add_bos_token", kind == "llama"))
    hf.add_eos_token = bool(field(reader, "tokenizer.ggml.add_eos_token", False))
    template = field(reader, "tokenizer.chat_template")
    if template:
        hf.chat_template = str(template)
    hf.save_pretrained(str(out_dir))
    stops = [int(field(reader, k)) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")
             if field(reader, k) is not None]
    if stops:  # transformers' generate and mlx-lm stop on every id listed here
        stops = sorted(set(stops), key=stops.index)
        (Path(out_dir) / "generation_config.json").write_text(json.dumps(
            {"eos_token_id": stops[0] if len(stops) == 1 else stops}, indent=2))


def load_tokenizer(model_dir):
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as e:
        raise SourceError(f"{model_dir}: no usable tokenizer ({type(e).__name__}: {e})") from None
