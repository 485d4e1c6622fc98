"""Architecture registry: model_type -> the file that reads its config."""
from . import llama, qwen2, qwen3
from ..errors import SourceError
from .base import ModelArgs

ARCHITECTURES = {"llama": llama, "qwen2": qwen2, "qwen3": qwen3}


class UnsupportedModel(SourceError):
    pass


def model_args(config, where="config.json"):
    kind = config.get("model_type")
    if kind not in ARCHITECTURES:
        raise UnsupportedModel(f"{where}: model_type {kind!r} is not supported "
                               f"(supported: {', '.join(sorted(ARCHITECTURES))})")
    try:
        args = ARCHITECTURES[kind].model_args(config)
        args.block_spec()  # the rope settings are checked here, before any work, not at the first block
    except KeyError as e:
        raise UnsupportedModel(f"{where}: missing field {e.args[0]!r} for a {kind} model") from None
    except (ValueError, TypeError, ZeroDivisionError) as e:  # settings our blocks do not implement
        raise UnsupportedModel(f"{where}: {e}") from None
    return args
