"""Builders the tests share: tiny random models of each architecture, written by the tests themselves in mlx-lm
format or as GGUF files the way llama.cpp's converter writes them. Tests import them from here (`from builders
import write_tiny`); conftest.py only turns some into fixtures."""
import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

TINY = {
    "llama": dict(model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=96,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=211, rms_norm_eps=1e-5,
                  rope_theta=10000.0, tie_word_embeddings=True, max_position_embeddings=512),
    "qwen2": dict(model_type="qwen2", hidden_size=64, num_hidden_layers=3, intermediate_size=160,
                  num_attention_heads=8, num_key_value_heads=2, vocab_size=173, rms_norm_eps=1e-6,
                  rope_theta=1000000.0, tie_word_embeddings=False, max_position_embeddings=512),
    "qwen3": dict(model_type="qwen3", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                  num_attention_heads=6, num_key_value_heads=2, head_dim=16, vocab_size=157, rms_norm_eps=1e-6,
                  rope_theta=1000000.0, tie_word_embeddings=True, max_position_embeddings=512),
    # layers 0, 1 local over 5 keys (rope base 10000), layer 2 global (base 1e6, linear scaling); d = 48 so that
    # sqrt(d) is not a bf16 number; query_pre_attn_scalar != head_dim != d / heads
    "gemma3_text": dict(model_type="gemma3_text", hidden_size=48, num_hidden_layers=3, intermediate_size=96,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=190,
                        rms_norm_eps=1e-6, rope_theta=1000000.0, rope_local_base_freq=10000.0,
                        rope_scaling={"rope_type": "linear", "factor": 2.0}, query_pre_attn_scalar=24,
                        sliding_window=5, sliding_window_pattern=3, max_position_embeddings=512,
                        hidden_activation="gelu_pytorch_tanh"),
    # layers 0 and 2 over a window of 6 keys (named per layer: mlx-lm's Llama reads layer_types, not
    # sliding_window alone, and needs one full layer), untied head
    "mistral": dict(model_type="mistral", hidden_size=64, num_hidden_layers=3, intermediate_size=96,
                    num_attention_heads=4, num_key_value_heads=2, vocab_size=181, rms_norm_eps=1e-5,
                    rope_theta=1000000.0, tie_word_embeddings=False, max_position_embeddings=512, sliding_window=6,
                    layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
    "smollm3": dict(model_type="smollm3", hidden_size=64, num_hidden_layers=3, intermediate_size=96,
                    num_attention_heads=4, num_key_value_heads=2, vocab_size=167, rms_norm_eps=1e-6,
                    rope_theta=5000000.0, tie_word_embeddings=True, max_position_embeddings=512,
                    no_rope_layers=[1, 0, 1]),
    # fused projections, RoPE on 12 of 16 features, LongRoPE with its attention factor (max / original = 4)
    "phi3": dict(model_type="phi3", hidden_size=64, num_hidden_layers=2, intermediate_size=80,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=163, rms_norm_eps=1e-5,
                 rope_theta=10000.0, tie_word_embeddings=False, max_position_embeddings=256,
                 original_max_position_embeddings=64, partial_rotary_factor=0.75,
                 rope_scaling={"type": "longrope", "long_factor": [1.0, 1.5, 2.0, 3.0, 5.0, 8.0],
                               "short_factor": [1.0] * 6}),
    # mlx-lm's flat form: linear-attention layers 0, 2 (Hk 2 key heads, Hv 4 value heads), full attention 1, 3 with
    # RoPE on 4 of 16 features and the output gate; untied head
    "qwen3_5": dict(model_type="qwen3_5", hidden_size=64, num_hidden_layers=4, intermediate_size=96,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=200, rms_norm_eps=1e-6,
                    linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
                    linear_value_head_dim=16, linear_conv_kernel_dim=4, full_attention_interval=2,
                    tie_word_embeddings=False, max_position_embeddings=512,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25,
                                     "mrope_section": [1, 1, 0], "mrope_interleaved": True}),
}


def tiny_weights(config, seed=0):
    rng = np.random.default_rng(seed)
    d, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    hd = config.get("head_dim") or d // config["num_attention_heads"]
    hq, hkv = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd
    w = lambda *s: mx.array(rng.normal(0, 0.08, s).astype(np.float32))
    out = {"model.embed_tokens.weight": w(v, d), "model.norm.weight": mx.array(1 + 0.1 * rng.normal(size=d)
                                                                                .astype(np.float32))}
    if not config.get("tie_word_embeddings", True):
        out["lm_head.weight"] = w(v, d)
    kind = config["model_type"]
    gemma = kind.startswith("gemma")
    norm = (lambda n: w(n)) if gemma else (lambda n: 1 + w(n))  # Gemma stores multiplier - 1
    if gemma:
        out["model.norm.weight"] = norm(d)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        if kind == "qwen3_5":
            out.update(qwen35_layer(config, i, w, rng))
            continue
        if kind == "phi3":  # fused: q, k, v rows in one matrix; gate, up rows in another
            out.update({p + "self_attn.qkv_proj.weight": w(hq + 2 * hkv, d),
                        p + "mlp.gate_up_proj.weight": w(2 * f, d)})
        else:
            out.update({p + "self_attn.q_proj.weight": w(hq, d), p + "self_attn.k_proj.weight": w(hkv, d),
                        p + "self_attn.v_proj.weight": w(hkv, d), p + "mlp.gate_proj.weight": w(f, d),
                        p + "mlp.up_proj.weight": w(f, d)})
        out.update({p + "self_attn.o_proj.weight": w(d, hq), p + "mlp.down_proj.weight": w(d, f),
                    p + "input_layernorm.weight": norm(d), p + "post_attention_layernorm.weight": norm(d)})
        if gemma:
            out.update({p + "pre_feedforward_layernorm.weight": norm(d), p + "post_feedforward_layernorm.weight":
                        norm(d), p + "self_attn.q_norm.weight": norm(hd), p + "self_attn.k_norm.weight": norm(hd)})
        if config["model_type"] == "qwen2":
            out.update({p + "self_attn.q_proj.bias": w(hq), p + "self_attn.k_proj.bias": w(hkv),
                        p + "self_attn.v_proj.bias": w(hkv)})
        if config["model_type"] == "qwen3":
            out.update({p + "self_attn.q_norm.weight": 1 + w(hd), p + "self_attn.k_norm.weight": 1 + w(hd)})
    return out


def qwen35_layer(config, i, w, rng):
    """One Qwen3.5 block in mlx-lm's form (norms the multiplier, conv1d [C, K, 1], A_log fp32)."""
    d, f, hd = config["hidden_size"], config["intermediate_size"], config["head_dim"]
    p = f"model.layers.{i}."
    norm = lambda n: 1 + w(n)
    out = {p + "mlp.gate_proj.weight": w(f, d), p + "mlp.up_proj.weight": w(f, d), p + "mlp.down_proj.weight": w(d, f),
           p + "input_layernorm.weight": norm(d), p + "post_attention_layernorm.weight": norm(d)}
    if (i + 1) % config["full_attention_interval"]:
        hk, hv = config["linear_num_key_heads"], config["linear_num_value_heads"]
        keys, values = hk * config["linear_key_head_dim"], hv * config["linear_value_head_dim"]
        a = p + "linear_attn."
        out.update({a + "in_proj_qkv.weight": w(2 * keys + values, d), a + "in_proj_z.weight": w(values, d),
                    a + "in_proj_b.weight": w(hv, d), a + "in_proj_a.weight": w(hv, d),
                    a + "out_proj.weight": w(d, values),
                    a + "conv1d.weight": w(2 * keys + values, config["linear_conv_kernel_dim"], 1),
                    a + "A_log": mx.array(np.log(rng.uniform(1, 16, hv)).astype(np.float32)),
                    a + "dt_bias": mx.array(rng.uniform(-1, 1, hv).astype(np.float32)),
                    a + "norm.weight": norm(config["linear_value_head_dim"])})
    else:
        hq, hkv = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd
        out.update({p + "self_attn.q_proj.weight": w(2 * hq, d), p + "self_attn.k_proj.weight": w(hkv, d),
                    p + "self_attn.v_proj.weight": w(hkv, d), p + "self_attn.o_proj.weight": w(d, hq),
                    p + "self_attn.q_norm.weight": norm(hd), p + "self_attn.k_norm.weight": norm(hd)})
    return out


def write_tiny(path, arch, seed=0, **overrides):
    config = dict(TINY[arch], **overrides)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    mx.save_safetensors(str(path / "model.safetensors"), tiny_weights(config, seed))
    return path


GGUF_GEMMA3 = {"post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
               "post_feedforward_layernorm": "post_ffw_norm"}
GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
              "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
              # Phi-3's fused projections, kept fused: q, k, v rows; gate rows, then up rows (llama.cpp's layout)
              "self_attn.qkv_proj": "attn_qkv", "mlp.gate_up_proj": "ffn_up"}
GGUF_PERMUTED = ("llama", "smollm3")  # q/k rows permuted by llama.cpp's converter (its Llama converter's subclasses)


CHATML = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def tiny_bpe(vocab_size, specials=CHATML):
    """A real byte-level BPE trained on a few lines, with special tokens first (ids 0, 1, ...): (tokens, merges)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog " * 20, "def main(): return 0\n" * 20],
                            trainer)
    vocab = tok.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [" ".join(m) for m in json.loads(tok.to_str())["model"]["merges"]]
    return tokens, merges


def write_tiny_gguf(path, arch, qtype="Q8_0", seed=0, drop_tensor=None, bad_type_tensor=None, pre="gpt2",
                    specials=CHATML, bos=0, eos=2, **overrides):
    """The tiny model of `arch` as a GGUF file as llama.cpp's converter writes it: Llama (and Mistral) and SmolLM3 q/k
    rows permuted, Gemma 3 as arch gemma3 with its norms stored as 1 + w, Phi-3 with its fused projections as they
    are, its rotated features per head as rope.dimension_count and LongRoPE's factors as the tensors
    rope_factors_long / rope_factors_short (with the attention factor as metadata). SmolLM3's no_rope_layers are not
    written (llama.cpp has no key for them; it fixes every fourth layer). llama.cpp itself refuses the pre-tokenizer
    "gpt2" on such a vocabulary and takes pre="default"; `specials` are the first tokens (type 3), bos / eos their
    ids. Qwen3.5 (`qwen3_5`): builders.tiny_qwen35's multimodal checkpoint (its `overrides` the text config's) as
    write_tiny_qwen35_gguf writes it; the config and weights returned are that checkpoint's."""
    import gguf
    import numpy as np
    if arch == "qwen3_5":
        config, weights = tiny_qwen35(seed, **overrides)
        write_tiny_qwen35_gguf(path, weights, config, qtype, pre=pre, specials=specials, bos=bos, eos=eos)
        return config, weights
    config = dict(TINY[arch], vocab_size=300, **overrides)
    tokens, merges = tiny_bpe(300, specials)
    weights = {k: np.array(v) for k, v in tiny_weights(config, seed).items()}
    gemma = arch == "gemma3_text"
    garch = {"gemma3_text": "gemma3", "mistral": "llama"}.get(arch, arch)
    w = gguf.GGUFWriter(str(path), garch)
    if gemma:
        w.add_sliding_window(config["sliding_window"])
    w.add_block_count(config["num_hidden_layers"])
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(config["num_attention_heads"])
    w.add_head_count_kv(config["num_key_value_heads"])
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_rope_freq_base(config["rope_theta"])
    if "head_dim" in config:
        w.add_key_length(config["head_dim"])
        w.add_value_length(config["head_dim"])
    heads = config["num_attention_heads"]
    if garch == "smollm3":  # llama.cpp's Llama converter: the head size
        w.add_rope_dimension_count(config.get("head_dim") or config["hidden_size"] // heads)
    if garch == "phi3":
        import math
        w.add_rope_dimension_count(int(config.get("partial_rotary_factor", 1.0) * config["hidden_size"]) // heads)
        orig = config["original_max_position_embeddings"]
        w.add_rope_scaling_orig_ctx_len(orig)
        w.add_sliding_window(config.get("sliding_window") or 0)
        scaling = config.get("rope_scaling")
        if scaling:
            ratio = config["max_position_embeddings"] / orig
            w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(ratio) / math.log(orig)) if ratio > 1 else 1.0)
            for which in ("long", "short"):
                w.add_tensor(f"rope_factors_{which}.weight", np.array(scaling[f"{which}_factor"], np.float32))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([3 if t in specials else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(bos)
    w.add_eos_token_id(eos)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    qt = getattr(gguf.GGMLQuantizationType, qtype)
    nh, nkv = config["num_attention_heads"], config["num_key_value_heads"]
    for name, arr in weights.items():
        parts = name.split(".")
        if parts[0] == "lm_head":
            gname = "output." + parts[-1]
        elif parts[1] == "embed_tokens":
            gname = "token_embd.weight"
        elif parts[1] == "norm":
            gname = "output_norm.weight"
        else:
            module = '.'.join(parts[3:-1])
            gname = f"blk.{parts[2]}.{(GGUF_GEMMA3 if gemma else {}).get(module) or GGUF_NAMES[module]}.{parts[-1]}"
        if gemma and parts[-2].endswith("norm"):
            arr = arr + 1.0
        if garch in GGUF_PERMUTED and parts[-1] == "weight" and parts[-2] in ("q_proj", "k_proj"):
            n = nh if parts[-2] == "q_proj" else nkv
            arr = arr.reshape(n, 2, arr.shape[0] // n // 2, *arr.shape[1:]).swapaxes(1, 2).reshape(arr.shape)
        if gname == drop_tensor:
            continue
        if gname == bad_type_tensor:
            w.add_tensor(gname, np.zeros((arr.shape[0], arr.shape[1] // 32 * gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_1][1]), np.uint8),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_1)
        elif arr.ndim == 2:
            w.add_tensor(gname, gguf.quants.quantize(arr.astype(np.float32), qt), raw_dtype=qt)
        else:
            w.add_tensor(gname, arr.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return config, weights


def launcher():
    """(mlx.launch, the mesp-train entry point) of this environment; the test is skipped where either is missing."""
    bin_dir = Path(sys.executable).parent
    launch, entry = bin_dir / "mlx.launch", bin_dir / "mesp-train"
    if not launch.exists() or not entry.exists():
        pytest.skip("mlx.launch or the mesp-train entry point is not installed")
    return launch, entry


def run_two_processes(args, timeout=300):
    """mesp-train with `args` on two processes (mx.distributed's ring backend on loopback, started by mlx.launch);
    asserts that the group succeeded."""
    launch, entry = launcher()
    env = dict(os.environ, MESP_MLX_NO_BLAS_PRELOAD="1")
    r = subprocess.run([str(launch), "-n", "2", "--python", sys.executable, str(entry)] + args, env=env,
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return r


# Qwen3.5 dense (llama.cpp architecture qwen35) in Hugging Face's form: three of the four layers Gated DeltaNet
# (full_attention_interval 2 here: layers 1 and 3 are gated full attention), Hk = 2 < Hv = 4 so that llama.cpp's
# value-head reorder matters, RoPE on half of each 16-wide head, a vocabulary of tiny_bpe's 300 tokens
TINY_QWEN35 = dict(
    model_type="qwen3_5", architectures=["Qwen3_5ForConditionalGeneration"], tie_word_embeddings=True,
    text_config=dict(model_type="qwen3_5_text", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, linear_num_key_heads=2,
                     linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
                     linear_conv_kernel_dim=4, full_attention_interval=2, rms_norm_eps=1e-6, vocab_size=300,
                     max_position_embeddings=512, tie_word_embeddings=True, attn_output_gate=True,
                     layer_types=["linear_attention", "full_attention"] * 2,
                     # 4 rotary pairs; interleaved M-RoPE sections cover all of them, so text positions rotate
                     # every pair as plain RoPE does
                     rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5,
                                          mrope_section=[2, 1, 1], mrope_interleaved=True)))


def tiny_qwen35(seed=0, **text_overrides):
    """(config, weights): a tiny Qwen3.5 checkpoint as Hugging Face publishes one (names under
    model.language_model., zero-centred norms applied as 1 + w, linear_attn.norm a plain weight, conv1d [C, 1, K],
    A_log fp32), numpy float32."""
    import copy
    config = copy.deepcopy(TINY_QWEN35)
    config["text_config"].update(text_overrides)
    t = config["text_config"]
    rng = np.random.default_rng(seed)
    w = lambda *s: rng.normal(0, 0.08, s).astype(np.float32)
    d, f, v = t["hidden_size"], t["intermediate_size"], t["vocab_size"]
    hd, nh, nkv = t["head_dim"], t["num_attention_heads"], t["num_key_value_heads"]
    hk, hv, dk, dv = (t["linear_num_key_heads"], t["linear_num_value_heads"], t["linear_key_head_dim"],
                      t["linear_value_head_dim"])
    centred = lambda n: rng.normal(0, 0.1, n).astype(np.float32)
    p0 = "model.language_model."
    out = {p0 + "embed_tokens.weight": w(v, d), p0 + "norm.weight": centred(d)}
    if not config["tie_word_embeddings"]:
        out["lm_head.weight"] = w(v, d)
    for i in range(t["num_hidden_layers"]):
        p = f"{p0}layers.{i}."
        out.update({p + "input_layernorm.weight": centred(d), p + "post_attention_layernorm.weight": centred(d),
                    p + "mlp.gate_proj.weight": w(f, d), p + "mlp.up_proj.weight": w(f, d),
                    p + "mlp.down_proj.weight": w(d, f)})
        if (i + 1) % t["full_attention_interval"]:
            a = p + "linear_attn."
            out.update({a + "in_proj_qkv.weight": w(2 * hk * dk + hv * dv, d), a + "in_proj_z.weight": w(hv * dv, d),
                        a + "in_proj_a.weight": w(hv, d), a + "in_proj_b.weight": w(hv, d),
                        a + "conv1d.weight": rng.normal(0, 0.3, (2 * hk * dk + hv * dv, 1, t["linear_conv_kernel_dim"]))
                        .astype(np.float32),
                        # decays exp(-A softplus(.)) spread over (0, 1) per head, so that a head read from the wrong
                        # key head or with another head's decay shows
                        a + "dt_bias": rng.normal(0, 1, hv).astype(np.float32),
                        a + "A_log": np.log(rng.uniform(0.2, 4.0, hv)).astype(np.float32),
                        a + "norm.weight": (1 + rng.normal(0, 0.1, dv)).astype(np.float32),
                        a + "out_proj.weight": w(d, hv * dv)})
        else:
            a = p + "self_attn."
            out.update({a + "q_proj.weight": w(2 * nh * hd, d), a + "k_proj.weight": w(nkv * hd, d),
                        a + "v_proj.weight": w(nkv * hd, d), a + "o_proj.weight": w(d, nh * hd),
                        a + "q_norm.weight": centred(hd), a + "k_norm.weight": centred(hd)})
    return config, out


def qwen35_mlx_lm_weights(weights, config):
    """Hugging Face Qwen3.5 weights -> the names and forms mlx-lm's qwen3_5.Model holds (what its sanitize does):
    language_model.model.* / language_model.lm_head, conv1d [C, 1, K] -> [C, K, 1], 1 added to the zero-centred
    norms (not to linear_attn.norm), the lm_head dropped when tied; vision and MTP weights dropped."""
    shifted = (".input_layernorm.weight", ".post_attention_layernorm.weight", ".q_norm.weight", ".k_norm.weight")
    out = {}
    for k, v in weights.items():
        if "mtp." in k or "visual" in k or "vision_tower" in k:
            continue
        if k == "lm_head.weight" and config["text_config"].get("tie_word_embeddings", config["tie_word_embeddings"]):
            continue
        name = (k.replace("model.language_model.", "language_model.model.", 1) if k.startswith("model.language_model.")
                else "language_model." + k)
        v = np.asarray(v)
        if name.endswith("conv1d.weight"):
            v = np.swapaxes(v, 1, 2)
        if name.endswith(shifted) or name == "language_model.model.norm.weight":
            v = v + 1.0
        out[name] = mx.array(v)
    return out


def mlx_lm_qwen35(weights, config):
    """mlx-lm's own Qwen3.5 model (mlx_lm.models.qwen3_5.Model) holding `weights` (Hugging Face form), in eval mode."""
    import copy
    from mlx_lm.models.qwen3_5 import Model, ModelArgs
    model = Model(ModelArgs.from_dict(copy.deepcopy(config)))  # from_dict edits rope_parameters in place
    model.load_weights(list(qwen35_mlx_lm_weights(weights, config).items()))
    model.eval()
    return model


def write_tiny_qwen35_gguf(path, weights, config, qtype="F32", grouped_value_heads=False, pre="default",
                           specials=CHATML, bos=0, eos=2):
    """Hugging Face Qwen3.5 weights as the qwen35 GGUF llama.cpp's converter writes (mesp_mlx.io.qwen35_gguf has
    the tensor transforms: names, +1 on the zero-centred norms, ssm_a = -exp(A_log), conv1d [C, K], value heads
    grouped -> tiled), with its metadata and tiny_bpe's tokenizer (as write_tiny_gguf writes it). Matrices in
    `qtype`, norms, conv1d, ssm_a and ssm_dt in F32. grouped_value_heads=True skips the value-head reorder (a file
    llama.cpp misreads: the control that shows a test sees the reorder)."""
    import gguf
    from mesp_mlx.io.qwen35_gguf import tensor_to_gguf
    t = config["text_config"]
    tokens, merges = tiny_bpe(t["vocab_size"], specials)
    assert len(tokens) == t["vocab_size"], (len(tokens), t["vocab_size"])
    dims = dict(t, linear_num_key_heads=t["linear_num_value_heads"]) if grouped_value_heads else t
    rope = t["rope_parameters"]
    w = gguf.GGUFWriter(str(path), "qwen35")
    # TextModel.set_gguf_parameters
    w.add_block_count(t["num_hidden_layers"])
    w.add_context_length(t["max_position_embeddings"])
    w.add_embedding_length(t["hidden_size"])
    w.add_feed_forward_length(t["intermediate_size"])
    w.add_head_count(t["num_attention_heads"])
    w.add_head_count_kv(t["num_key_value_heads"])
    w.add_rope_freq_base(rope["rope_theta"])
    w.add_layer_norm_rms_eps(t["rms_norm_eps"])
    w.add_key_length(t["head_dim"])
    w.add_value_length(t["head_dim"])
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if qtype == "F32" else getattr(gguf.LlamaFileType, f"MOSTLY_{qtype}"))
    # interleaved M-RoPE sections, padded to 4 (the converter's default [11, 11, 10, 0] when the config has none)
    w.add_rope_dimension_sections((list(rope.get("mrope_section", [11, 11, 10])) + [0, 0, 0, 0])[:4])
    # Qwen3NextModel.set_gguf_parameters
    w.add_ssm_conv_kernel(t["linear_conv_kernel_dim"])
    w.add_ssm_state_size(t["linear_key_head_dim"])
    w.add_ssm_group_count(t["linear_num_key_heads"])
    w.add_ssm_time_step_rank(t["linear_num_value_heads"])
    w.add_ssm_inner_size(t["linear_value_head_dim"] * t["linear_num_value_heads"])
    w.add_full_attention_interval(t["full_attention_interval"])
    w.add_rope_dimension_count(int(t["head_dim"] * rope.get("partial_rotary_factor", 0.25)))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([3 if tok in specials else 1 for tok in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(bos)
    w.add_eos_token_id(eos)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    qt = getattr(gguf.GGMLQuantizationType, qtype)
    for name, arr in weights.items():
        got = tensor_to_gguf(name, arr, dims)
        if got is None:
            continue
        gname, arr = got
        if arr.ndim == 2 and qtype != "F32" and not gname.endswith("ssm_conv1d.weight"):
            w.add_tensor(gname, gguf.quants.quantize(arr.astype(np.float32), qt), raw_dtype=qt)
        else:
            w.add_tensor(gname, np.ascontiguousarray(arr, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
