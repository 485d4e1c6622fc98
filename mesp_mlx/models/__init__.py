"""Architecture registry: one file per family, each with its config reader (`model_args`) and its `FAMILY` record;
model_type or llama.cpp architecture -> that file. Adding a family is one file here plus its tests."""
from . import gemma3, llama, mistral, phi3, qwen2, qwen3, qwen3_5, smollm3
from ..errors import SourceError
from .base import Family, ModelArgs

# Llama before Mistral: llama.cpp writes both as `llama`, and a `llama` GGUF is read as a Llama
FAMILIES = (llama, mistral, smollm3, qwen2, qwen3, phi3, gemma3, qwen3_5)
ARCHITECTURES = {kind: f for f in FAMILIES for kind in f.FAMILY.model_types}
GGUF_ARCHITECTURES = {f.FAMILY.llamacpp_arch: f.FAMILY for f in reversed(FAMILIES)  # the first family wins
                      if f.FAMILY.reads_gguf}


class UnsupportedModel(SourceError):
    pass


def family(model_type) -> Family:
    """The record of a model_type (as a config or a store's args spell it)."""
    if model_type not in ARCHITECTURES:
        raise UnsupportedModel(f"model_type {model_type!r} is not supported "
                               f"(supported: {', '.join(sorted(ARCHITECTURES))})")
    return ARCHITECTURES[model_type].FAMILY


def stop_ids(tokenizer, model_type):
    """The token ids a chat with this family stops on: eos and the family's end-of-turn tokens in this vocabulary."""
    ids = set() if tokenizer.eos_token_id is None else {int(tokenizer.eos_token_id)}
    for t in family(model_type).stop_tokens:
        i = tokenizer.convert_tokens_to_ids(t)
        if isinstance(i, int) and i != tokenizer.unk_token_id:
            ids.add(i)
    return ids


def text_model(config):
    """(config, rename) for a checkpoint whose language model is one part of a larger model (Gemma 3's and
    Qwen3.5's multimodal configs): the language model's own config, and a map from tensor names to its names
    (None: not its tensor)."""
    if config.get("model_type") == "gemma3":
        return gemma3.text_config(config), gemma3.text_weight
    if config.get("model_type") in qwen3_5.FAMILY.model_types:
        return qwen3_5.text_config(config), qwen3_5.text_weight
    return config, lambda name: name


def tensor_fix(config, shapes):
    """f(name, array) -> array: a checkpoint's tensors (names and config as `text_model` gives them, `shapes` their
    {name: shape}) in the form a store keeps (Qwen3.5's Hugging Face form: norms zero-centred, conv1d [C, 1, K])."""
    if config.get("model_type") in qwen3_5.FAMILY.model_types:
        return qwen3_5.sanitizer(shapes)
    return lambda name, arr: arr


def mlx_lm_prefix(args):
    """What mlx-lm's module tree puts before the store's module paths, in adapter names for this model ("" for
    most)."""
    return family(args.model_type).mlx_lm_prefix


def model_args(config, where="config.json"):
    kind = config.get("model_type")
    if kind not in ARCHITECTURES:
        raise UnsupportedModel(f"{where}: model_type {kind!r} is not supported "
                               f"(supported: {', '.join(sorted(ARCHITECTURES))})")
    try:
        args = ARCHITECTURES[kind].model_args(config)
        args.block_specs()  # the rope settings of every layer are checked here, before any work
    except KeyError as e:
        raise UnsupportedModel(f"{where}: missing field {e.args[0]!r} for a {kind} model") from None
    except (ValueError, TypeError, ZeroDivisionError) as e:  # settings our blocks do not implement
        raise UnsupportedModel(f"{where}: {e}") from None
    return args
