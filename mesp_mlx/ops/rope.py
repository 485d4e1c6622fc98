"""Rotary position embedding, both layouts ("traditional" interleaved pairs, or split halves), over the first `dims`
features of each head (partial rotary: Phi-4-mini rotates 3/4 of them; the rest pass through unchanged).

RoPE is a rotation by angle pos * scale / freq for each pair, so its backward is the inverse rotation: the same
kernel with the frequencies negated, in the same layout. Leaving it out (as the reference MeSP code did) makes q/k
gradients inexact. LongRoPE (Phi-3 / Phi-4-mini) also multiplies the rotated features by a constant `mscale` before
rotating; a constant factor's backward is the same factor, applied after the inverse rotation.
Packed rows (--pack) restart their positions at each row's first token: with per-token `positions` the angles are
formed per token (the fused kernel takes one offset per call) and the backward is the same rotation negated.
"""
import math
from dataclasses import dataclass

import mlx.core as mx


@dataclass(frozen=True)
class Rope:
    dims: int
    traditional: bool
    freqs: mx.array  # wavelength per rotated pair, as mx.fast.rope takes it
    scale: float = 1.0
    mscale: float = 1.0  # LongRoPE's attention factor on the rotated features


ROPE_TYPES = ("default", "linear", "llama3", "longrope", "su")


def rope_spec(dims, base, traditional=False, scaling=None, max_position_embeddings=None,
              original_max_position_embeddings=None):
    """The rotation for a model config, covering the rope types of the supported families."""
    freqs = base ** (mx.arange(0, dims, 2, dtype=mx.float32) / dims)
    kind = (scaling or {}).get("rope_type") or (scaling or {}).get("type") or "default"
    scale, mscale = 1.0, 1.0
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
    elif kind in ("longrope", "su"):
        # mlx-lm's reading (what an adapter trained here is used with): the long factors at every length, and the
        # attention factor sqrt(1 + ln(s) / ln(original length)) for s = max / original length when s > 1.
        # (Hugging Face switches to the short factors below the original length.)
        long_factor = scaling["long_factor"]
        if isinstance(long_factor, list) and len(long_factor) != dims // 2:
            raise ValueError(f"rope_scaling long_factor has {len(long_factor)} entries, expected {dims // 2}")
        freqs = mx.array(long_factor, dtype=mx.float32) * freqs
        original = original_max_position_embeddings or 4096
        factor = (max_position_embeddings or original) / original
        mscale = scaling.get("long_mscale") or (1.0 if factor <= 1.0 else
                                                math.sqrt(1 + math.log(factor) / math.log(original)))
    elif kind != "default":
        raise ValueError(f"unsupported rope scaling type {kind!r} (supported: {', '.join(ROPE_TYPES)})")
    return Rope(dims, traditional, freqs, scale, mscale)


def _rotate(x, rope: Rope, sign, offset=0):
    """The rotation written out, for float64: MLX's fused kernel forms its angles in fp32 (~1e-7 relative), which
    would hide a wrong term in the fp64 exactness checks. Angle of pair j at position p: p * scale / freqs[j]
    (positions offset, offset + 1, ...)."""
    pos = mx.arange(offset, offset + x.shape[-2], dtype=x.dtype)[:, None] * rope.scale
    theta = sign * pos / rope.freqs.astype(x.dtype)[None, :]
    return _apply(x, mx.cos(theta), mx.sin(theta), rope)


def _apply(x, c, s, rope: Rope):
    """Rotates each pair of x's first rope.dims features by the angles whose cos / sin are c, s."""
    d, half = rope.dims, rope.dims // 2
    xr = x[..., :d]
    if rope.traditional:  # interleaved pairs (x0, x1), (x2, x3), ...
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        out = mx.stack([x1 * c - x2 * s, x1 * s + x2 * c], axis=-1).reshape(xr.shape)
    else:  # split halves (x_j, x_{j + d/2})
        x1, x2 = xr[..., :half], xr[..., half:]
        out = mx.concatenate([x1 * c - x2 * s, x1 * s + x2 * c], axis=-1)
    out = out.astype(x.dtype)  # angles formed in a wider type than x's keep their precision up to here
    return out if d == x.shape[-1] else mx.concatenate([out, x[..., d:]], axis=-1)


def segment_positions(segments):
    """(B, T) segment ids, constant over each packed row -> (B, T) int32 positions counted from each row's start."""
    t = segments.shape[-1]
    idx = mx.broadcast_to(mx.arange(t, dtype=mx.int32), segments.shape)
    starts = mx.concatenate([mx.ones(segments.shape[:-1] + (1,), mx.bool_),
                             segments[..., 1:] != segments[..., :-1]], axis=-1)
    return idx - mx.cummax(mx.where(starts, idx, 0), axis=-1)


def _rotate_at(x, rope: Rope, sign, positions):
    """The rotation at per-token positions (B, T): angle of pair j at token t is positions[b, t] * scale / freqs[j],
    formed in fp32 (fp64 for fp64 inputs) as the fused kernel does; x is (B, H, T, D)."""
    dt = mx.float64 if x.dtype == mx.float64 else mx.float32
    pos = positions.astype(dt)[:, None, :, None] * rope.scale
    theta = sign * pos / rope.freqs.astype(dt)
    return _apply(x, mx.cos(theta), mx.sin(theta), rope)


def rope_forward(x, rope: Rope, positions=None):
    """positions: (B, T) per-token positions (packed rows), or None for 0..T-1 in every row."""
    if rope.mscale != 1.0:
        x = x.at[..., :rope.dims].multiply(rope.mscale)
    if positions is not None:
        return _rotate_at(x, rope, 1.0, positions)
    if x.dtype == mx.float64:
        return _rotate(x, rope, 1.0)
    return mx.fast.rope(x, rope.dims, traditional=rope.traditional, base=None, scale=rope.scale,
                        offset=0, freqs=rope.freqs)


def rope_backward(dy, rope: Rope, positions=None, offset=0):
    """offset: the position of dy's first token where positions is None (a block of tokens from offset on)."""
    if positions is not None:
        dx = _rotate_at(dy, rope, -1.0, positions)
    elif dy.dtype == mx.float64:
        dx = _rotate(dy, rope, -1.0, offset)
    else:
        dx = mx.fast.rope(dy, rope.dims, traditional=rope.traditional, base=None, scale=rope.scale,
                          offset=offset, freqs=-rope.freqs)
    if rope.mscale != 1.0:
        dx = dx.at[..., :rope.dims].multiply(rope.mscale)
    return dx
