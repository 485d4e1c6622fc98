"""The base with the adapter merged in ("fused"): a model folder every reader takes (mlx-lm, transformers, llama.cpp's
convert_hf_to_gguf.py, vLLM). Weights are W + scale * (A B)^T in fp32 (`ops.lora_linear.lora_merge`), written in a
dtype or re-quantized, one block at a time, q/k rows in Hugging Face order (no rope_traditional). config.json names
the architecture (`architectures`) and the bos / eos ids; Qwen3.5's out_proj columns in Hugging Face's value-head
order whatever the store keeps, generation_config.json lists every stop id of the family
(Gemma's <end_of_turn> besides <eos>), and the tokenizer files come along."""
import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np

from ...models import family, stop_ids
from ...models.qwen3_5 import TILED_KEY
from ...ops.linear import dense
from ...ops.lora_linear import lora_merge
from ..store import EMBED_FILE, layer_file, stored_tensors
from .common import llamacpp_rows, permute_rows, qk_heads

DEFAULT_OUT = "fused"
DTYPES = ("float16", "bfloat16", "float32")
KEEP_DTYPE = ("A_log",)  # Qwen3.5's decay rates stay fp32, as mlx-lm's cast_predicate keeps them


def token_ids(store):
    """(bos id, [stop ids], eos id) of the store's model: from its tokenizer, else its config's ids."""
    from ..sources import TOKENIZER_FILES
    from ..tokenizer import load_tokenizer
    bos, eos = store.config.get("bos_token_id"), store.config.get("eos_token_id")
    stops = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    if any((store.path / f).exists() for f in TOKENIZER_FILES if f.startswith("tokenizer")):
        tok = load_tokenizer(store.path)
        bos = tok.bos_token_id if tok.bos_token_id is not None else bos
        eos = tok.eos_token_id if tok.eos_token_id is not None else eos
        stops |= stop_ids(tok, store.args.model_type)
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    return bos, sorted(stops | ({eos} if eos is not None else set())), eos


def export(adapter_dir, params, lora, store, out, dtype="float16", quantize=None, **_):
    return write(params, lora, store, out, dtype, quantize)[0]


def write(params, lora, store, out, dtype="float16", quantize=None, probe_tokens=16):
    """Returns (message, max |logit error| relative to max |logit|) measured against the adapted model on
    `probe_tokens` token ids."""
    from ...model import logits
    from ..sources import TOKENIZER_FILES
    from ..store import WeightStore
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    target = getattr(mx, dtype)
    args, permuted = store.args, llamacpp_rows(store)
    heads = qk_heads(args)
    weight_map = {}
    grouped = None  # a store keeping out_proj's value heads tiled: its columns back in Hugging Face's order
    if args.linear_out_tiled:
        from ..qwen35_gguf import value_rows
        grouped = mx.array(np.argsort(value_rows(args, args.linear_value_head_dim)))

    def put(fname, arrays):
        tensors = {}
        for name, arr in arrays.items():
            module, leaf = name.rsplit(".", 1)
            if quantize and leaf == "weight" and arr.ndim == 2 and arr.shape[1] % quantize[0] == 0:
                w, s, b = mx.quantize(arr.astype(mx.float32), group_size=quantize[0], bits=quantize[1])
                tensors.update({name: w, f"{module}.scales": s.astype(target), f"{module}.biases": b.astype(target)})
            elif leaf in KEEP_DTYPE:
                tensors[name] = arr
            else:
                tensors[name] = arr.astype(target)
        mx.save_safetensors(str(out / fname), tensors, metadata={"format": "pt"})
        weight_map.update({k: fname for k in tensors})

    for i in range(store.num_layers):
        arrays = {}
        for module, w in store.layer(i).items():
            name = f"model.layers.{i}.{module}"
            if isinstance(w, mx.array):  # a norm, a conv's taps, a plain parameter
                arrays.update({f"model.layers.{i}.{k}": v for k, v in stored_tensors(module, w).items()})
                continue
            merged = lora_merge(w, *params[i][module], lora.scale) if module in params.get(i, {}) else dense(w)
            bias = w.bias
            if grouped is not None and module == "linear_attn.out_proj":
                merged = merged[:, grouped]
            if permuted and module in heads:
                merged = mx.array(permute_rows(merged, heads[module], inverse=True))
                bias = None if bias is None else mx.array(permute_rows(bias, heads[module], inverse=True))
            arrays[f"{name}.weight"] = merged
            if bias is not None:
                arrays[f"{name}.bias"] = bias
        mx.eval(arrays)
        put(layer_file(i), arrays)
    top = {"model.embed_tokens.weight": dense(store.embedding()), "model.norm.weight": store.final_norm()}
    if not args.tie_word_embeddings:
        top["lm_head.weight"] = dense(store.head())
    put(EMBED_FILE, top)

    fam = family(args.model_type)
    bos, stops, eos = token_ids(store)
    config = {k: v for k, v in store.config.items() if k not in ("quantization", "quantization_config", TILED_KEY)}
    config.update(architectures=[fam.hf_architecture], model_type=fam.model_type, torch_dtype=dtype,
                  tie_word_embeddings=args.tie_word_embeddings)
    if bos is not None:
        config["bos_token_id"] = bos
    if stops:  # mlx-lm takes config.json's eos ids as its stop set; transformers' generate reads generation_config
        config["eos_token_id"] = stops if len(stops) > 1 else stops[0]
    if permuted:
        config["rope_traditional"] = False
    if quantize:
        config["quantization"] = config["quantization_config"] = {"group_size": quantize[0], "bits": quantize[1]}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    try:  # the source's sampling defaults stay; the ids are ours
        generation = json.loads((store.path / "generation_config.json").read_text())
    except (OSError, json.JSONDecodeError):
        generation = {}
    generation.update({k: v for k, v in (("bos_token_id", bos), ("eos_token_id", stops or None)) if v is not None})
    total = sum((out / f).stat().st_size for f in set(weight_map.values()))
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}, indent=1))
    for name in TOKENIZER_FILES:
        if (store.path / name).exists():
            shutil.copy(store.path / name, out / name)
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))

    ids = mx.array([[(7 + 31 * k) % args.vocab_size for k in range(probe_tokens)]])
    ref = logits(store, ids, params, lora.scale)
    got = logits(WeightStore(out), ids)
    err = float(mx.max(mx.abs(got.astype(mx.float32) - ref))) / max(float(mx.max(mx.abs(ref))), 1e-30)
    kind = f"{quantize[1]}-bit group {quantize[0]}" if quantize else dtype
    return (f"scale: merged W + {lora.scale:g} * (A B)^T in fp32, written as {kind}; no adapter scale remains. "
            f"max |logit error| vs the adapted model on {probe_tokens} tokens: {err:.2e} of max |logit|"), err
