"""LoRA parameters: which projections of which blocks are adapted, their initialisation, and mlx-lm's names.

Parameters live as {block index: {module path: (lora_a (in, r), lora_b (r, out))}}. The adaptable paths are each
block's (`args.projections(i)`: q/k/v/o, gate/up/down, Phi-3's fused qkv_proj and gate_up_proj, or Qwen3.5's
linear-attention in_proj_* / out_proj); the keys asked for adapt the blocks that have them, as mlx-lm's
linear_to_lora_layers does, and a block with none of them has no entry. mlx-lm's conventions hold:
`num_layers` adapts the last N blocks, `scale` multiplies the low-rank product (alpha / rank when alpha is given),
lora_a ~ U(-1/sqrt(in), 1/sqrt(in)), lora_b = 0.
"""
import math
from dataclasses import dataclass

import mlx.core as mx

from .ops.block import DELTA_PROJECTIONS, MERGED_PROJECTIONS, PROJECTIONS

# every adaptable path of any supported layout, for a key list read without a model at hand
KNOWN_PROJECTIONS = tuple(dict.fromkeys(PROJECTIONS + MERGED_PROJECTIONS + DELTA_PROJECTIONS))


@dataclass
class LoRAConfig:
    rank: int = 8
    scale: float = 20.0
    keys: tuple = PROJECTIONS  # the default, all seven, means every projection of the model's own layout
    num_layers: int = -1  # -1: all blocks
    dropout: float = 0.0

    def layers(self, n):
        k = n if self.num_layers < 0 else min(self.num_layers, n)
        return range(n - k, n)


def resolve_keys(keys, where="keys", args=None):
    """Accept full paths (self_attn.q_proj) or short names (q_proj); reject names that match no projection of the
    model (`args`), or of any supported layout when no model is given."""
    known = args.projections() if args is not None else KNOWN_PROJECTIONS
    out = []
    for k in keys:
        match = [p for p in known if p == k or p.endswith("." + k)]
        if not match:
            raise ValueError(f"{where}: {k!r} matches no projection (choose from "
                             f"{', '.join(p.split('.')[-1] for p in known)})")
        out += [m for m in match if m not in out]
    return tuple(out)


def model_keys(args, keys):
    """The paths `keys` names on this model: all of its projections when empty, or when the default (all seven of
    the Llama layout) names a layout the model does not have (Phi-3's merged one); else `keys` as given."""
    known = args.projections()
    if not keys or (tuple(keys) == PROJECTIONS and not set(PROJECTIONS) <= set(known)):
        return known
    unknown = [p for p in keys if p not in known]
    if unknown:
        raise ValueError(f"{args.model_type} models have no projection {', '.join(unknown)} (they have "
                         f"{', '.join(known)})")
    return tuple(keys)


def layer_keys(args, keys, i):
    """The paths of `keys` (model_keys) block i has."""
    own = args.projections(i)
    return tuple(p for p in model_keys(args, keys) if p in own)


def init_lora(args, cfg: LoRAConfig, seed=0):
    key = mx.random.key(seed)
    model_keys(args, cfg.keys)  # refused before anything is drawn
    params = {}
    for i in cfg.layers(args.num_hidden_layers):
        shapes, keys = args.projection_shapes(i), layer_keys(args, cfg.keys, i)
        if not keys:
            continue
        params[i] = {}
        for path in keys:
            key, sub = mx.random.split(key)
            d_in, d_out = shapes[path]
            bound = 1 / math.sqrt(d_in)
            params[i][path] = (mx.random.uniform(-bound, bound, (d_in, cfg.rank), key=sub),
                               mx.zeros((cfg.rank, d_out)))
    return params


def to_flat(params, prefix=""):
    """mlx-lm adapter names: {prefix}model.layers.{i}.{path}.lora_a / lora_b (prefix: the family's place of
    `model` in mlx-lm's module tree, models.mlx_lm_prefix; "" for our own files, which keep no family)."""
    flat = {}
    for i, mods in params.items():
        for path, (a, b) in mods.items():
            flat[f"{prefix}model.layers.{i}.{path}.lora_a"] = a
            flat[f"{prefix}model.layers.{i}.{path}.lora_b"] = b
    return flat


def parse_name(name):
    """An adapter name (any prefix before `model.layers.`) -> (block, module path, leaf)."""
    _, sep, rest = name.partition("model.layers.")
    if not sep:
        raise ValueError(f"{name!r} is not an adapter name (<prefix>model.layers.N.<path>.lora_a|lora_b)")
    i, rest = rest.split(".", 1)
    path, leaf = rest.rsplit(".", 1)
    return int(i), path, leaf


def from_flat(flat):
    params = {}
    for name, arr in flat.items():
        i, path, leaf = parse_name(name)
        pair = params.setdefault(i, {}).setdefault(path, [None, None])
        pair[0 if leaf == "lora_a" else 1] = arr
    return {i: {p: tuple(ab) for p, ab in mods.items()} for i, mods in params.items()}


def tree_map(fn, *trees):
    return {i: {p: tuple(fn(*xs) for xs in zip(*(t[i][p] for t in trees))) for p in trees[0][i]} for i in trees[0]}


def num_params(params):
    return sum(a.size + b.size for mods in params.values() for a, b in mods.values())
