"""Comparison helpers and the tolerances of the suite, by device.

Error measure: max |a-b| over max |b| (so tiny entries do not dominate), and the cosine.
- CPU, fp32: products are true fp32 (unit roundoff 6e-8); the sums over a few hundred terms here stay below 1e-6
  relative, so two exact computations in another order agree to EXACT = 1e-5, and gradients through a whole model
  (a chain of ~20 such products) to REL_TOL = 1e-4, cosine >= 0.99999.
- GPU: CUDA runs fp32 matmuls with TF32-like inputs (10-bit mantissa, unit roundoff 2^-11 = 4.9e-4; measured 3e-4
  between the CPU and an H100 on these models). A single product is then off by up to ~1e-3 of its largest entry,
  so EXACT = REL_TOL = 2e-3 and cosine >= 0.9999 there (Metal is true fp32, but the bound holds for it too).
float64 exists only on the CPU (not on Metal or CUDA): fp64 references run on the CPU stream. MLX's CPU `exp` computes
in float32 for every dtype (its SIMD polynomial converts the argument to float: ~|x| * 2^-24 relative), so two fp64
paths through a log-sum-exp that shift by different maxima (the chunked head's running maximum, autodiff's global one)
agree to ~2 * (30 + 4) * 2^-24 = 4e-6 nats, not to fp64 rounding: LOSS_TOL_FP64 = 1e-5 nats, absolute (terms 30 below
the maximum weigh under e^-30).
"""
from pathlib import Path

import mlx.core as mx

from mesp_mlx.objectives import SFT

ON_GPU = mx.default_device() == mx.gpu
EXACT = 2e-3 if ON_GPU else 1e-5
REL_TOL, COS_TOL = (2e-3, 0.9999) if ON_GPU else (1e-4, 0.99999)
LOSS_TOL_FP64 = 1e-5


def sft_batch(inputs, targets, mask, segments=None):
    """A next-token batch of these arrays (mean cross-entropy over the masked targets)."""
    return SFT().batch(inputs, targets, mask, segments)


def rel_err(a, b):
    return float(mx.max(mx.abs(a - b))) / max(float(mx.max(mx.abs(b))), 1e-30)


def cosine(a, b):
    a, b = a.reshape(-1), b.reshape(-1)
    return float(mx.sum(a * b) / (mx.sqrt(mx.sum(a * a) * mx.sum(b * b)) + 1e-30))


def assert_close(a, b, what=""):
    assert a.shape == b.shape, f"{what}: shape {a.shape} vs {b.shape}"
    if float(mx.max(mx.abs(b))) == 0.0:  # an exactly-zero reference (e.g. dq at T=1): ours must be ~0 too
        assert float(mx.max(mx.abs(a))) <= EXACT / 10, f"{what}: reference is 0, ours {float(mx.max(mx.abs(a)))}"
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


def step_extra_memory(engine, params, batch):
    """MLX peak of one loss_and_grad step minus what was resident before it (after a warm-up step)."""
    mx.eval(params)
    engine.loss_and_grad(params, batch)
    mx.clear_cache()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    engine.loss_and_grad(params, batch)
    return mx.get_peak_memory() - base
