"""Qwen3.5 (dense, llama.cpp architecture `qwen35`) in llama.cpp's GGUF form: tensor names, the transforms its
converter applies to Hugging Face weights, and a LoRA adapter written the way llama.cpp's `--lora` reads it.

The one transform that is not elementwise is the value-head order. When a Gated DeltaNet layer has fewer key heads
than value heads (Hk < Hv), Hugging Face groups the value heads by key head (value head h reads key head h // r,
r = Hv / Hk) while llama.cpp broadcasts q and k by tiling (value head j reads key head j % Hk). llama.cpp's
converter therefore reorders every value-head axis from grouped to tiled: the v rows of in_proj_qkv, the rows of
in_proj_z, in_proj_a, in_proj_b, the entries of A_log and dt_bias, the v channels of conv1d and the columns of
out_proj. A LoRA for such a file must carry the same reorder on its output rows (lora_b) of those projections and
its input columns (lora_a) of out_proj, else llama.cpp applies each head's update to another head.

Everything here is numpy on arrays in Hugging Face's layout (out, in); `dims` is anything with the text config's
fields (a dict or an object): linear_num_key_heads, linear_num_value_heads, linear_key_head_dim,
linear_value_head_dim."""
import os
import re
from pathlib import Path

import numpy as np

# Hugging Face module (inside a decoder layer) -> llama.cpp tensor base name
BLOCK_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "post_attention_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    # gated full attention: q_proj keeps its per-head [query | gate] rows
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    # Gated DeltaNet
    "linear_attn.in_proj_qkv": "attn_qkv", "linear_attn.in_proj_z": "attn_gate",
    "linear_attn.in_proj_a": "ssm_alpha", "linear_attn.in_proj_b": "ssm_beta",
    "linear_attn.out_proj": "ssm_out", "linear_attn.conv1d": "ssm_conv1d", "linear_attn.norm": "ssm_norm",
}
# parameters that are not `<module>.weight`: A_log is stored as ssm_a = -exp(A_log) with no suffix, dt_bias as a bias
LEAF_NAMES = {"linear_attn.A_log": "ssm_a", "linear_attn.dt_bias": "ssm_dt.bias"}
# the zero-centred norms (applied as 1 + w) that the converter stores as 1 + w; linear_attn.norm is a plain weight
SHIFTED_NORMS = ("input_layernorm", "post_attention_layernorm", "self_attn.q_norm", "self_attn.k_norm")
# the matrices llama.cpp's qwen35 graph multiplies through build_lora_mm, i.e. where a LoRA applies
LORA_TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "linear_attn.in_proj_qkv", "linear_attn.in_proj_z", "linear_attn.in_proj_a",
                "linear_attn.in_proj_b", "linear_attn.out_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.(.+)$")


def _dim(dims, key):
    return dims[key] if isinstance(dims, dict) else getattr(dims, key)


def value_head_order(n_key_heads, n_value_heads):
    """perm with tiled[j] = grouped[perm[j]]: llama.cpp's value head j is Hugging Face's value head
    (j % Hk) * r + j // Hk (r = Hv / Hk). The identity when Hk == Hv."""
    r = n_value_heads // n_key_heads
    return np.arange(n_value_heads).reshape(n_key_heads, r).T.reshape(-1)


def value_rows(dims, per_head):
    """Row permutation of an axis of Hv value heads of `per_head` entries each (grouped -> tiled)."""
    perm = value_head_order(_dim(dims, "linear_num_key_heads"), _dim(dims, "linear_num_value_heads"))
    return (perm[:, None] * per_head + np.arange(per_head)).reshape(-1)


def _qkv_rows(dims):
    """Row permutation of in_proj_qkv's output / conv1d's channels: q and k as they are, v grouped -> tiled."""
    qk = 2 * _dim(dims, "linear_num_key_heads") * _dim(dims, "linear_key_head_dim")
    return np.concatenate([np.arange(qk), qk + value_rows(dims, _dim(dims, "linear_value_head_dim"))])


def output_rows(module, dims):
    """The permutation of `module`'s output axis that llama.cpp's converter applies (None: kept as is)."""
    if _dim(dims, "linear_num_key_heads") == _dim(dims, "linear_num_value_heads"):
        return None
    return {"linear_attn.in_proj_qkv": lambda: _qkv_rows(dims), "linear_attn.conv1d": lambda: _qkv_rows(dims),
            "linear_attn.in_proj_z": lambda: value_rows(dims, _dim(dims, "linear_value_head_dim")),
            "linear_attn.in_proj_a": lambda: value_rows(dims, 1), "linear_attn.in_proj_b": lambda: value_rows(dims, 1),
            "linear_attn.A_log": lambda: value_rows(dims, 1), "linear_attn.dt_bias": lambda: value_rows(dims, 1),
            }.get(module, lambda: None)()


def input_columns(module, dims):
    """The permutation of `module`'s input axis (out_proj reads the Hv x Dv value channels); None: kept."""
    if module != "linear_attn.out_proj" or _dim(dims, "linear_num_key_heads") == _dim(dims, "linear_num_value_heads"):
        return None
    return value_rows(dims, _dim(dims, "linear_value_head_dim"))


def _rows(arr, module, dims, inverse=False):
    """arr with `module`'s output rows in llama.cpp's tiled value-head order (inverse: back to grouped)."""
    rows = output_rows(module, dims)
    return arr if rows is None else arr[np.argsort(rows) if inverse else rows]


def _cols(arr, module, dims, inverse=False):
    """arr with `module`'s input columns in llama.cpp's tiled value-head order (inverse: back to grouped)."""
    cols = input_columns(module, dims)
    return arr if cols is None else arr[:, np.argsort(cols) if inverse else cols]


def split_name(name):
    """A Hugging Face / mlx-lm parameter or module name -> (layer index or None, path inside the layer)."""
    m = _LAYER.search(name)
    return (int(m.group(1)), m.group(2)) if m else (None, name)


def tensor_to_gguf(name, arr, dims):
    """One Hugging Face tensor (any prefix: model.language_model., language_model.model., model.) -> (GGUF name,
    numpy array in GGUF's numpy layout) as llama.cpp's converter writes it; None for what it does not write
    (vision tower, MTP head)."""
    arr = np.asarray(arr)
    if "visual." in name or "vision_tower" in name or name.startswith("mtp.") or ".mtp." in name:
        return None
    layer, path = split_name(name)
    if layer is None:
        if path.endswith("embed_tokens.weight"):
            return "token_embd.weight", arr
        if path == "lm_head.weight" or path.endswith(".lm_head.weight"):
            return "output.weight", arr
        if path.endswith("norm.weight"):
            return "output_norm.weight", arr + 1.0
        raise KeyError(f"no qwen35 GGUF name for {name}")
    module, _, leaf = path.rpartition(".")
    if path in LEAF_NAMES:
        module, gname = path, LEAF_NAMES[path]
    elif module in BLOCK_NAMES:
        gname = f"{BLOCK_NAMES[module]}.{leaf}"
    else:
        raise KeyError(f"no qwen35 GGUF name for {name}")
    if module == "linear_attn.conv1d":
        arr = arr.reshape(arr.shape[0], arr.shape[-1])  # [C, 1, K] -> [C, K] (ggml ne {K, C})
    arr = _cols(_rows(arr, module, dims), module, dims)
    if module == "linear_attn.A_log":
        arr = -np.exp(arr.astype(np.float32))
    if module in SHIFTED_NORMS:
        arr = arr + 1.0
    return f"blk.{layer}.{gname}", arr


def _store_name(gname):
    """A qwen35 GGUF tensor name -> (name as `model.layers.N.<module>.<leaf>` / `model.layers.N.<parameter>` /
    `model.embed_tokens.weight` / `model.norm.weight` / `lm_head.weight`, module or parameter path inside the
    layer, None for the top-level tensors); KeyError for a name the architecture has not."""
    parts = gname.split(".")
    if parts[0] != "blk":
        top = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
        if parts[0] not in top or len(parts) != 2:
            raise KeyError(f"{gname}: not a qwen35 tensor")
        return f"{top[parts[0]]}.{parts[-1]}", None
    layer, base = parts[1], ".".join(parts[2:])
    from_leaf = {g: hf for hf, g in LEAF_NAMES.items()}
    from_block = {g: hf for hf, g in BLOCK_NAMES.items()}
    if base in from_leaf:
        return f"model.layers.{layer}.{from_leaf[base]}", from_leaf[base]
    if parts[2] in from_block and len(parts) == 4:
        module = from_block[parts[2]]
        return f"model.layers.{layer}.{module}.{parts[3]}", module
    raise KeyError(f"{gname}: not a qwen35 tensor")


def tensor_from_gguf(gname, arr, dims, regroup=True):
    """One tensor of a qwen35 GGUF (numpy in GGUF's numpy layout, dequantized) -> (name as `model.layers.N.<module>.
    <leaf>` / `model.embed_tokens.weight` / `model.norm.weight` / `lm_head.weight`, array in mlx-lm's form): the
    norms as the file has them (1 + w is mlx-lm's form too), conv1d [C, K] -> [C, K, 1], A_log = log(-ssm_a), and
    the value heads back in Hugging Face's grouped order unless regroup=False (the file's tiled order, for math
    that broadcasts q/k by tiling). Regrouping permutes rows, except ssm_out's columns: in a block-quantized file
    those move in runs of Dv, which a block format can follow only where Dv is a multiple of its block (Q8_0, Q4_0:
    32; not the K-quants' 256 with Dv = 128), so such an ssm_out is dequantized here or the store keeps tiled
    order."""
    arr = np.asarray(arr)
    name, module = _store_name(gname)
    if module is None:
        return name, arr
    if regroup:
        arr = _cols(_rows(arr, module, dims, inverse=True), module, dims, inverse=True)
    if module == "linear_attn.A_log":
        arr = np.log(-arr.astype(np.float32))
    if module == "linear_attn.conv1d":
        arr = arr[:, :, None]
    return name, arr


def text_config_from_gguf(get):
    """The Qwen3.5 text-config fields a qwen35 GGUF records, where get(key) reads "qwen35.<key>" (None if absent).
    llama.cpp itself falls back to an interval of 4 when full_attention_interval is absent; no other key has a
    fallback there (rope.dimension_sections is required)."""
    heads, key_length = get("attention.head_count"), get("attention.key_length")
    rank = get("ssm.time_step_rank")
    return {"linear_num_key_heads": get("ssm.group_count"), "linear_num_value_heads": rank,
            "linear_key_head_dim": get("ssm.state_size"),
            "linear_value_head_dim": get("ssm.inner_size") // rank if rank else None,
            "linear_conv_kernel_dim": get("ssm.conv_kernel"),
            "full_attention_interval": get("full_attention_interval") or 4,
            "head_dim": key_length,
            "partial_rotary_factor": get("rope.dimension_count") / key_length if key_length else None,
            "mrope_section": list(get("rope.dimension_sections") or [])[:3],
            "num_attention_heads": heads}


def lora_to_gguf(name, a, b, dims, heads_grouped=True):
    """One LoRA pair in mlx-lm's layout (a: (in, r), b: (r, out); the update is x a b) on module `name` ->
    (GGUF base tensor name, lora_a (r, in), lora_b (out, r)) in llama.cpp's layout and head order. heads_grouped:
    the pair is for weights in Hugging Face's value-head order (reordered here as the converter reorders the base);
    False for weights already in a GGUF's tiled order (a store read from such a file without regrouping)."""
    layer, module = split_name(name)
    if layer is None or module not in LORA_TARGETS:
        raise KeyError(f"{name}: llama.cpp's qwen35 graph applies no LoRA there (targets: {', '.join(LORA_TARGETS)})")
    lora_a, lora_b = np.asarray(a, np.float32).T, np.asarray(b, np.float32).T
    if heads_grouped:
        lora_a, lora_b = _cols(lora_a, module, dims), _rows(lora_b, module, dims)
    return f"blk.{layer}.{BLOCK_NAMES[module]}.weight", np.ascontiguousarray(lora_a), np.ascontiguousarray(lora_b)


def lora_from_gguf(base, lora_a, lora_b, dims, regroup=True):
    """The inverse of lora_to_gguf: (GGUF base name `blk.N.<name>.weight`, lora_a (r, in), lora_b (out, r)) ->
    (module name `model.layers.N.<module>`, a (in, r), b (r, out)), value heads regrouped unless regroup=False."""
    parts = base.split(".")
    from_block = {g: hf for hf, g in BLOCK_NAMES.items()}
    if len(parts) != 4 or parts[0] != "blk" or parts[3] != "weight" or from_block.get(parts[2]) not in LORA_TARGETS:
        raise KeyError(f"{base}: not a qwen35 tensor llama.cpp applies a LoRA to")
    module = from_block[parts[2]]
    lora_a, lora_b = np.asarray(lora_a), np.asarray(lora_b)
    if regroup:
        lora_a, lora_b = _cols(lora_a, module, dims, inverse=True), _rows(lora_b, module, dims, inverse=True)
    return f"model.layers.{parts[1]}.{module}", lora_a.T, lora_b.T


def write_lora(path, pairs, dims, scale, name="mesp-mlx LoRA", heads_grouped=True):
    """A GGUF LoRA adapter for a qwen35 base from {module name: (a (in, r), b (r, out))} with mlx-lm's update
    scale * x a b: adapter.lora.alpha = scale * r (llama.cpp multiplies by alpha / r), F32 tensors
    `blk.N.<base>.weight.lora_a` (ggml ne [in, r]) and `.lora_b` (ne [r, out]), value heads reordered as the base
    file's (heads_grouped: see lora_to_gguf). Every pair must have the same rank (one alpha scales them all)."""
    import gguf
    ranks = {np.shape(a)[1] for a, _ in pairs.values()}
    if len(ranks) != 1:
        raise ValueError(f"LoRA pairs of {len(ranks)} different ranks; one adapter.lora.alpha cannot scale them")
    rank = ranks.pop()
    out = Path(path)
    tmp = out.with_name(f".{out.name}.tmp")
    tensors = sorted((lora_to_gguf(n, a, b, dims, heads_grouped) for n, (a, b) in pairs.items()),
                     key=lambda t: (int(t[0].split(".")[1]), t[0]))
    try:
        w = gguf.GGUFWriter(str(tmp), "qwen35")
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(np.float32(scale * rank)))
        w.add_name(name)
        for base, lora_a, lora_b in tensors:
            w.add_tensor(f"{base}.lora_a", lora_a)
            w.add_tensor(f"{base}.lora_b", lora_b)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


# Reading a base file into a weight store: io/gguf.py and io/sources.convert_gguf ask these through the family
# record (Family.gguf_io). The store keeps mlx-lm's form, value heads regrouped, except out_proj's columns where a
# file's ssm_out blocks are wider than a value head (store_layout).

def store_config(get, config):
    """The flat qwen3_5 config a store keeps, from a qwen35 GGUF's metadata (get(key) reads "qwen35.<key>") and the
    fields io/gguf.py reads the same way for every architecture (`config`); ValueError on a file this family does
    not describe (missing keys, value heads that do not group over the key heads)."""
    need = {"ssm.group_count": get("ssm.group_count"), "ssm.time_step_rank": get("ssm.time_step_rank"),
            "ssm.inner_size": get("ssm.inner_size"), "ssm.state_size": get("ssm.state_size"),
            "ssm.conv_kernel": get("ssm.conv_kernel"), "attention.key_length": get("attention.key_length"),
            "rope.dimension_count": get("rope.dimension_count")}
    missing = [k for k, v in need.items() if v is None]
    if missing:
        raise ValueError(f"GGUF metadata lacks qwen35.{', qwen35.'.join(missing)}")
    hk, hv, inner = need["ssm.group_count"], need["ssm.time_step_rank"], need["ssm.inner_size"]
    if hk <= 0 or hv % hk or inner % hv:
        raise ValueError(f"the linear attention's heads do not fit: {hv} value heads (ssm.time_step_rank) over {hk} "
                         f"key heads (ssm.group_count), inner size {inner} (ssm.inner_size)")
    text = text_config_from_gguf(get)
    out = {k: v for k, v in config.items() if k not in ("rope_theta", "rope_traditional")}
    out.update({k: text[k] for k in ("linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim",
                                     "linear_value_head_dim", "linear_conv_kernel_dim", "full_attention_interval",
                                     "head_dim")})
    out["rope_parameters"] = {"rope_type": "default", "rope_theta": float(config["rope_theta"]),
                              "partial_rotary_factor": text["partial_rotary_factor"]}
    out["attn_output_gate"] = True
    return out


def store_name(gname):
    """A qwen35 GGUF tensor's name in the store (KeyError: not one of this architecture's)."""
    return _store_name(gname)[0]


def _block_width(type_name):
    """Columns that move together in a tensor of GGML type `type_name` as the store keeps it: 1 for floats, the
    affine group for repacked types, the block for those kept packed."""
    from .ggml_types import GROUP, TYPES
    spec = TYPES.get(type_name)
    if spec is None or spec.how == "dense":
        return 1
    return GROUP if spec.how == "affine" else spec.block_size


def store_layout(config, types, requantize=False):
    """Config entries a store of this file needs besides store_config's: {TILED_KEY: True} when out_proj keeps the
    file's tiled column order, because some ssm_out's blocks as kept span more than one value head (Dv not a
    multiple of its width) and Hk != Hv; {} otherwise. types: {GGUF tensor name: GGML type name}; requantize: the
    file's quantized matrices are dequantized before they are stored (then every column moves freely)."""
    from ..models.qwen3_5 import TILED_KEY
    if requantize or config["linear_num_key_heads"] == config["linear_num_value_heads"]:
        return {}
    dv = config["linear_value_head_dim"]
    wide = [n for n, t in types.items() if n.endswith(".ssm_out.weight") and dv % _block_width(t)]
    return {TILED_KEY: True} if wide else {}


def store_transform(name, config):
    """f(arrays) -> arrays for the store tensor `name` (arrays: {"weight", and "scales"/"biases" of affine types}
    as MLX arrays, floats, affine levels or packed GGML rows), or None where the tensor is stored as read: value heads
    regrouped (rows of any type; out_proj's columns head by head unless the store keeps them tiled, store_layout),
    A_log = log(-ssm_a), conv1d [C, K] -> [C, K, 1]."""
    import mlx.core as mx
    from ..models.qwen3_5 import TILED_KEY
    layer, module = split_name(name)
    if layer is None:
        return None
    module = module.rsplit(".", 1)[0] if module.endswith((".weight", ".bias")) else module
    rows = output_rows(module, config)
    heads = None
    if input_columns(module, config) is not None and not config.get(TILED_KEY):
        heads = mx.array(np.argsort(value_head_order(config["linear_num_key_heads"],
                                                     config["linear_num_value_heads"])))
    if rows is None and heads is None and module not in ("linear_attn.A_log", "linear_attn.conv1d"):
        return None
    rows = None if rows is None else mx.array(np.argsort(rows))

    def transform(arrays):
        out = {}
        for k, a in arrays.items():
            if rows is not None:
                a = a[rows]
            if heads is not None:  # each array's columns as whole value heads (store_layout checked they align)
                a = a.reshape(a.shape[0], len(heads), -1)[:, heads].reshape(a.shape[0], -1)
            if module == "linear_attn.A_log":
                a = mx.log(-a.astype(mx.float32))
            elif module == "linear_attn.conv1d":
                a = a[..., None]
            out[k] = a
        return out
    return transform
