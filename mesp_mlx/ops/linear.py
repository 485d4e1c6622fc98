"""Products with a frozen, possibly quantized, weight: the one place that knows how to multiply by the base model.

On Metal and CUDA `mx.quantized_matmul` is the fast kernel; on the CPU it is a slow loop, and dequantizing into a
transient fp32 matrix followed by a BLAS GEMM is ~20x faster (docs/platform.md). `Compute.path` picks per device and
`Compute(matmul=...)` overrides it. The dequantized copy lives only for one product (or one block, `prepared`).
GGML blocks that no affine group represents (ops/ggml.py) have no quantized kernel: both paths dequantize them.
"""
from dataclasses import dataclass, replace
from typing import NamedTuple, Optional

import mlx.core as mx

from .ggml import dequantize_packed

MATMUL_PATHS = ("auto", "quantized", "dequantize")
DTYPES = ("float32", "bfloat16", "float16", "float64")
SYNCS = ("auto", "chunk", "block")
COMPILES = ("auto", "on", "off")
FILL_BYTES = 8 << 20  # one row block of an affine weight's dense copy, dequantized at a time (dense_for)
TILE_BYTES = 64 << 20  # one fp32 tile of an automatic query block or head tile (Compute.query_block, head_tile)


@dataclass(frozen=True)
class Compute:
    """How a run's math is carried out, decided once (flags, the memory planner) and handed to every op that needs
    it; no op reads a global, so two configurations can live in one process.
        dtype          activations and dequantized weights: float32; bfloat16/float16 (fast on Metal); float64
                       (CPU only: the exactness checks of real models)
        matmul         products with the frozen base: auto (dequantize + BLAS on the CPU, quantized kernels on GPUs),
                       quantized, dequantize
        attn_chunk     queries per attention block: bounds the B*H*chunk*T score tiles; 0 (auto): 256 where chunks
                       are evaluated one at a time (the CPU), and where a block is one graph (GPUs) as many as
                       keep one fp32 score tile within 64 MiB, at least 256 (`query_block`): one block at T=1024
                       on the 0.5B-3B shapes, so a query block's ~20 kernels are not paid T/256 times
        mlp_chunk      tokens per MLP block: bounds its T x f temporaries
        delta_chunk    tokens per chunk of the gated delta rule (Qwen3.5's linear attention, ops/gated_delta.py): 64,
                       the fastest of 32 / 64 / 128 on the CPU at the 4B shape (tools/bench_gated_delta.py)
        token_chunk, vocab_chunk   tiles of the chunked loss: never B*T*V logits; vocab_chunk 0 (auto): 512 x 4096
                       where chunks are evaluated one at a time (the CPU), and where a tile is one graph (GPUs)
                       up to 4096 tokens and as many rows as keep the fp32 tile within 64 MiB, at least 4096
                       (`head_tile`): Qwen2.5's 151,936-row head in 3 tiles at T=256 instead of 38, each ~9 kernels
                       and a host sync
        share_dequant  on the dequantize path, dequantize each block weight once for its recompute and backward
        dequant_rows   output rows per block of a product with GGML blocks kept packed (ops/ggml.py), 0 for the whole
                       weight at once: x @ W^T is computed as [x @ W[r0:r1]^T for each row block] concatenated and
                       g @ W as the sum over row blocks of g[:, r0:r1] @ W[r0:r1], so a product's dequantization
                       temporaries and dense copy are those of dequant_rows rows (the memory planner sets it where
                       a whole weight's would not fit; with sync="chunk" each block is evaluated as it goes)
        mlp_rows       output rows per dequantized block of the MLP's products on the dequantize path, for every
                       quantized weight (affine ones too; 0: whole matrices), and of the other products that run
                       mlp_chunk tokens at a time (the mixer's projections' backward where chunks are evaluated one at a
                       time: ops/block.py), so their row blocks' partial results stay small, while a whole matrix
                       dequantized holds about twice its dense fp32 copy (measured on the CPU at Qwen3.5-4B's shape: 198
                       MB for one 9216 x 2560 matrix); the memory planner's lean plans set it (`for_mlp`)
        row_affine     whether dequant_rows row-blocks affine weights too (set by `for_mlp` only)
        recompute_mlp  keep only the MLP's input and recompute its gate/up outputs one token block at a time in the
                       backward (two more products per block; 2 B*T*f fewer saved floats, the largest saved item
                       at long T): the memory planner's lean plans turn it on
        sync           where a block waits for its work: "chunk" evaluates every attention query block and MLP
                       token block as it goes (one chunk's temporaries alive at a time); "block" builds the block's
                       forward or backward as one graph and evaluates it once (each evaluation is a host sync that
                       idles a GPU); auto: chunk on the CPU, block on GPUs
        compile        whether the engines run each block's forward, recompute and backward, and the head's tiles,
                       as `mx.compile`d functions (one trace per block shape; the streamed weights are inputs, so
                       one trace serves every layer of a shape), which fuses their element-wise chains into single
                       kernels: far fewer kernel launches on GPUs. A compiled body cannot sync inside, so "on"
                       implies block sync (and refuses sync="chunk"); auto: on exactly when the block is evaluated
                       as one graph (GPUs, or sync="block"), off where chunks are evaluated one at a time (the
                       CPU's default, memory plans)"""

    dtype: mx.Dtype = mx.float32
    matmul: str = "auto"
    attn_chunk: int = 0
    mlp_chunk: int = 1024
    delta_chunk: int = 64
    token_chunk: int = 512
    vocab_chunk: int = 0
    share_dequant: bool = True
    dequant_rows: int = 0
    mlp_rows: int = 0
    row_affine: bool = False
    sync: str = "auto"
    recompute_mlp: bool = False
    compile: str = "auto"

    def __post_init__(self):
        if isinstance(self.dtype, str):
            if self.dtype not in DTYPES:
                raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
            object.__setattr__(self, "dtype", getattr(mx, self.dtype))
        if self.matmul not in MATMUL_PATHS:
            raise ValueError(f"matmul path must be one of {', '.join(MATMUL_PATHS)}, got {self.matmul!r}")
        if self.sync not in SYNCS:
            raise ValueError(f"sync must be one of {', '.join(SYNCS)}, got {self.sync!r}")
        if self.compile not in COMPILES:
            raise ValueError(f"compile must be one of {', '.join(COMPILES)}, got {self.compile!r}")
        for name in ("dequant_rows", "mlp_rows"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.compile == "on" and self.sync == "chunk":
            raise ValueError("compile='on' evaluates each block as one graph; it cannot be combined with sync='chunk'")

    @property
    def path(self):
        """The matmul path on the current default device."""
        if self.matmul != "auto":
            return self.matmul
        return "dequantize" if mx.default_device() == mx.cpu else "quantized"

    @property
    def sync_chunks(self):
        """Whether ops evaluate chunk by chunk inside a block (see sync)."""
        if self.sync != "auto":
            return self.sync == "chunk"
        return self.compile != "on" and mx.default_device() == mx.cpu

    @property
    def compiled(self):
        """Whether block bodies run as compiled functions (see compile)."""
        return self.compile == "on" or self.compile == "auto" and not self.sync_chunks

    def for_mlp(self):
        """The compute of the MLP's products (see mlp_rows)."""
        if not self.mlp_rows or self.path != "dequantize":
            return self
        rows = min(r for r in (self.dequant_rows, self.mlp_rows) if r)
        return replace(self, dequant_rows=rows, row_affine=True)

    def query_block(self, batch, heads, seq_len):
        """Queries per attention block for `heads` query heads over seq_len keys (see attn_chunk)."""
        if self.attn_chunk:
            return min(self.attn_chunk, seq_len)
        if self.sync_chunks:
            return min(256, seq_len)
        return min(seq_len, max(256, TILE_BYTES // (4 * batch * heads * seq_len)))

    def delta_group(self, batch, v_heads, rep, seq_len, width):
        """Value heads per evaluated group of the gated delta rule (ops/gated_delta.py): where chunks are evaluated
        one at a time (the CPU), as many as keep ~30 per-token arrays of `width` floats per head within a tile
        (a multiple of rep, the value heads per key head; measured on the CPU at Qwen3.5-4B's shape, T=2048:
        2 heads per group hold 259 MB in the backward against 644 MB for 16, and run faster); elsewhere all heads
        in one graph (0)."""
        if not self.sync_chunks:
            return 0
        fit = TILE_BYTES // (30 * batch * max(seq_len, 1) * width * 4)
        return min(v_heads, max(rep, fit // rep * rep))

    def head_tile(self, tokens, head, width):
        """(tokens, rows) per tile of the chunked loss over `tokens` positions of a head (a `Frozen` or the store's
        rows: out_dims, affine) of `width` columns (see vocab_chunk). Where the products read a chunk's rows as a
        dense copy (dequantized or cast), that copy is held within the tile size too."""
        if self.vocab_chunk or self.sync_chunks:
            return min(self.token_chunk, tokens), min(self.vocab_chunk or 4096, head.out_dims)
        tc = min(tokens, max(self.token_chunk, TILE_BYTES // (4 * 4096)))
        dense_row = 0 if head.affine and self.path == "quantized" else width
        return tc, min(head.out_dims, max(4096, TILE_BYTES // (4 * max(tc, dense_row))))


DEFAULT = Compute()


class Frozen(NamedTuple):
    """A frozen (out x in) weight, quantized (affine, with scales/biases; or GGML blocks kept packed, one uint8 row
    per weight row, `ggml` naming their type) or dense, plus an optional bias."""

    weight: mx.array
    scales: Optional[mx.array] = None
    biases: Optional[mx.array] = None
    bias: Optional[mx.array] = None
    group_size: int = 64
    bits: int = 4
    ggml: Optional[str] = None

    @property
    def quantized(self):
        return self.scales is not None or self.ggml is not None

    @property
    def affine(self):
        """Whether quantized products read it packed (MLX's affine format)."""
        return self.scales is not None

    @property
    def out_dims(self):
        return self.weight.shape[0]

    def rows(self, start, stop):
        """Rows [start, stop) of the weight (output units), still quantized: groups run along the input dim."""
        sl = lambda a: None if a is None else a[start:stop]
        return Frozen(sl(self.weight), sl(self.scales), sl(self.biases), sl(self.bias), self.group_size, self.bits,
                      self.ggml)


def accum_dtype(dtype):
    """At least fp32 for softmax and loss sums."""
    return mx.float64 if dtype == mx.float64 else mx.float32


def dense(w: Frozen, dtype=mx.float32):
    """The weight as a (out x in) matrix in `dtype`."""
    if w.ggml is not None:
        return dequantize_packed(w.weight, w.ggml, dtype)
    if w.quantized:
        # fp32 scales: dequantizing with fp16 scales would round every weight to fp16 first
        return mx.dequantize(w.weight, w.scales.astype(dtype), w.biases.astype(dtype),
                             group_size=w.group_size, bits=w.bits)
    return w.weight.astype(dtype)


def dense_for(w: Frozen, compute: Compute = DEFAULT):
    """dense(w, compute.dtype) for a product. Where chunks are evaluated one at a time (the CPU), an affine weight
    is dequantized into its copy FILL_BYTES of rows at a time, each block evaluated as it goes: MLX's CPU
    dequantize holds a temporary as large as its result (measured at 9216 x 2560: 189 MB for the 94 MB copy whole,
    105 MB filled by 512-row blocks)."""
    rows = FILL_BYTES // max(1, w.scales.shape[1] * w.group_size * compute.dtype.size) if w.affine else 0
    if not (compute.sync_chunks and w.affine and 0 < rows < w.out_dims):
        return dense(w, compute.dtype)
    out = mx.zeros((w.out_dims, w.scales.shape[1] * w.group_size), compute.dtype)
    for r0 in range(0, w.out_dims, rows):
        out[r0:r0 + rows] = dense(w.rows(r0, r0 + rows), compute.dtype)
        mx.eval(out)
    return out


def prepared(w: Frozen, compute: Compute = DEFAULT):
    """w in the form the products use: on the dequantize path one dense copy that several products can share."""
    if w.quantized and compute.path == "dequantize":
        return Frozen(dense_for(w, compute), bias=w.bias)
    return w


def cast_scales(ws, dtype):
    """A block's weights ({name: Frozen or array}) with every affine weight's scales and biases in `dtype`, cast as
    one concatenated array: a quantized product casts them to its input's type itself, two kernels per weight and
    product; this is one concatenation and one cast for the whole block (the items are views of it)."""
    items = [(k, f, getattr(w, f)) for k, w in sorted(ws.items())
             if isinstance(w, Frozen) and w.scales is not None and w.scales.dtype != dtype
             for f in ("scales", "biases") if getattr(w, f) is not None]
    if len(items) < 2:
        return ws
    flat = mx.concatenate([v.reshape(-1) for _, _, v in items]).astype(dtype)
    out, at = dict(ws), 0
    for k, f, v in items:
        out[k] = out[k]._replace(**{f: flat[at:at + v.size].reshape(v.shape)})
        at += v.size
    return out


def row_blocks(w: Frozen, compute: Compute = DEFAULT):
    """[(r0, r1)] output-row blocks of compute.dequant_rows rows for a product with packed GGML blocks (or affine
    blocks, with row_affine), or None when the weight is dequantized whole (dense weights, affine ones without
    row_affine, dequant_rows 0, or no more rows than that)."""
    r = compute.dequant_rows
    if not (w.ggml is not None or w.affine and compute.row_affine) or not r or w.out_dims <= r:
        return None
    return [(r0, min(r0 + r, w.out_dims)) for r0 in range(0, w.out_dims, r)]


def frozen_matmul(x, w: Frozen, compute: Compute = DEFAULT):
    """x @ W^T (+ bias): the forward product. Packed GGML weights with `row_blocks`: output columns r0:r1 are
    x @ W[r0:r1]^T, the same dot products as the whole product's (one dequantized row block alive at a time)."""
    blocks = row_blocks(w, compute)
    if w.scales is not None and compute.path == "quantized":
        y = mx.quantized_matmul(x, w.weight, w.scales, w.biases, transpose=True,
                                group_size=w.group_size, bits=w.bits).astype(x.dtype)
    elif blocks:
        parts = []
        for r0, r1 in blocks:
            parts.append(x @ dense(w.rows(r0, r1), compute.dtype).T)
            if compute.sync_chunks:
                mx.eval(parts[-1])
        y = mx.concatenate(parts, axis=-1)
    else:
        y = x @ dense_for(w, compute).T
    if w.bias is not None:
        y = y + w.bias.astype(y.dtype)
    return y


def frozen_matmul_t(g, w: Frozen, compute: Compute = DEFAULT):
    """g @ W: the product that carries a gradient back through the frozen weight. Packed GGML weights with
    `row_blocks`: sum over row blocks of g[:, r0:r1] @ W[r0:r1], accumulated in at least fp32 (accum_dtype) and
    cast once: the whole product's sums over rows, split into partial sums (equal to it to rounding)."""
    if w.scales is not None and compute.path == "quantized":
        return mx.quantized_matmul(g, w.weight, w.scales, w.biases, transpose=False,
                                   group_size=w.group_size, bits=w.bits).astype(g.dtype)
    blocks = row_blocks(w, compute)
    if not blocks:
        return g @ dense_for(w, compute)
    acc = None
    for r0, r1 in blocks:
        part = (g[..., r0:r1] @ dense(w.rows(r0, r1), compute.dtype)).astype(accum_dtype(g.dtype))
        acc = part if acc is None else acc + part
        if compute.sync_chunks:
            mx.eval(acc)
    return acc.astype(g.dtype)


def embedding_rows(table: Frozen, ids, dtype=mx.float32):
    """Rows of an embedding table for token ids, dequantizing only the rows gathered; a table of no more rows than
    ids (the distinct rows the store read) is dequantized first and its dense rows gathered: one gather, not three."""
    if table.weight.shape[0] <= ids.size:
        return dense(table, dtype)[ids]
    if table.ggml is not None:
        return dequantize_packed(table.weight[ids], table.ggml, dtype)
    if table.quantized:
        return mx.dequantize(table.weight[ids], table.scales[ids].astype(dtype),
                             table.biases[ids].astype(dtype), group_size=table.group_size, bits=table.bits)
    return table.weight[ids].astype(dtype)
