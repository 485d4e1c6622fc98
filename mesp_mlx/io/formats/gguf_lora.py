"""GGUF LoRA adapters as llama.cpp's `--lora` reads them (also Ollama, LM Studio): lora_a (numpy (r, in), ggml ne
[in, r]) and lora_b (numpy (out, r), ne [r, out]) in F32, named after the base tensor in the family's GGUF naming,
adapter.lora.alpha = scale * r, llama.cpp's q/k row order, and general.architecture equal to the base file's (the
family's llamacpp_arch: llama.cpp refuses a LoRA whose architecture differs from its base's). A family whose files
reorder more than q/k (Qwen3.5's value heads) writes and reads its LoRAs through its io module (Family.gguf_io),
from and to mlx-lm's order."""
import os
from pathlib import Path

import numpy as np

from ...models import family
from .. import SourceError
from ..adapters import value_head_order
from ..gguf import family_io
from .common import llamacpp_rows, parse, reorder_qk, store_source, to_numpy

DEFAULT_OUT = "adapter-lora.gguf"
SINGLE_FILE = True


def export(adapter_dir, params, lora, store, out, **_):
    import gguf
    fam = family(store.args.model_type)
    names = fam.hf_to_gguf()
    unnamed = sorted({p for mods in params.values() for p in mods if p not in names})
    if unnamed:
        raise SourceError(f"{store.args.model_type}: no llama.cpp tensor name for {', '.join(unnamed)}; a GGUF "
                          "LoRA of this model cannot be written yet (export --format mlx-lm or fused instead)")
    flat = value_head_order(to_numpy(params), store.args, to_store=False)
    if not llamacpp_rows(store):
        flat = reorder_qk(flat, store.args, inverse=False)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    alpha = float(np.float32(lora.scale * lora.rank))
    io = family_io(fam)
    try:
        if io is not None:
            pairs = {}
            for name, arr in flat.items():
                i, path, leaf = parse(name)
                pairs.setdefault(f"model.layers.{i}.{path}", {})[leaf] = arr
            io.write_lora(out, {k: (v["lora_a"], v["lora_b"]) for k, v in pairs.items()}, store.args, lora.scale,
                          name=f"mesp-mlx LoRA for {Path(store_source(store)).name}")
            return _line(alpha, lora)
        w = gguf.GGUFWriter(str(tmp), fam.llamacpp_arch)
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        w.add_name(f"mesp-mlx LoRA for {Path(store_source(store)).name}")
        for name in sorted(flat, key=lambda n: (parse(n)[0], n)):
            i, path, leaf = parse(name)
            w.add_tensor(f"blk.{i}.{names[path]}.weight.{leaf}", np.ascontiguousarray(flat[name].T))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, out)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise SourceError(f"{out}: could not write it ({e.strerror or e})") from None
    return _line(alpha, lora)


def _line(alpha, lora):
    return (f"scale: GGUF adapter.lora.alpha = {alpha:g} with rank {lora.rank}; llama.cpp applies alpha / rank = "
            f"{alpha / lora.rank:g} (times --lora-scaled's factor, 1 with --lora)")


def is_gguf(path):
    path = Path(path)
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def read(path, store):
    """A GGUF LoRA -> ({mlx-lm name: numpy}, scale) in the store's row order; refuses one for another
    architecture, as llama.cpp does."""
    from ..gguf import field, open_gguf
    import gguf.quants
    reader = open_gguf(path)
    if field(reader, "general.type") != "adapter" or field(reader, "adapter.type") != "lora":
        raise SourceError(f"{path}: not a GGUF LoRA adapter (general.type {field(reader, 'general.type')!r}, "
                          f"adapter.type {field(reader, 'adapter.type')!r})")
    fam = family(store.args.model_type)
    arch = field(reader, "general.architecture")
    if arch != fam.llamacpp_arch:
        raise SourceError(f"{path}: a LoRA for a {arch} model, not for this {store.args.model_type} model "
                          f"(llama.cpp architecture {fam.llamacpp_arch})")
    to_hf, adaptable = fam.gguf_to_hf(), set(store.args.projections())
    io = family_io(fam)
    flat, pairs = {}, {}
    for t in reader.tensors:
        parts = t.name.split(".")
        if len(parts) != 5 or parts[0] != "blk" or parts[3] != "weight" or parts[4] not in ("lora_a", "lora_b") \
                or to_hf.get(parts[2]) not in adaptable:
            raise SourceError(f"{path}: tensor {t.name} is not a LoRA A/B of a block projection")
        arr = np.asarray(t.data)
        if t.tensor_type != gguf.GGMLQuantizationType.F32:
            arr = gguf.quants.dequantize(arr, t.tensor_type)
        arr = arr.astype(np.float32).reshape([int(s) for s in reversed(t.shape)])
        if io is not None:
            pairs.setdefault(".".join(parts[:4]), {})[parts[4]] = arr
        else:
            flat[f"model.layers.{parts[1]}.{to_hf[parts[2]]}.{parts[4]}"] = arr.T
    for base, pair in pairs.items():  # the family's own order, back to mlx-lm's
        if len(pair) != 2:
            raise SourceError(f"{path}: {base} has a lora_a or a lora_b without the other")
        name, a, b = io.lora_from_gguf(base, pair["lora_a"], pair["lora_b"], store.args)
        flat[f"{name}.lora_a"], flat[f"{name}.lora_b"] = a, b
    ranks = {a.shape[0] for n, a in flat.items() if n.endswith("lora_b")}
    alpha = float(field(reader, "adapter.lora.alpha", 0.0))
    if len(ranks) != 1:
        raise SourceError(f"{path}: tensors of {len(ranks)} different ranks; one alpha cannot scale them")
    # llama.cpp: alpha 0 means "no alpha", the product is used unscaled
    scale = alpha / ranks.pop() if alpha else 1.0
    return (reorder_qk(flat, store.args, inverse=True) if not llamacpp_rows(store) else flat), scale
