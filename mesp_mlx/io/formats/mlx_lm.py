"""mlx-lm's own adapter folder (adapters.safetensors + adapter_config.json): what `mesp_mlx.train` writes, so the
writer copies it and the reader checks it against the model."""
import json
import shutil
from pathlib import Path

from ...lora import LoRAConfig, layer_keys, resolve_keys
from .. import SourceError

DEFAULT_OUT = "mlx-lm"


def export(adapter_dir, params, lora, store, out, **_):
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("adapters.safetensors", "adapter_config.json"):
        if (Path(adapter_dir) / name).resolve() != (out / name).resolve():
            shutil.copy(Path(adapter_dir) / name, out / name)
    return (f"scale: mlx-lm's lora_parameters.scale = {lora.scale:g} multiplies x A B (no alpha); "
            f"rank {lora.rank}")


def read_config(adapter_dir, store):
    """An mlx-lm adapter folder's LoRAConfig and the {name: shape} its weights must have for the store."""
    adapter_dir = Path(adapter_dir)
    cfg_file = adapter_dir / "adapter_config.json"
    if not adapter_dir.is_dir():
        raise SourceError(f"{adapter_dir}: no such adapter directory")
    try:
        cfg = json.loads(cfg_file.read_text())
        lp = cfg["lora_parameters"]
        keys = resolve_keys(lp.get("keys") or [p.split(".")[-1] for p in store.args.projections()])
        lora = LoRAConfig(int(lp["rank"]), float(lp["scale"]), keys, int(cfg.get("num_layers", -1)))
        per_layer = {i: layer_keys(store.args, lora.keys, i) for i in lora.layers(store.num_layers)}
    except OSError:
        raise SourceError(f"{cfg_file}: missing (expected an adapter directory written by mesp_mlx.train or "
                          "mlx_lm.lora)") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise SourceError(f"{cfg_file}: not a usable adapter config ({type(e).__name__}: {e})") from None
    expected = {}
    for i, paths in per_layer.items():  # each block's own projections among the keys, as mlx-lm adapts them
        shapes = store.args.projection_shapes(i)
        for path in paths:
            expected[f"model.layers.{i}.{path}.lora_a"] = (shapes[path][0], lora.rank)
            expected[f"model.layers.{i}.{path}.lora_b"] = (lora.rank, shapes[path][1])
    return lora, expected


def model_named(adapter_dir):
    """The model an adapter folder names (its weight store), or None."""
    try:
        return json.loads((Path(adapter_dir) / "adapter_config.json").read_text()).get("model")
    except (OSError, json.JSONDecodeError):
        return None


def file_scale(path):
    """The scale in the adapter_config.json beside an mlx-lm adapter file, or None."""
    try:
        return float(json.loads((Path(path).parent / "adapter_config.json").read_text())["lora_parameters"]["scale"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
