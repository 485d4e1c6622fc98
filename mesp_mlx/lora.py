"""LoRA parameters: which projections of which blocks are adapted, their initialisation, and mlx-lm's names.

Parameters live as {block index: {module path: (lora_a (in, r), lora_b (r, out))}}. The adaptable paths are the
model's (`args.projections()`: q/k/v/o, gate/up/down, or Phi-3's fused qkv_proj and gate_up_proj). mlx-lm's
conventions hold:
`num_layers` adapts the last N blocks, `scale` multiplies the low-rank product (alpha / rank when alpha is given),
lora_a ~ U(-1/sqrt(in), 1/sqrt(in)), lora_b = 0.
"""
import math
from dataclasses import dataclass

import mlx.core as mx

from .ops.block import MERGED_PROJECTIONS, PROJECTIONS

# every adaptable path of any supported layout, for a key list read without a model at hand
KNOWN_PROJECTIONS = PROJECTIONS + tuple(p for p in MERGED_PROJECTIONS if p not in PROJECTIONS)


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


def init_lora(args, cfg: LoRAConfig, seed=0):
    key = mx.random.key(seed)
    shapes = args.projection_shapes()
    params = {}
    keys = args.projections() if not cfg.keys or tuple(cfg.keys) == PROJECTIONS else cfg.keys
    unknown = [p for p in keys if p not in shapes]
    if unknown:
        raise ValueError(f"{args.model_type} models have no projection {', '.join(unknown)} (they have "
                         f"{', '.join(shapes)})")
    for i in cfg.layers(args.num_hidden_layers):
        params[i] = {}
        for path in keys:
            key, sub = mx.random.split(key)
            d_in, d_out = shapes[path]
            bound = 1 / math.sqrt(d_in)
            params[i][path] = (mx.random.uniform(-bound, bound, (d_in, cfg.rank), key=sub),
                               mx.zeros((cfg.rank, d_out)))
    return params


def to_flat(params):
    """mlx-lm adapter names: model.layers.{i}.{path}.lora_a / lora_b."""
    flat = {}
    for i, mods in params.items():
        for path, (a, b) in mods.items():
            flat[f"model.layers.{i}.{path}.lora_a"] = a
            flat[f"model.layers.{i}.{path}.lora_b"] = b
    return flat


def from_flat(flat):
    params = {}
    for name, arr in flat.items():
        _, _, i, rest = name.split(".", 3)
        path, leaf = rest.rsplit(".", 1)
        pair = params.setdefault(int(i), {}).setdefault(path, [None, None])
        pair[0 if leaf == "lora_a" else 1] = arr
    return {i: {p: tuple(ab) for p, ab in mods.items()} for i, mods in params.items()}


def tree_map(fn, *trees):
    return {i: {p: tuple(fn(*xs) for xs in zip(*(t[i][p] for t in trees))) for p in trees[0][i]} for i in trees[0]}


def num_params(params):
    return sum(a.size + b.size for mods in params.values() for a, b in mods.values())
