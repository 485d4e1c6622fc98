"""An adapter in the formats other tools read, and back: PEFT (Hugging Face), GGUF LoRA (llama.cpp, Ollama, LM
Studio), mlx-lm's own folder, and the base with the adapter merged in ("fused"). Writer and reader of each format sit
side by side, and every reader gives back bit for bit what its writer was given.

Conventions. Our parameters are mlx-lm's: lora_a (in, r), lora_b (r, out), y = W x + scale * x A B, kept in the
weight store's row order. PEFT and llama.cpp both store A as (r, in) and B as (out, r) and apply alpha / r, so we
write alpha = scale * r. Row order: llama.cpp's converter permutes a Llama's q/k rows for its interleaved rope; a store
converted from a Llama GGUF keeps those rows (and rope_traditional), a store from a Hugging Face directory does not.
So the q/k lora_b output units are permuted on the way into llama.cpp's order and un-permuted on the way into
Hugging Face's, according to where the store came from. Qwen files are never permuted.
"""
import json
import os
import shutil
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..lora import LoRAConfig, from_flat, resolve_keys, to_flat
from . import SourceError
from .adapters import atomic_directory, atomic_save_safetensors
from .gguf import NAMES as GGUF_TO_HF
from .store import EMBED_FILE, STORE_MARK, layer_file

FORMATS = ("mlx-lm", "gguf", "peft", "fused")
HF_TO_GGUF = {v: k for k, v in GGUF_TO_HF.items()}
PEFT_PREFIX = "base_model.model."


# -- row order ---------------------------------------------------------------------------------------------------

def llamacpp_rows(store):
    """True when the store's q/k rows are in llama.cpp's permuted order (a store converted from a Llama GGUF)."""
    try:
        kind = json.loads((store.path / STORE_MARK).read_text()).get("kind")
    except (OSError, json.JSONDecodeError):
        kind = None
    if kind is None:  # not one of our stores: our GGUF loader is what sets rope_traditional on a llama
        kind = "gguf" if store.config.get("rope_traditional") else "hf-dir"
    return store.args.model_type == "llama" and kind == "gguf"


def permute_rows(arr, n, inverse=False):
    """llama.cpp's q/k permutation of axis 0 (n heads, each [first half | second half] -> interleaved pairs)."""
    arr = np.asarray(arr)
    split = (n, 2, arr.shape[0] // n // 2) if not inverse else (n, arr.shape[0] // n // 2, 2)
    return arr.reshape(*split, *arr.shape[1:]).swapaxes(1, 2).reshape(arr.shape)


def _reorder_qk(flat, args, inverse):
    """Permute (or un-permute) the output units of q/k lora_b (r, out) of a Llama; flat: mlx-lm names -> numpy."""
    if args.model_type != "llama":
        return flat
    heads = {"self_attn.q_proj": args.num_attention_heads, "self_attn.k_proj": args.num_key_value_heads}
    out = dict(flat)
    for name, arr in flat.items():
        path = name.split(".", 3)[3].rsplit(".", 1)[0]
        if name.endswith(".lora_b") and path in heads:
            out[name] = np.ascontiguousarray(permute_rows(arr.T, heads[path], inverse).T)
    return out


def _to_numpy(params):
    return {k: np.array(v.astype(mx.float32)) for k, v in to_flat(params).items()}


def _parse(name):
    """mlx-lm name -> (block, module path, leaf)."""
    _, _, i, rest = name.split(".", 3)
    path, leaf = rest.rsplit(".", 1)
    return int(i), path, leaf


# -- reading our adapter folder ----------------------------------------------------------------------------------

def read_adapter_dir(adapter_dir, store):
    """An mlx-lm adapter folder -> (params, LoRAConfig), checked against the store's shapes."""
    adapter_dir = Path(adapter_dir)
    cfg_file = adapter_dir / "adapter_config.json"
    if not adapter_dir.is_dir():
        raise SourceError(f"{adapter_dir}: no such adapter directory")
    try:
        cfg = json.loads(cfg_file.read_text())
        lp = cfg["lora_parameters"]
        keys = resolve_keys(lp.get("keys") or [p.split(".")[-1] for p in store.args.projection_shapes()])
        lora = LoRAConfig(int(lp["rank"]), float(lp["scale"]), keys, int(cfg.get("num_layers", -1)))
    except OSError:
        raise SourceError(f"{cfg_file}: missing (expected an adapter directory written by mesp_mlx.train or "
                          "mlx_lm.lora)") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise SourceError(f"{cfg_file}: not a usable adapter config ({type(e).__name__}: {e})") from None
    shapes = store.args.projection_shapes()
    expected = {}
    for i in lora.layers(store.num_layers):
        for path in lora.keys:
            expected[f"model.layers.{i}.{path}.lora_a"] = (shapes[path][0], lora.rank)
            expected[f"model.layers.{i}.{path}.lora_b"] = (lora.rank, shapes[path][1])
    return load_adapter_weights(adapter_dir / "adapters.safetensors", expected), lora


def adapter_model(adapter_dir):
    """The model an adapter folder names (its weight store), or None."""
    try:
        return json.loads((Path(adapter_dir) / "adapter_config.json").read_text()).get("model")
    except (OSError, json.JSONDecodeError):
        return None


# -- mlx-lm ------------------------------------------------------------------------------------------------------

def export_mlx_lm(adapter_dir, out, lora):
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("adapters.safetensors", "adapter_config.json"):
        if (Path(adapter_dir) / name).resolve() != (out / name).resolve():
            shutil.copy(Path(adapter_dir) / name, out / name)
    return (f"scale: mlx-lm's lora_parameters.scale = {lora.scale:g} multiplies x A B (no alpha); "
            f"rank {lora.rank}")


# -- PEFT ----------------------------------------------------------------------------------------------------------

def export_peft(params, lora, store, out, base_name=None):
    """adapter_model.safetensors (lora_A (r, in), lora_B (out, r), Hugging Face names and row order) +
    adapter_config.json with lora_alpha = scale * r."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    flat = _to_numpy(params)
    if llamacpp_rows(store):
        flat = _reorder_qk(flat, store.args, inverse=True)
    tensors = {}
    for name, arr in flat.items():
        i, path, leaf = _parse(name)
        peft_leaf = "lora_A" if leaf == "lora_a" else "lora_B"
        tensors[f"{PEFT_PREFIX}model.layers.{i}.{path}.{peft_leaf}.weight"] = mx.array(np.ascontiguousarray(arr.T))
    atomic_save_safetensors(out / "adapter_model.safetensors", tensors, {"format": "pt"})
    layers = sorted(params)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.rank, "lora_alpha": lora.scale * lora.rank,
              "target_modules": sorted({p.split(".")[-1] for mods in params.values() for p in mods}),
              "lora_dropout": lora.dropout, "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
              "inference_mode": True, "modules_to_save": None,
              "layers_to_transform": None if len(layers) == store.num_layers else layers,
              "base_model_name_or_path": base_name or _source(store)}
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return (f"scale: PEFT's lora_alpha = {config['lora_alpha']:g} with r = {lora.rank}; PEFT applies "
            f"lora_alpha / r = {lora.scale:g}, our scale")


def read_peft(path):
    """A PEFT folder (or its adapter_model.safetensors) -> ({mlx-lm name: numpy}, scale), Hugging Face row order."""
    path = Path(path)
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
    for name, arr in tensors.items():
        parts = name.removeprefix(PEFT_PREFIX).replace(".default.", ".").split(".")
        if len(parts) < 6 or parts[:2] != ["model", "layers"] or parts[-2] not in ("lora_A", "lora_B"):
            raise SourceError(f"{weights}: tensor {name} is not a LoRA A/B of a decoder layer")
        leaf = "lora_a" if parts[-2] == "lora_A" else "lora_b"
        flat[f"model.layers.{parts[2]}.{'.'.join(parts[3:-2])}.{leaf}"] = np.array(arr.astype(mx.float32)).T
    return flat, alpha / (np.sqrt(r) if cfg.get("use_rslora") else r)


# -- GGUF LoRA -----------------------------------------------------------------------------------------------------

def export_gguf(params, lora, store, out_file):
    """A GGUF LoRA adapter as llama.cpp's `--lora` reads it: lora_a (numpy (r, in), ggml ne [in, r]), lora_b
    (numpy (out, r), ne [r, out]) in F32, named after the base tensor, alpha = scale * r, llama.cpp's row order."""
    import gguf
    arch = store.args.model_type
    flat = _to_numpy(params)
    if not llamacpp_rows(store):
        flat = _reorder_qk(flat, store.args, inverse=False)
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_name(f".{out_file.name}.tmp")
    alpha = float(np.float32(lora.scale * lora.rank))
    try:
        w = gguf.GGUFWriter(str(tmp), arch)
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        w.add_name(f"mesp-mlx LoRA for {Path(_source(store)).name}")
        for name in sorted(flat, key=lambda n: (_parse(n)[0], n)):
            i, path, leaf = _parse(name)
            w.add_tensor(f"blk.{i}.{HF_TO_GGUF[path]}.weight.{leaf}", np.ascontiguousarray(flat[name].T))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, out_file)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise SourceError(f"{out_file}: could not write it ({e.strerror or e})") from None
    return (f"scale: GGUF adapter.lora.alpha = {alpha:g} with rank {lora.rank}; llama.cpp applies alpha / rank = "
            f"{alpha / lora.rank:g} (times --lora-scaled's factor, 1 with --lora)")


def read_gguf_lora(path):
    """A GGUF LoRA -> ({mlx-lm name: numpy}, scale, architecture), llama.cpp's row order."""
    from .gguf import field, open_gguf
    import gguf.quants
    reader = open_gguf(path)
    if field(reader, "general.type") != "adapter" or field(reader, "adapter.type") != "lora":
        raise SourceError(f"{path}: not a GGUF LoRA adapter (general.type {field(reader, 'general.type')!r}, "
                          f"adapter.type {field(reader, 'adapter.type')!r})")
    flat = {}
    for t in reader.tensors:
        parts = t.name.split(".")
        if len(parts) != 5 or parts[0] != "blk" or parts[3] != "weight" or parts[4] not in ("lora_a", "lora_b") \
                or GGUF_TO_HF.get(parts[2]) not in HF_TO_GGUF or GGUF_TO_HF[parts[2]].endswith("norm"):
            raise SourceError(f"{path}: tensor {t.name} is not a LoRA A/B of a block projection")
        arr = np.asarray(t.data)
        if t.tensor_type != gguf.GGMLQuantizationType.F32:
            arr = gguf.quants.dequantize(arr, t.tensor_type)
        arr = arr.astype(np.float32).reshape([int(s) for s in reversed(t.shape)])
        flat[f"model.layers.{parts[1]}.{GGUF_TO_HF[parts[2]]}.{parts[4]}"] = arr.T
    ranks = {a.shape[0] for n, a in flat.items() if n.endswith("lora_b")}
    alpha = float(field(reader, "adapter.lora.alpha", 0.0))
    if len(ranks) != 1:
        raise SourceError(f"{path}: tensors of {len(ranks)} different ranks; one alpha cannot scale them")
    # llama.cpp: alpha 0 means "no alpha", the product is used unscaled
    return flat, (alpha / ranks.pop() if alpha else 1.0), field(reader, "general.architecture")


def read_foreign(path, store):
    """A PEFT folder / adapter_model.safetensors or a GGUF LoRA -> ({mlx-lm name: numpy}, scale) in the store's row
    order; None when `path` is neither (an mlx-lm file)."""
    path = Path(path)
    is_gguf = False
    if path.is_file():
        with open(path, "rb") as f:
            is_gguf = f.read(4) == b"GGUF"
    is_peft = (path / "adapter_model.safetensors").exists() if path.is_dir() \
        else path.name == "adapter_model.safetensors"
    if not (is_gguf or is_peft):
        return None
    if store is None:
        raise SourceError(f"{path}: importing a {'GGUF' if is_gguf else 'PEFT'} adapter needs the model it applies "
                          "to (its q/k row order)")
    if is_gguf:
        flat, scale, arch = read_gguf_lora(path)
        if arch != store.args.model_type:
            raise SourceError(f"{path}: a LoRA for a {arch} model, not for this {store.args.model_type} model")
        return (_reorder_qk(flat, store.args, inverse=True) if not llamacpp_rows(store) else flat), scale
    flat, scale = read_peft(path)
    return (_reorder_qk(flat, store.args, inverse=False) if llamacpp_rows(store) else flat), scale


# -- fused -----------------------------------------------------------------------------------------------------------

def _dense32(frozen):
    from ..ops.linear import dense
    return dense(frozen, mx.float32)


def export_fused(params, lora, store, out, dtype="float16", quantize=None, probe_tokens=16):
    """The base with W + scale * (A B)^T merged in fp32, written in `dtype` (or re-quantized: quantize = (group,
    bits)) as an mlx-lm / Hugging Face model directory in the store's layout, one block at a time. q/k rows go back to
    Hugging Face order, so the result needs no rope_traditional. Returns (message, max |logit error| relative to
    max |logit|) measured against the adapted model on `probe_tokens` token ids."""
    from ..model import logits
    from .store import WeightStore
    from .sources import TOKENIZER_FILES
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    target = getattr(mx, dtype)
    args, permuted = store.args, llamacpp_rows(store)
    heads = {"self_attn.q_proj": args.num_attention_heads, "self_attn.k_proj": args.num_key_value_heads}
    weight_map = {}

    def put(fname, arrays):
        tensors = {}
        for name, arr in arrays.items():
            module, leaf = name.rsplit(".", 1)
            if quantize and leaf == "weight" and arr.ndim == 2 and arr.shape[1] % quantize[0] == 0:
                w, s, b = mx.quantize(arr.astype(mx.float32), group_size=quantize[0], bits=quantize[1])
                tensors.update({name: w, f"{module}.scales": s.astype(target), f"{module}.biases": b.astype(target)})
            else:
                tensors[name] = arr.astype(target)
        mx.save_safetensors(str(out / fname), tensors, metadata={"format": "pt"})
        weight_map.update({k: fname for k in tensors})

    for i in range(store.num_layers):
        arrays = {}
        for module, w in store.layer(i).items():
            name = f"model.layers.{i}.{module}"
            if isinstance(w, mx.array):  # a norm
                arrays[f"{name}.weight"] = w
                continue
            dense, bias = _dense32(w), w.bias
            if module in params.get(i, {}):
                a, b = params[i][module]
                dense = dense + lora.scale * (a.astype(mx.float32) @ b.astype(mx.float32)).T
            if permuted and module in heads:
                dense = mx.array(permute_rows(dense, heads[module], inverse=True))
                bias = None if bias is None else mx.array(permute_rows(bias, heads[module], inverse=True))
            arrays[f"{name}.weight"] = dense
            if bias is not None:
                arrays[f"{name}.bias"] = bias
        mx.eval(arrays)
        put(layer_file(i), arrays)
    top = {"model.embed_tokens.weight": _dense32(store.embedding()), "model.norm.weight": store.final_norm()}
    if not args.tie_word_embeddings:
        top["lm_head.weight"] = _dense32(store.head())
    put(EMBED_FILE, top)

    config = {k: v for k, v in store.config.items() if k not in ("quantization", "quantization_config")}
    config["torch_dtype"] = dtype
    if permuted:
        config["rope_traditional"] = False
    if quantize:
        config["quantization"] = config["quantization_config"] = {"group_size": quantize[0], "bits": quantize[1]}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    total = sum((out / f).stat().st_size for f in set(weight_map.values()))
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}, indent=1))
    for name in TOKENIZER_FILES:
        if (store.path / name).exists():
            shutil.copy(store.path / name, out / name)

    ids = mx.array([[(7 + 31 * k) % args.vocab_size for k in range(probe_tokens)]])
    ref = logits(store, ids, params, lora.scale)
    got = logits(WeightStore(out), ids)
    err = float(mx.max(mx.abs(got.astype(mx.float32) - ref))) / max(float(mx.max(mx.abs(ref))), 1e-30)
    kind = f"{quantize[1]}-bit group {quantize[0]}" if quantize else dtype
    return (f"scale: merged W + {lora.scale:g} * (A B)^T in fp32, written as {kind}; no adapter scale remains. "
            f"max |logit error| vs the adapted model on {probe_tokens} tokens: {err:.2e} of max |logit|"), err


def _source(store):
    try:
        return json.loads((store.path / STORE_MARK).read_text())["source"]
    except (OSError, json.JSONDecodeError, KeyError):
        return str(store.path)


# -- one call for the CLI ------------------------------------------------------------------------------------------

DEFAULT_OUT = {"mlx-lm": "mlx-lm", "gguf": "adapter-lora.gguf", "peft": "peft", "fused": "fused"}


def export_adapter(adapter_dir, fmt="mlx-lm", out=None, model=None, dtype="float16", quantize=None):
    """Export an mlx-lm adapter folder to `fmt`; returns (output path, lines to show the user)."""
    from .sources import load_model
    if fmt not in FORMATS:
        raise SourceError(f"format {fmt!r} is not one of {', '.join(FORMATS)}")
    if dtype not in ("float16", "bfloat16", "float32"):
        raise SourceError(f"dtype {dtype!r} is not one of float16, bfloat16, float32")
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").exists():
        raise SourceError(f"{adapter_dir}: no adapter_config.json (expected an adapter directory written by "
                          "mesp_mlx.train or mlx_lm.lora)")
    model = model or adapter_model(adapter_dir)
    if not model:
        raise SourceError(f"{adapter_dir / 'adapter_config.json'}: names no model; pass --model")
    store = load_model(model)
    params, lora = read_adapter_dir(adapter_dir, store)
    out = Path(out) if out else adapter_dir / DEFAULT_OUT[fmt]
    if fmt == "gguf":  # one file, itself written beside its target and renamed
        return out, [export_gguf(params, lora, store, out)]
    if fmt == "mlx-lm" and out.resolve() == adapter_dir.resolve():
        return out, [export_mlx_lm(adapter_dir, out, lora)]
    with atomic_directory(out) as tmp:  # a folder appears whole or not at all
        if fmt == "mlx-lm":
            lines = [export_mlx_lm(adapter_dir, tmp, lora)]
        elif fmt == "peft":
            lines = [export_peft(params, lora, store, tmp)]
        else:
            lines = [export_fused(params, lora, store, tmp, dtype, quantize)[0]]
    return out, lines


def load_adapter_weights(path, expected, scale=None, store=None):
    """Adapter file -> params, checked against the expected {name: shape}.

    Besides mlx-lm's adapters.safetensors, `path` may be a PEFT folder (or its adapter_model.safetensors) or a GGUF
    LoRA; those need `store` (the model, for its q/k row order: io/adapter_formats.py). When `scale` (the run's) is
    given and the file was trained with another (PEFT/GGUF: alpha / r; mlx-lm: adapter_config.json beside the file),
    lora_b is multiplied by file scale / run scale, so the adapted model stays the same, and a note says so."""
    foreign = read_foreign(path, store)
    if foreign is not None:
        flat, file_scale = {k: mx.array(v) for k, v in foreign[0].items()}, foreign[1]
    else:
        try:
            flat = mx.load(str(path))
        except Exception as e:
            raise SourceError(f"{path}: not a readable adapter file ({e})") from None
        file_scale = _mlx_lm_scale(path) if scale is not None else None
    wrong = [f"{k}: {tuple(v.shape)} (expected {expected.get(k)})" for k, v in flat.items()
             if tuple(v.shape) != expected.get(k)]
    missing = sorted(set(expected) - set(flat))
    if wrong or missing:
        raise SourceError(f"{path}: adapter does not fit the model: " + "; ".join(wrong[:3] + missing[:3]))
    if scale is not None and file_scale is not None and abs(file_scale - scale) > 1e-6 * abs(scale):
        print(f"[mesp-mlx] note: {path} was trained with scale {file_scale:g}, this run uses {scale:g}: lora_b "
              f"multiplied by {file_scale / scale:g} so the adapted model is unchanged", file=sys.stderr)
        flat = {k: v * (file_scale / scale) if k.endswith("lora_b") else v for k, v in flat.items()}
    return from_flat(flat)


def _mlx_lm_scale(path):
    """The scale in the adapter_config.json beside an mlx-lm adapter file, or None."""
    try:
        return float(json.loads((Path(path).parent / "adapter_config.json").read_text())["lora_parameters"]["scale"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
