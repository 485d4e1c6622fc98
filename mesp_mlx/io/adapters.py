"""Adapters in exactly mlx-lm's format, written atomically (temporary file, then rename): a crash never leaves a
half-written adapter in place of a good one."""
import json
import os
from pathlib import Path

import mlx.core as mx

from ..lora import from_flat, to_flat
from . import SourceError


def atomic_save_safetensors(path, arrays):
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp.safetensors")
    mx.save_safetensors(str(tmp), arrays)
    os.replace(tmp, path)


def save_adapter(out_dir, params, lora_cfg, model_path, step=None):
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    flat = {k: v.astype(mx.float32) for k, v in to_flat(params).items()}
    config = {"fine_tune_type": "lora", "model": str(model_path), "num_layers": lora_cfg.num_layers,
              "lora_parameters": {"rank": lora_cfg.rank, "scale": lora_cfg.scale, "dropout": lora_cfg.dropout,
                                  "keys": list(lora_cfg.keys)}}
    if step is not None:
        atomic_save_safetensors(out / f"{step:07d}_adapters.safetensors", flat)
    atomic_save_safetensors(out / "adapters.safetensors", flat)
    tmp = out / ".adapter_config.json.tmp"
    tmp.write_text(json.dumps(config, indent=2))
    os.replace(tmp, out / "adapter_config.json")


def load_adapter_weights(path, expected):
    """Adapter file -> params, checked against the expected {name: shape}."""
    try:
        flat = mx.load(str(path))
    except Exception as e:
        raise SourceError(f"{path}: not a readable adapter file ({e})") from None
    wrong = [f"{k}: {tuple(v.shape)} (expected {expected.get(k)})" for k, v in flat.items()
             if tuple(v.shape) != expected.get(k)]
    missing = sorted(set(expected) - set(flat))
    if wrong or missing:
        raise SourceError(f"{path}: adapter does not fit the model: " + "; ".join(wrong[:3] + missing[:3]))
    return from_flat(flat)
