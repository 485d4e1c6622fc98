"""Architecture registry: model_type -> the file that reads its config."""
from . import gemma3, llama, mistral, phi3, qwen2, qwen3, smollm3
from ..errors import SourceError
from .base import ModelArgs

ARCHITECTURES = {"llama": llama, "mistral": mistral, "smollm3": smollm3, "qwen2": qwen2, "qwen3": qwen3,
                 "phi3": phi3, "gemma3_text": gemma3, "gemma3": gemma3}


class UnsupportedModel(SourceError):
    pass


def text_model(config):
    """(config, rename) for a checkpoint whose language model is one part of a larger model (Gemma 3's multimodal
    configs): the language model's own config, and a map from tensor names to its names (None: not its tensor)."""
    if config.get("model_type") == "gemma3":
        return gemma3.text_config(config), gemma3.text_weight
    return config, lambda name: name


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
