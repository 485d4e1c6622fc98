"""The gated delta rule (Gated DeltaNet linear attention, Qwen3.5's three layers in four): a chunked forward and
its hand-derived backward. Filled in below."""
from dataclasses import dataclass


@dataclass(frozen=True)
class DeltaSpec:
    """The linear-attention mixer of a block: Hk key heads of Dk features (q and k), Hv value heads of Dv features
    (Hv a multiple of Hk; value head h reads key head h // (Hv / Hk)), a causal depthwise conv of `conv_kernel`
    taps over [q | k | v], and the chunk length of the chunked forward/backward."""
    n_k_heads: int
    n_v_heads: int
    k_dim: int
    v_dim: int
    conv_kernel: int = 4
    chunk: int = 64

    @property
    def conv_dim(self):
        return 2 * self.n_k_heads * self.k_dim + self.n_v_heads * self.v_dim
