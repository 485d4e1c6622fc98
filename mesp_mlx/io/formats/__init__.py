"""An adapter in the formats other tools read, and back: one module per format, each a writer (`export`, which
returns the line to show the user) and, where the format is an adapter, a reader, listed once in FORMATS (the CLI's
--format choices come from it).

Conventions. Our parameters are mlx-lm's: lora_a (in, r), lora_b (r, out), y = W x + scale * x A B, kept in the
weight store's row order. PEFT and llama.cpp both store A as (r, in) and B as (out, r) and apply alpha / r, so they
get alpha = scale * r. What differs by architecture (llama.cpp's names, q/k row order) comes from the family's
record (`models/<family>.py`); every reader gives back bit for bit what its writer was given.
"""
import sys
from pathlib import Path

import mlx.core as mx

from ...lora import from_flat
from ...models import mlx_lm_prefix
from .. import SourceError
from ..adapters import atomic_directory, hold_folder, value_head_order
from . import fused, gguf_lora, mlx_lm, ollama, peft

FORMATS = {"mlx-lm": mlx_lm, "gguf": gguf_lora, "peft": peft, "fused": fused, "ollama": ollama}


def export_adapter(adapter_dir, fmt="mlx-lm", out=None, model=None, dtype="float16", quantize=None):
    """Export an mlx-lm adapter folder to `fmt`; returns (output path, lines to show the user)."""
    from ..sources import load_model
    if fmt not in FORMATS:
        raise SourceError(f"format {fmt!r} is not one of {', '.join(FORMATS)}")
    if dtype not in fused.DTYPES:
        raise SourceError(f"dtype {dtype!r} is not one of {', '.join(fused.DTYPES)}")
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").exists():
        raise SourceError(f"{adapter_dir}: no adapter_config.json (expected an adapter directory written by "
                          "mesp_mlx.train or mlx_lm.lora)")
    model = model or mlx_lm.model_named(adapter_dir)
    if not model:
        raise SourceError(f"{adapter_dir / 'adapter_config.json'}: names no model; pass --model")
    store = load_model(model)
    lora, expected = mlx_lm.read_config(adapter_dir, store)
    params = load_adapter_weights(adapter_dir / "adapters.safetensors", expected, store=store)
    writer = FORMATS[fmt]
    out = Path(out) if out else adapter_dir / writer.DEFAULT_OUT
    options = dict(dtype=dtype, quantize=quantize)
    inside = adapter_dir.resolve() in (out.resolve(), *out.resolve().parents)
    with hold_folder(adapter_dir, lock=inside):  # writing into a folder a run holds is refused, as a second run is
        if getattr(writer, "SINGLE_FILE", False) or (fmt == "mlx-lm" and out.resolve() == adapter_dir.resolve()):
            line = writer.export(adapter_dir, params, lora, store, out, **options)  # written beside, then renamed
        else:
            with atomic_directory(out) as tmp:  # a folder appears whole or not at all
                line = writer.export(adapter_dir, params, lora, store, tmp, **options)
    return out, [line]


def read_foreign(path, store):
    """A PEFT folder / adapter_model.safetensors or a GGUF LoRA -> ({mlx-lm name: numpy}, scale) in the store's q/k
    row order and mlx-lm's value-head order (adapters.value_head_order); None when `path` is neither (an mlx-lm
    file)."""
    for name, reader in (("GGUF", gguf_lora.is_gguf), ("PEFT", peft.is_peft)):
        if reader(path):
            if store is None:
                raise SourceError(f"{path}: importing a {name} adapter needs the model it applies to (its q/k row "
                                  "order)")
            return (gguf_lora if name == "GGUF" else peft).read(path, store)
    return None


def load_adapter_weights(path, expected, scale=None, store=None):
    """Adapter file -> params, checked against the expected {name: shape} (names as `to_flat` gives them without a
    prefix; an mlx-lm file's names must carry the model's mlx_lm_prefix, as mlx-lm's module tree names them).

    Besides mlx-lm's adapters.safetensors, `path` may be a PEFT folder (or its adapter_model.safetensors) or a GGUF
    LoRA; those need `store` (the model, for its family and q/k row order). When `scale` (the run's) is given and the
    file was trained with another (PEFT/GGUF: alpha / r; mlx-lm: adapter_config.json beside the file), lora_b is
    multiplied by file scale / run scale, so the adapted model stays the same, and a note says so."""
    foreign = read_foreign(path, store)
    prefix = ""
    if foreign is not None:
        flat, file_scale = {k: mx.array(v) for k, v in foreign[0].items()}, foreign[1]
    else:
        prefix = mlx_lm_prefix(store.args) if store is not None else ""
        expected = {prefix + k: v for k, v in expected.items()}
        try:
            flat = mx.load(str(path))
        except Exception as e:
            raise SourceError(f"{path}: not a readable adapter file ({e})") from None
        file_scale = mlx_lm.file_scale(path) if scale is not None else None
    wrong = [f"{k}: {tuple(v.shape)} (expected {expected.get(k)})" for k, v in flat.items()
             if tuple(v.shape) != expected.get(k)]
    missing = sorted(set(expected) - set(flat))
    if wrong or missing:
        raise SourceError(f"{path}: adapter does not fit the model: " + "; ".join(wrong[:3] + missing[:3]))
    if store is not None:  # every file has mlx-lm's value-head order; a store may not
        flat = value_head_order({k[len(prefix):]: v for k, v in flat.items()}, store.args, to_store=True)
        prefix = ""
    if scale is not None and file_scale is not None and abs(file_scale - scale) > 1e-6 * abs(scale):
        print(f"[mesp-mlx] note: {path} was trained with scale {file_scale:g}, this run uses {scale:g}: lora_b "
              f"multiplied by {file_scale / scale:g} so the adapted model is unchanged", file=sys.stderr)
        flat = {k: v * (file_scale / scale) if k.endswith("lora_b") else v for k, v in flat.items()}
    return from_flat({k[len(prefix):]: v for k, v in flat.items()})
