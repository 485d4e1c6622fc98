"""Rotary position embedding, both layouts ("traditional" interleaved pairs, or split halves).

RoPE is a rotation by angle pos * scale / freq for each pair, so its backward is the inverse rotation: the same
kernel with the frequencies negated, in the same layout. Leaving it out (as the reference MeSP code did) makes q/k
gradients inexact.
"""
from dataclasses import dataclass

import mlx.core as mx


@dataclass(frozen=True)
class Rope:
    dims: int
    traditional: bool
    freqs: mx.array  # wavelength per rotated pair, as mx.fast.rope takes it
    scale: float = 1.0


def rope_spec(dims, base, traditional=False, scaling=None, max_position_embeddings=None):
    """The rotation for a model config, covering the rope types of the supported families (default, linear, llama3)."""
    freqs = base ** (mx.arange(0, dims, 2, dtype=mx.float32) / dims)
    kind = (scaling or {}).get("rope_type") or (scaling or {}).get("type") or "default"
    scale = 1.0
    if kind == "linear":
        scale = 1.0 / scaling["factor"]
    elif kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_len = scaling.get("original_max_position_embeddings", 8192)
        wavelens = 2 * mx.pi * freqs
        freqs = mx.where(wavelens > old_len / low, freqs * factor, freqs)
        medium = (wavelens > old_len / high) & (wavelens < old_len / low)
        smooth = (old_len / wavelens - low) / (high - low)
        freqs = mx.where(medium, freqs / ((1 - smooth) / factor + smooth), freqs)
    elif kind != "default":
        raise ValueError(f"unsupported rope scaling type {kind!r} (supported: default, linear, llama3)")
    return Rope(dims, traditional, freqs, scale)


def rope_forward(x, rope: Rope):
    return mx.fast.rope(x, rope.dims, traditional=rope.traditional, base=None, scale=rope.scale,
                        offset=0, freqs=rope.freqs)


def rope_backward(dy, rope: Rope):
    return mx.fast.rope(dy, rope.dims, traditional=rope.traditional, base=None, scale=rope.scale,
                        offset=0, freqs=-rope.freqs)
