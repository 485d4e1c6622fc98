"""Our base logits on a GGUF against llama.cpp's on the same file, both against the file's F32 dequantization.

    PYTHONPATH=. python tools/compare_llamacpp.py FILE.gguf [--tokens 256] [--out results.json]
    (FILE may also be one of the PyPI-published names: smollm2-135m-instruct, qwen2.5-coder-0.5b-instruct)

Writes an F32 copy of the file (every tensor through `gguf.quants.dequantize`, metadata as it is) next to the cache,
runs llama.cpp (llama-cpp-python) on the file and on the F32 copy (F32 KV cache), and our forward (fp32, the
dequantize path) on the file's store (its types kept exactly; and re-quantized to 4-bit group 64 on request, as every
type but Q4_0/Q4_1/Q8_0 was before); the F32 copy run by llama.cpp is the reference. Prints, for each run, the
relative L2 distance of all logits to the reference and at how many positions the argmax agrees, plus each store's
bits per weight beside the file's. The text is the standard library's own documentation (every machine has it),
tokenized by llama.cpp on the file.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np


def f32_copy(src, dst):
    """The GGUF with every tensor dequantized to F32 (metadata copied field by field)."""
    import gguf
    reader = gguf.GGUFReader(str(src))
    arch = reader.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(str(dst), arch)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(field.name, field.contents(), vtype, sub_type=sub)
    for t in reader.tensors:
        shape = tuple(int(s) for s in reversed(t.shape))
        arr = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32).reshape(shape)
        w.add_tensor(t.name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def llamacpp_logits(path, ids, f32_cache):
    import llama_cpp
    kw = dict(type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32) if f32_cache else {}
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=max(512, len(ids) + 8), logits_all=True, verbose=False,
                          n_batch=len(ids), n_ubatch=len(ids), **kw)
    llm.eval(ids)
    out = np.array(llm.scores[:len(ids)], dtype=np.float32)
    del llm
    return out


def stats(ours, ref):
    return {"rel_l2": float(np.linalg.norm(ours - ref) / np.linalg.norm(ref)),
            "argmax_agree": int((ours.argmax(-1) == ref.argmax(-1)).sum()), "positions": int(ref.shape[0])}


def file_bits_per_weight(path):
    import gguf
    reader = gguf.GGUFReader(str(path))
    bits = n = 0
    for t in reader.tensors:
        if len(t.shape) == 2:
            bits += int(t.n_bytes) * 8
            n += int(t.n_elements)
    return bits / n


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("gguf")
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--out")
    a = p.parse_args(argv)
    from mesp_mlx.blas import ensure_fast_blas
    ensure_fast_blas()
    import mlx.core as mx
    import llama_cpp
    from mesp_mlx.io.sources import QWEN_CODER, DEFAULT_MODEL, cache_root, load_model, qwen_coder_gguf, smollm2_gguf
    from mesp_mlx.model import logits
    path = {QWEN_CODER: qwen_coder_gguf, DEFAULT_MODEL: smollm2_gguf}.get(a.gguf, lambda: Path(a.gguf))()
    import pydoc  # real text every machine has: the standard library's documentation
    text = pydoc.render_doc(json, renderer=pydoc.plaintext)
    vocab = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    ids = vocab.tokenize(text.encode(), add_bos=False, special=False)[:a.tokens]
    del vocab
    f32 = cache_root() / "gguf" / f"{Path(path).stem}.F32.gguf"
    if not f32.exists():
        f32.parent.mkdir(parents=True, exist_ok=True)
        f32_copy(path, f32.with_suffix(".part"))
        f32.with_suffix(".part").rename(f32)
    ref = llamacpp_logits(f32, ids, True)
    out = {"file": Path(path).name, "tokens": len(ids), "file_bits_per_weight": file_bits_per_weight(path)}
    out["llamacpp_on_file"] = stats(llamacpp_logits(path, ids, False), ref)
    runs = (("ours_on_file", path, (64, 4), False),  # the file's types kept exactly (the default)
            ("ours_requantized_4bit_g64", path, (64, 4), True),  # what we stored before types were kept
            ("ours_on_f32", f32, None, False))
    for name, source, quantize, requantize in runs:
        store = load_model(str(source), quantize=quantize, requantize=requantize)
        z = np.array(logits(store, mx.array([ids]))[0].astype(mx.float32))
        out[name] = dict(stats(z, ref), store_bits_per_weight=store.bits_per_weight())
    print(json.dumps(out, indent=2))
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
