"""Comparison helpers with the tolerances the issues state: fp32, max relative error <= 1e-4 (max |a-b| over
max |b|, so tiny entries do not dominate), cosine >= 0.99999."""
from pathlib import Path

import mlx.core as mx

REL_TOL, COS_TOL = 1e-4, 0.99999


def rel_err(a, b):
    return float(mx.max(mx.abs(a - b))) / max(float(mx.max(mx.abs(b))), 1e-30)


def cosine(a, b):
    a, b = a.reshape(-1), b.reshape(-1)
    return float(mx.sum(a * b) / (mx.sqrt(mx.sum(a * a) * mx.sum(b * b)) + 1e-30))


def assert_close(a, b, what=""):
    assert a.shape == b.shape, f"{what}: shape {a.shape} vs {b.shape}"
    if float(mx.max(mx.abs(b))) == 0.0:  # an exactly-zero reference (e.g. dq at T=1): ours must be ~0 too
        assert float(mx.max(mx.abs(a))) <= 1e-6, f"{what}: reference is 0, ours {float(mx.max(mx.abs(a)))}"
        return
    e, c = rel_err(a, b), cosine(a, b)
    assert e <= REL_TOL and c >= COS_TOL, f"{what}: rel err {e:.2e}, cosine {c:.7f}"


def assert_grads_close(g, ref):
    assert set(g) == set(ref), f"blocks {sorted(g)} vs {sorted(ref)}"
    for i in ref:
        assert set(g[i]) == set(ref[i])
        for p in ref[i]:
            for k, name in enumerate(("lora_a", "lora_b")):
                assert_close(g[i][p][k], ref[i][p][k], f"layer {i} {p}.{name}")


def mlx_lm_model(path, adapter_path=None, fp32_base=True):
    """mlx-lm's own model of a directory, loaded by `mlx_lm.load` (with our adapter when given). fp32_base: every
    quantized layer dequantized with its scales cast to fp32 first, which is exactly what our forward does (ops/linear
    `dense`); mlx-lm's quantized kernels work through the fp16 scales and differ from it by ~5e-4 relative."""
    import mlx.nn as nn
    from mlx_lm import load
    from mlx_lm.utils import dequantize_model, load_model
    if adapter_path is None:  # the model alone (a directory may have no tokenizer)
        model, _ = load_model(Path(path))
    else:
        model, _ = load(str(path), adapter_path=str(adapter_path))
    if fp32_base:
        for _, m in model.named_modules():
            if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
                m.scales, m.biases = m.scales.astype(mx.float32), m.biases.astype(mx.float32)
        model = dequantize_model(model)
    return model
