"""Tiny random models of each architecture, written by the tests themselves in mlx-lm format."""
import json

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
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out.update({p + "self_attn.q_proj.weight": w(hq, d), p + "self_attn.k_proj.weight": w(hkv, d),
                    p + "self_attn.v_proj.weight": w(hkv, d), p + "self_attn.o_proj.weight": w(d, hq),
                    p + "mlp.gate_proj.weight": w(f, d), p + "mlp.up_proj.weight": w(f, d),
                    p + "mlp.down_proj.weight": w(d, f),
                    p + "input_layernorm.weight": 1 + w(d), p + "post_attention_layernorm.weight": 1 + w(d)})
        if config["model_type"] == "qwen2":
            out.update({p + "self_attn.q_proj.bias": w(hq), p + "self_attn.k_proj.bias": w(hkv),
                        p + "self_attn.v_proj.bias": w(hkv)})
        if config["model_type"] == "qwen3":
            out.update({p + "self_attn.q_norm.weight": 1 + w(hd), p + "self_attn.k_norm.weight": 1 + w(hd)})
    return out


def write_tiny(path, arch, seed=0, **overrides):
    config = dict(TINY[arch], **overrides)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    mx.save_safetensors(str(path / "model.safetensors"), tiny_weights(config, seed))
    return path


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MESP_MLX_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(params=sorted(TINY))
def arch(request):
    return request.param


@pytest.fixture
def tiny_dir(tmp_path, arch):
    return write_tiny(tmp_path / arch, arch)


def pytest_configure(config):
    # Same speed-up as the CLI: run the suite with OpenBLAS preloaded when it is installed.
    from mesp_mlx.blas import ensure_fast_blas
    ensure_fast_blas()
