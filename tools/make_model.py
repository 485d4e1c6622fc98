"""Random-weight 4-bit models of real architectures' shapes, so any benchmark runs at any size without a download.

    python tools/make_model.py qwen2.5-0.5b --out DIR [--layers N] [--vocab V] [--seed S] [--dtype bfloat16]
                               [--unquantized]
    python tools/make_model.py --list

Writes an mlx-lm / Hugging Face style directory: config.json (the preset's real config, with mlx-lm's
`quantization` entry), model.safetensors (or model-0000k-of-0000n.safetensors shards with an index) already
quantized to 4 bits in groups of 64, and a tokenizer (tokenizer.json + tokenizer_config.json with a ChatML chat
template) whose vocabulary has exactly the preset's size. Both `mesp_mlx.io.sources.load_model(dir)` and
`mlx_lm.load(dir)` take it. Weights are normal with std 0.02 (norm weights 1), seeded per tensor name, so a model
with fewer layers (`--layers`) has the same first layers as the full one. Each tensor is generated and quantized a
block of rows at a time (quantization groups run along a row, so this is exact) and each shard is written and freed
before the next, so no fp32 copy of the whole model, nor of its largest tensor, is ever held. The tokenizer is a
GPT-2 style byte-level BPE trained on a few of this Python's standard-library sources and padded with unreachable
dummy tokens up to the preset's vocabulary size: real text tokenizes to a few thousand distinct ids, which is all a
benchmark needs (what it measures depends on V through the head's shape, not on which ids occur).

--unquantized writes every weight in `--dtype` instead (a Hugging Face checkpoint as published, bf16 shards of at
most 2 GB with an index, no `quantization` entry): what a conversion from full precision reads (tools/
bench_conversion.py).
"""
import argparse
import json
import math
import os
import shutil
import sys
import sysconfig
import tempfile
import zlib
from pathlib import Path

import mlx.core as mx

GROUP, BITS = 64, 4
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SHARD_BYTES = 2 << 30  # like HF's sharding: bounds what one save holds (a 4-bit 3B model is ~1.8 GB)
ROW_ELEMENTS = 1 << 24  # fp32 elements generated at once (64 MB)

# Real configs (Hugging Face config.json of each model, as published; the architecture fields only).
_QWEN2 = dict(model_type="qwen2", rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True,
              vocab_size=151936, max_position_embeddings=32768, hidden_act="silu")
_LLAMA32 = dict(model_type="llama", rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True,
                vocab_size=128256, max_position_embeddings=131072, hidden_act="silu", attention_bias=False,
                mlp_bias=False, rope_scaling={"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                              "original_max_position_embeddings": 8192, "rope_type": "llama3"})
# meta-llama/Llama-3.1-8B: the 3.2 family's fields, with llama3 rope scaling by 8 and an untied head (the published
# config has no head_dim: d / heads = 128)
_LLAMA31 = dict(_LLAMA32, tie_word_embeddings=False,
                rope_scaling={"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                              "original_max_position_embeddings": 8192, "rope_type": "llama3"})
_QWEN3 = dict(model_type="qwen3", rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True,
              vocab_size=151936, max_position_embeddings=40960, head_dim=128, attention_bias=False,
              hidden_act="silu")
_SMOLLM2 = dict(model_type="llama", rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True,
                vocab_size=49152, max_position_embeddings=8192, hidden_act="silu", attention_bias=False,
                mlp_bias=False)
# google/gemma-3-1b-it (model_type gemma3_text): 1+w norms, sandwich norms, q/k norms, GELU(tanh), 5 local layers
# (window 512, RoPE base 10000) per global one (base 1e6), head_dim 256 with 4 query heads and 1 key/value head
_GEMMA3 = dict(model_type="gemma3_text", rms_norm_eps=1e-6, rope_theta=1000000.0, rope_local_base_freq=10000.0,
               tie_word_embeddings=True, vocab_size=262144, max_position_embeddings=32768, head_dim=256,
               query_pre_attn_scalar=256, sliding_window=512, sliding_window_pattern=6, rope_scaling=None,
               hidden_activation="gelu_pytorch_tanh", attention_bias=False, final_logit_softcapping=None,
               attn_logit_softcapping=None)
# Qwen/Qwen3.5-{0.8B,2B,4B,9B} (text_config): three gated-delta (linear-attention) layers in four, head_dim 256
# with RoPE on a quarter of it, written in mlx-lm's form (multimodal config, `language_model.*` names, norms the
# multiplier, conv1d [C, K, 1]; --unquantized: Hugging Face's, `model.language_model.*`, norms zero-centred,
# conv1d [C, 1, K]); the vision tower and the MTP head are left out
_QWEN35 = dict(model_type="qwen3_5", rms_norm_eps=1e-6, vocab_size=248320, max_position_embeddings=262144,
               head_dim=256, linear_key_head_dim=128, linear_value_head_dim=128, linear_conv_kernel_dim=4,
               full_attention_interval=4, attn_output_gate=True, hidden_act="silu", attention_bias=False,
               rope_parameters={"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25,
                                "mrope_section": [11, 11, 10], "mrope_interleaved": True})
PRESETS = {
    # Qwen/Qwen2.5-{0.5B,1.5B,3B}: q/k/v biases (model_type qwen2 always has them), tied head
    "qwen2.5-0.5b": dict(_QWEN2, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2),
    "qwen2.5-1.5b": dict(_QWEN2, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2),
    "qwen2.5-3b": dict(_QWEN2, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                       num_attention_heads=16, num_key_value_heads=2),
    # meta-llama/Llama-3.2-{1B,3B}: llama3 rope scaling, explicit head_dim, tied head
    "llama-3.2-1b": dict(_LLAMA32, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64),
    "llama-3.2-3b": dict(_LLAMA32, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                         num_attention_heads=24, num_key_value_heads=8, head_dim=128),
    "llama-3.1-8b": dict(_LLAMA31, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8),
    # Qwen/Qwen3-{0.6B,1.7B}: per-head RMSNorm on q and k, head_dim 128 (not d / heads), no biases
    "qwen3-0.6b": dict(_QWEN3, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8),
    "qwen3-1.7b": dict(_QWEN3, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8),
    # Qwen/Qwen3-8B: untied head (the small Qwen3s tie theirs)
    "qwen3-8b": dict(_QWEN3, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False),
    # HuggingFaceTB/SmolLM2-{135M,360M}(-Instruct): llama architecture, tied head
    "smollm2-135m": dict(_SMOLLM2, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3),
    "smollm2-360m": dict(_SMOLLM2, hidden_size=960, intermediate_size=2560, num_hidden_layers=32,
                         num_attention_heads=15, num_key_value_heads=5),
    "gemma3-1b": dict(_GEMMA3, hidden_size=1152, intermediate_size=6912, num_hidden_layers=26,
                      num_attention_heads=4, num_key_value_heads=1),
    "qwen3.5-0.8b": dict(_QWEN35, hidden_size=1024, intermediate_size=3584, num_hidden_layers=24,
                         num_attention_heads=8, num_key_value_heads=2, linear_num_key_heads=16,
                         linear_num_value_heads=16, tie_word_embeddings=True),
    "qwen3.5-2b": dict(_QWEN35, hidden_size=2048, intermediate_size=6144, num_hidden_layers=24,
                       num_attention_heads=8, num_key_value_heads=2, linear_num_key_heads=16,
                       linear_num_value_heads=16, tie_word_embeddings=True),
    "qwen3.5-4b": dict(_QWEN35, hidden_size=2560, intermediate_size=9216, num_hidden_layers=32,
                       num_attention_heads=16, num_key_value_heads=4, linear_num_key_heads=16,
                       linear_num_value_heads=32, tie_word_embeddings=True),
    "qwen3.5-9b": dict(_QWEN35, hidden_size=4096, intermediate_size=12288, num_hidden_layers=32,
                       num_attention_heads=16, num_key_value_heads=4, linear_num_key_heads=16,
                       linear_num_value_heads=32, tie_word_embeddings=False),
}
ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM",
                 "gemma3_text": "Gemma3ForCausalLM", "qwen3_5": "Qwen3_5ForConditionalGeneration"}
ALIASES = {"llama3.1-8b": "llama-3.1-8b"}  # the name issue 32 uses


def preset_config(preset, layers=None, vocab=None):
    preset = ALIASES.get(preset, preset)
    if preset not in PRESETS:
        raise SystemExit(f"unknown preset {preset!r} (presets: {', '.join(PRESETS)})")
    config = dict(PRESETS[preset])
    config["architectures"] = [ARCHITECTURES[config["model_type"]]]
    if layers is not None:
        config["num_hidden_layers"] = layers
    if vocab is not None:
        config["vocab_size"] = vocab
    config.update(bos_token_id=None, eos_token_id=config["vocab_size"] - 1)  # <|im_end|>, the last id
    return config


def written_config(config):
    """config.json as the checkpoint holds it: Qwen3.5's language model under text_config (the head's tying and
    mlx-lm's quantization entry also at the top level, as mlx-lm writes them); other families as they are."""
    if config["model_type"] != "qwen3_5":
        return config
    top = ("architectures", "quantization", "quantization_config", "torch_dtype", "bos_token_id", "eos_token_id")
    text = {k: v for k, v in config.items() if k not in top}
    out = {k: config[k] for k in top if k in config}
    out.update(model_type="qwen3_5", tie_word_embeddings=config["tie_word_embeddings"],
               text_config=dict(text, model_type="qwen3_5_text"))
    return out


def qwen35_shapes(config, hf):
    """Qwen3.5's weights: mlx-lm's names and forms, or (hf) Hugging Face's."""
    d, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    hd, hq, hkv = config["head_dim"], config["num_attention_heads"], config["num_key_value_heads"]
    hk, hv = config["linear_num_key_heads"], config["linear_num_value_heads"]
    keys, values = hk * config["linear_key_head_dim"], hv * config["linear_value_head_dim"]
    conv, taps = 2 * keys + values, config["linear_conv_kernel_dim"]
    model, norm = ("model.language_model.", "norm0") if hf else ("language_model.model.", "norm")
    out = [(model + "embed_tokens", (v, d), "q"), (model + "norm.weight", (d,), norm)]
    if not config["tie_word_embeddings"]:
        out.append(("lm_head" if hf else "language_model.lm_head", (v, d), "q"))
    for i in range(config["num_hidden_layers"]):
        p = f"{model}layers.{i}."
        out += [(p + "mlp.gate_proj", (f, d), "q"), (p + "mlp.up_proj", (f, d), "q"),
                (p + "mlp.down_proj", (d, f), "q"),
                (p + "input_layernorm.weight", (d,), norm), (p + "post_attention_layernorm.weight", (d,), norm)]
        if (i + 1) % config["full_attention_interval"]:
            a = p + "linear_attn."
            out += [(a + "in_proj_qkv", (conv, d), "q"), (a + "in_proj_z", (values, d), "q"),
                    (a + "in_proj_b", (hv, d), "q"), (a + "in_proj_a", (hv, d), "q"),
                    (a + "out_proj", (d, values), "q"),
                    (a + "conv1d.weight", (conv, 1, taps) if hf else (conv, taps, 1), "plain"),
                    (a + "A_log", (hv,), "A_log"), (a + "dt_bias", (hv,), "plain"),
                    (a + "norm.weight", (config["linear_value_head_dim"],), "norm")]  # never zero-centred
        else:
            s = p + "self_attn."
            out += [(s + "q_proj", (2 * hq * hd, d), "q"), (s + "k_proj", (hkv * hd, d), "q"),
                    (s + "v_proj", (hkv * hd, d), "q"), (s + "o_proj", (d, hq * hd), "q"),
                    (s + "q_norm.weight", (hd,), norm), (s + "k_norm.weight", (hd,), norm)]
    return out


def tensor_shapes(config, hf=False):
    """[(name, shape, kind)] of every weight, kind "q" (quantized), "norm" (multiplier 1: ones, or zeros where the
    family stores multiplier - 1, as Gemma does), "bias" or "plain" (drawn, kept as is), "A_log" (Qwen3.5's decay
    rates, fp32: log of U(1, 16) as its initialisation draws them). hf: Qwen3.5 in Hugging Face's form."""
    if config["model_type"] == "qwen3_5":
        return qwen35_shapes(config, hf)
    d, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    hd = config.get("head_dim") or d // config["num_attention_heads"]
    hq, hkv = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd
    gemma = config["model_type"] == "gemma3_text"
    norm = "norm0" if gemma else "norm"
    out = [("model.embed_tokens", (v, d), "q"), ("model.norm.weight", (d,), norm)]
    if not config["tie_word_embeddings"]:
        out.append(("lm_head", (v, d), "q"))
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [(p + "self_attn.q_proj", (hq, d), "q"), (p + "self_attn.k_proj", (hkv, d), "q"),
                (p + "self_attn.v_proj", (hkv, d), "q"), (p + "self_attn.o_proj", (d, hq), "q"),
                (p + "mlp.gate_proj", (f, d), "q"), (p + "mlp.up_proj", (f, d), "q"),
                (p + "mlp.down_proj", (d, f), "q"),
                (p + "input_layernorm.weight", (d,), norm), (p + "post_attention_layernorm.weight", (d,), norm)]
        if config["model_type"] == "qwen2" or config.get("attention_bias"):
            out += [(p + "self_attn.q_proj.bias", (hq,), "bias"), (p + "self_attn.k_proj.bias", (hkv,), "bias"),
                    (p + "self_attn.v_proj.bias", (hkv,), "bias")]
        if config["model_type"] == "qwen3" or gemma:
            out += [(p + "self_attn.q_norm.weight", (hd,), norm), (p + "self_attn.k_norm.weight", (hd,), norm)]
        if gemma:
            out += [(p + "pre_feedforward_layernorm.weight", (d,), norm),
                    (p + "post_feedforward_layernorm.weight", (d,), norm)]
    return out


def _nbytes(shape, kind, itemsize, quantized=True):
    n = math.prod(shape)
    return n // 2 + 2 * (n // GROUP) * itemsize if kind == "q" and quantized else n * itemsize


def _key(seed, name, block):
    # per tensor (and row block), not one stream: the same name gets the same weights whatever the layer count
    return mx.random.key(zlib.crc32(f"{seed}|{name}|{block}".encode()))


def make_tensor(name, shape, kind, seed, dtype, quantized=True):
    """{full name: array} for one weight, quantized a block of rows at a time when kind == "q" (unless not
    `quantized`: then the rows in `dtype`, drawn the same way)."""
    if kind in ("norm", "norm0"):
        return {name: (mx.ones if kind == "norm" else mx.zeros)(shape, dtype=dtype)}
    if kind in ("bias", "plain"):
        return {name: (0.02 * mx.random.normal(shape, key=_key(seed, name, 0))).astype(dtype)}
    if kind == "A_log":
        return {name: mx.log(mx.random.uniform(1, 16, shape, key=_key(seed, name, 0)))}
    rows, cols = shape
    step = max(1, ROW_ELEMENTS // cols)
    parts = []
    for k, r in enumerate(range(0, rows, step)):
        w = 0.02 * mx.random.normal((min(step, rows - r), cols), key=_key(seed, name, k))
        parts.append(mx.quantize(w, group_size=GROUP, bits=BITS) if quantized else (w.astype(dtype),))
        parts[-1] = (parts[-1][0],) + tuple(a.astype(dtype) for a in parts[-1][1:])
        mx.eval(parts[-1])  # frees this block's fp32 rows before the next block is drawn
    cat = lambda j: parts[0][j] if len(parts) == 1 else mx.concatenate([p[j] for p in parts])
    if not quantized:
        out = {f"{name}.weight": cat(0)}
        mx.eval(out)
        return out
    out = {f"{name}.weight": cat(0), f"{name}.scales": cat(1), f"{name}.biases": cat(2)}
    mx.eval(out)
    return out


def stdlib_text(limit=400_000):
    """Real text every machine has: a few standard-library modules' sources (read, never copied into the repo)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for rel in ("json/decoder.py", "json/encoder.py", "textwrap.py", "argparse.py", "difflib.py", "pathlib.py",
                "dataclasses.py", "functools.py", "collections/__init__.py"):
        if (root / rel).exists():
            out.append((root / rel).read_text(errors="replace"))
    text = "\n".join(out)[:limit]
    return text or "the quick brown fox jumps over the lazy dog\n" * 100


def write_tokenizer(out, vocab_size, trained=4096):
    """A byte-level BPE with exactly vocab_size ids: trained merges, then unreachable dummy tokens, then the
    ChatML special tokens as the last ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    n_base = vocab_size - len(SPECIAL)
    if n_base < 256:
        raise SystemExit(f"vocab {vocab_size} is too small: a byte-level BPE needs 256 byte tokens + "
                         f"{len(SPECIAL)} special ones")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=min(trained, n_base), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = stdlib_text()
    bpe.train_from_iterator([text[i:i + 4000] for i in range(0, len(text), 4000)], trainer)
    model = json.loads(bpe.to_str())["model"]
    vocab = dict(model["vocab"])
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in model["merges"]]
    k = 0
    while len(vocab) < n_base:  # spelled in printable ASCII, which byte-level decoding maps to itself
        vocab.setdefault(f"dummy{k}", len(vocab))
        k += 1
    for t in SPECIAL:
        vocab[t] = len(vocab)
    tok = Tokenizer(models.BPE(vocab, merges, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL)
    assert tok.get_vocab_size() == vocab_size, (tok.get_vocab_size(), vocab_size)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    hf.chat_template = CHAT_TEMPLATE
    hf.save_pretrained(str(out))


def make_model(preset, out, layers=None, seed=0, vocab=None, dtype="bfloat16", quantized=True):
    """Writes the random 4-bit model of `preset` (every weight in `dtype` if not `quantized`) into directory `out`
    (replaced if present); returns its path."""
    out = Path(out)
    config = preset_config(preset, layers, vocab)
    dt = getattr(mx, dtype)
    config["torch_dtype"] = dtype
    if quantized:
        config["quantization"] = {"group_size": GROUP, "bits": BITS}
        config["quantization_config"] = dict(config["quantization"])
    specs = tensor_shapes(config, hf=not quantized)
    shards, size = [[]], 0
    for spec in specs:
        nb = _nbytes(spec[1], spec[2], dt.size, quantized)
        if shards[-1] and size + nb > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nb
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        names = ["model.safetensors"] if len(shards) == 1 else \
            [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
        index = {}
        for fname, shard in zip(names, shards):
            tensors = {}
            for name, shape, kind in shard:
                tensors.update(make_tensor(name, shape, kind, seed, dt, quantized))
            mx.save_safetensors(str(tmp / fname), tensors, metadata={"format": "mlx"})
            index.update({k: fname for k in tensors})
            del tensors
        if len(names) > 1:
            (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index},
                                                                         indent=1))
        (tmp / "config.json").write_text(json.dumps(written_config(config), indent=2))
        write_tokenizer(tmp, config["vocab_size"])
        tmp.chmod(0o755)  # mkdtemp makes it private; the model directory is an ordinary one
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("preset", nargs="?")
    p.add_argument("--out")
    p.add_argument("--layers", type=int, help="override the number of layers")
    p.add_argument("--vocab", type=int, help="override the vocabulary size (tests)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="dtype of scales, biases and norms (mlx-community's 4-bit models ship bfloat16)")
    p.add_argument("--unquantized", action="store_true",
                   help="every weight in --dtype, no quantization (a full-precision checkpoint to convert)")
    p.add_argument("--list", action="store_true", help="print the presets")
    a = p.parse_args(argv)
    if a.list or not a.preset:
        for name, c in PRESETS.items():
            print(f"{name:14s} {c['model_type']:6s} d={c['hidden_size']} f={c['intermediate_size']} "
                  f"layers={c['num_hidden_layers']} heads={c['num_attention_heads']}/{c['num_key_value_heads']} "
                  f"vocab={c['vocab_size']}")
        return None
    if not a.out:
        p.error("--out is required")
    path = make_model(a.preset, a.out, a.layers, a.seed, a.vocab, a.dtype, not a.unquantized)
    print(path, file=sys.stderr)
    return path


if __name__ == "__main__":
    main()
