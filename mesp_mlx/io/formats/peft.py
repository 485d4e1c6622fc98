"""PEFT (Hugging Face) LoRA folders: adapter_model.safetensors (lora_A (r, in), lora_B (out, r), Hugging Face names
as the family's transformers class nests its layers (Family.hf_layers) and Hugging Face's row order) and adapter_config.json with lora_alpha = scale * r (PEFT applies alpha / r). The base it names is
one a user can load: the hub id or directory the store came from, or for a GGUF its directory, the file being named
in the folder's README.md (transformers loads it with `gguf_file=`)."""
import json
from pathlib import Path

import mlx.core as mx
import numpy as np

from ...models import family
from .. import SourceError
from ..adapters import atomic_save_safetensors, value_head_order
from .common import llamacpp_rows, parse, reorder_qk, store_source, to_numpy

DEFAULT_OUT = "peft"
PREFIX = "base_model.model."


def base_model(store):
    """(name for base_model_name_or_path, GGUF file name or None) of what the store was converted from."""
    source = Path(store_source(store))
    parts = source.parts
    for k in range(len(parts) - 2):  # a hub download: <cache>/models--org--name/snapshots/<revision>
        if parts[k].startswith("models--") and parts[k + 1] == "snapshots":
            return parts[k][len("models--"):].replace("--", "/", 1), None
    if source.suffix == ".gguf" or source.is_file():
        return str(source.parent), source.name
    return str(source), None


def refuse_unsupported(store, where):
    if not family(store.args.model_type).peft:
        raise SourceError(f"{where}: PEFT adapters of {store.args.model_type} models are not supported yet (use the "
                          "mlx-lm or fused format)")


def export(adapter_dir, params, lora, store, out, base_name=None, **_):
    refuse_unsupported(store, out)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    flat = value_head_order(to_numpy(params), store.args, to_store=False)
    if llamacpp_rows(store):
        flat = reorder_qk(flat, store.args, inverse=True)
    layers = family(store.args.model_type).hf_layers
    tensors = {}
    for name, arr in flat.items():
        i, path, leaf = parse(name)
        peft_leaf = "lora_A" if leaf == "lora_a" else "lora_B"
        tensors[f"{PREFIX}{layers}{i}.{path}.{peft_leaf}.weight"] = mx.array(np.ascontiguousarray(arr.T))
    atomic_save_safetensors(out / "adapter_model.safetensors", tensors, {"format": "pt"})
    base, gguf_file = (base_name, None) if base_name else base_model(store)
    layers = sorted(params)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.rank, "lora_alpha": lora.scale * lora.rank,
              "target_modules": sorted({p.split(".")[-1] for mods in params.values() for p in mods}),
              "lora_dropout": lora.dropout, "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
              "inference_mode": True, "modules_to_save": None,
              "layers_to_transform": None if len(layers) == store.num_layers else layers,
              "base_model_name_or_path": base}
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    load = (f'AutoModelForCausalLM.from_pretrained("{base}", gguf_file="{gguf_file}")' if gguf_file
            else f'AutoModelForCausalLM.from_pretrained("{base}")')
    (out / "README.md").write_text(
        f"# LoRA adapter (PEFT) written by mesp-mlx\n\nBase model: `{base}`" +
        (f", file `{gguf_file}` (a GGUF; transformers dequantizes it on load)" if gguf_file else "") +
        f".\n\n```python\nfrom peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n\n"
        f"model = PeftModel.from_pretrained({load}, \"<this folder>\")\n```\n\n"
        f"lora_alpha = {config['lora_alpha']:g} with r = {lora.rank}: the update is scaled by {lora.scale:g}.\n")
    return (f"scale: PEFT's lora_alpha = {config['lora_alpha']:g} with r = {lora.rank}; PEFT applies "
            f"lora_alpha / r = {lora.scale:g}, our scale")


def is_peft(path):
    path = Path(path)
    return (path / "adapter_model.safetensors").exists() if path.is_dir() else path.name == "adapter_model.safetensors"


def read(path, store):
    """A PEFT folder (or its adapter_model.safetensors) -> ({mlx-lm name: numpy}, scale) in the store's row order."""
    path = Path(path)
    refuse_unsupported(store, path)
    folder = path if path.is_dir() else path.parent
    weights = folder / "adapter_model.safetensors"
    try:
        cfg = json.loads((folder / "adapter_config.json").read_text())
        r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise SourceError(f"{folder / 'adapter_config.json'}: not a usable PEFT config ({type(e).__name__}: "
                          f"{e})") from None
    if cfg.get("peft_type", "LORA") != "LORA" or cfg.get("fan_in_fan_out"):
        raise SourceError(f"{folder / 'adapter_config.json'}: only plain LoRA (peft_type LORA, fan_in_fan_out "
                          "false) can be imported")
    try:
        tensors = mx.load(str(weights))
    except Exception as e:
        raise SourceError(f"{weights}: not a readable adapter file ({e})") from None
    flat = {}
    layers = family(store.args.model_type).hf_layers  # transformers' text-only class: model.layers. as others
    for name, arr in tensors.items():
        inner = name.removeprefix(PREFIX).replace(".default.", ".")
        inner = "model.layers." + inner[len(layers):] if inner.startswith(layers) else inner
        parts = inner.split(".")
        if len(parts) < 6 or parts[:2] != ["model", "layers"] or parts[-2] not in ("lora_A", "lora_B"):
            raise SourceError(f"{weights}: tensor {name} is not a LoRA A/B of a decoder layer")
        leaf = "lora_a" if parts[-2] == "lora_A" else "lora_b"
        flat[f"model.layers.{parts[2]}.{'.'.join(parts[3:-2])}.{leaf}"] = np.array(arr.astype(mx.float32)).T
    scale = alpha / (np.sqrt(r) if cfg.get("use_rslora") else r)
    return (reorder_qk(flat, store.args, inverse=False) if llamacpp_rows(store) else flat), scale
