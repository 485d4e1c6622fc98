"""What the format modules share: our parameters as numpy in mlx-lm's names, the store's q/k row order and
llama.cpp's permutation of it, and what the store was converted from.

Row order: llama.cpp's converter permutes the q/k rows of the families whose record says so (`permutes_qk`: Llama,
Mistral, SmolLM3) for its interleaved rope; a store converted from such a GGUF keeps those rows (and
rope_traditional), a store from a Hugging Face directory does not. Writers and readers move q/k lora_b output units
between the two orders according to where the store came from.
"""
from pathlib import Path

import mlx.core as mx
import numpy as np

from ...lora import parse_name, to_flat
from ...models import family


def store_source(store):
    """What the store was converted from: a directory or a GGUF file (its own path when unknown)."""
    return store.info.get("source") or str(store.path)


def llamacpp_rows(store):
    """True when the store's q/k rows are in llama.cpp's permuted order (a store converted from such a GGUF)."""
    kind = store.info.get("kind")
    if kind is None:  # not one of our stores: our GGUF loader is what sets rope_traditional on these families
        kind = "gguf" if store.config.get("rope_traditional") else "hf-dir"
    return family(store.args.model_type).permutes_qk and kind == "gguf"


def permute_rows(arr, n, inverse=False):
    """llama.cpp's q/k permutation of axis 0 (n heads, each [first half | second half] -> interleaved pairs)."""
    arr = np.asarray(arr)
    split = (n, 2, arr.shape[0] // n // 2) if not inverse else (n, arr.shape[0] // n // 2, 2)
    return arr.reshape(*split, *arr.shape[1:]).swapaxes(1, 2).reshape(arr.shape)


def qk_heads(args):
    """The projections llama.cpp permutes, with their head counts."""
    return {"self_attn.q_proj": args.num_attention_heads, "self_attn.k_proj": args.num_key_value_heads}


def reorder_qk(flat, args, inverse):
    """Permute (or un-permute) the output units of q/k lora_b (r, out) where llama.cpp permutes the family's rows;
    flat: mlx-lm names -> numpy."""
    if not family(args.model_type).permutes_qk:
        return flat
    heads = qk_heads(args)
    out = dict(flat)
    for name, arr in flat.items():
        _, path, leaf = parse(name)
        if leaf == "lora_b" and path in heads:
            out[name] = np.ascontiguousarray(permute_rows(arr.T, heads[path], inverse).T)
    return out


def to_numpy(params):
    return {k: np.array(v.astype(mx.float32)) for k, v in to_flat(params).items()}


def parse(name):
    """mlx-lm name -> (block, module path, leaf)."""
    return parse_name(name)
