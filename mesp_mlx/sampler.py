"""Generation with a key/value cache, several answers as one batch: samples during training (GRPO's groups, the
before / after sample), the retention check's greedy answers.

Prompts of different lengths are left-padded to one width: a row's tokens keep their positions (counted from its
first real token), and padding is masked out of every key set (ops/block.KVCache). The prompt is read in blocks of
`prefill` columns (attention scores of one block at a time, as in training), then one token per step for every
row still going. A row leaves the batch when it emits one of the stop ids, reaches `max_tokens`, or when the caller's
`finished(row, tokens)` says so; the rows left continue without it (its cache rows are dropped).

The next token is the argmax of the last position's logits at temperature 0 (the first of equal maxima), else drawn
from softmax(logits / temperature) restricted to the smallest set of most likely tokens whose probability reaches
top_p. Draws use the caller's key, folded with the step: the same key gives the same samples.

Weights, chosen by what `memory` (bytes) allows them to hold for the generation:
    dense      on the dequantize path (the CPU), every block dequantized once and held: a step is BLAS products only
               (measured on SmolLM2-135M, 4 rows: 0.13 s a step against 0.46 s dequantizing at every step and 0.35 s
               with MLX's quantized CPU kernel, whose cost also grows with the rows; BENCHMARKS.md)
    stored     the store's own (quantized) blocks read once and held: what GPUs multiply directly
    streamed   each block read from the store at each step, as training reads them, when memory is tight
"""
import os
import time
from dataclasses import dataclass

import mlx.core as mx

from .ops.block import block_forward, new_cache
from .ops.linear import DEFAULT, Frozen, frozen_matmul, prepared
from .ops.rmsnorm import rmsnorm_forward


@dataclass(frozen=True)
class Sampling:
    max_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0


@dataclass
class Completion:
    """A generated answer: its tokens (without the stop id) and the stop id it ended on (None: it ran out of
    tokens or the caller finished it)."""
    tokens: list
    stop: int = None


def pick(logits, temperature=0.0, top_p=1.0, key=None):
    """(B, V) logits -> (B,) next tokens: argmax at temperature 0, else a draw from the nucleus (module docstring)."""
    if temperature <= 0:
        return mx.argmax(logits, axis=-1)
    z = logits.astype(mx.float32) / temperature
    if top_p < 1.0:
        order = mx.argsort(-z, axis=-1)
        ranked = mx.take_along_axis(z, order, axis=-1)
        p = mx.softmax(ranked, axis=-1)
        before = mx.cumsum(p, axis=-1) - p  # the probability of the tokens ranked above each one
        ranked = mx.where(before < top_p, ranked, -mx.inf)  # the most likely token always stays
        choice = mx.random.categorical(ranked, key=key)
        return mx.take_along_axis(order, choice[:, None], axis=-1)[:, 0]
    return mx.random.categorical(z, key=key)


def machine_bytes():
    """The machine's physical memory (0 where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def weight_holding(store, compute, memory):
    """"dense", "stored" or "streamed" (module docstring) for weights that may hold `memory` bytes."""
    n = store.num_layers
    args = store.args
    dense = sum(i * o for k in range(n) for i, o in args.projection_shapes(k).values()) * compute.dtype.size
    if compute.path == "dequantize" and dense <= memory:
        return "dense"
    return "stored" if n * store.layer_bytes() <= memory else "streamed"


class Generator:
    """A store's generator. memory: bytes its weights may hold (None: a quarter of the machine's memory)."""

    def __init__(self, store, compute=DEFAULT, memory=None, prefill=256):
        self.store, self.compute, self.prefill = store, compute, prefill
        self.specs = store.args.block_specs(compute)
        self.holding = weight_holding(store, compute, machine_bytes() // 4 if memory is None else memory)
        self.last = {}

    def weights(self):
        """(every block's weights, the head) as this generation holds them; (None, None) when streamed."""
        if self.holding == "streamed":
            return None, None
        layers, head = [self.store.layer(i) for i in range(self.store.num_layers)], self.store.head()
        if self.holding == "dense":
            layers = [{k: prepared(v, self.compute) if isinstance(v, Frozen) else v for k, v in w.items()}
                      for w in layers]
            head = prepared(head, self.compute)
            for w in layers + [head]:
                mx.eval(w)  # one block's packed weights and its dense copy at a time
        return layers, head

    def last_logits(self, x, held=None):
        """(B, d) final hidden states -> (B, V) fp32 logits: with the head held, one product; else the head read
        in vocabulary chunks."""
        a = self.store.args
        h = rmsnorm_forward(x, self.store.final_norm(), a.rms_norm_eps, a.norm_offset)
        if held is not None:
            return frozen_matmul(h, held, self.compute).astype(mx.float32)
        head = self.store.head_rows()
        chunk = self.compute.head_tile(h.shape[0], head, h.shape[-1])[1]
        parts = [frozen_matmul(h, prepared(head.rows(v0, min(v0 + chunk, head.out_dims)), self.compute),
                               self.compute).astype(mx.float32) for v0 in range(0, head.out_dims, chunk)]
        return mx.concatenate(parts, axis=-1) if len(parts) > 1 else parts[0]

    def _forward(self, ids, positions, valid, caches, layers, lora, scale):
        """The new tokens ids (B, t) through every block -> their last position's hidden state (B, d)."""
        x = self.store.embed(ids, self.specs[0].compute.dtype)
        for i, cache in enumerate(caches):
            w = layers[i] if layers is not None else self.store.layer(i)
            x = block_forward(x, w, lora.get(i, {}), scale, self.specs[i], positions=positions, cache=cache,
                              valid=valid)
            if layers is None:
                mx.eval(x)  # one block's weights alive at a time
        return x[:, -1]

    def generate(self, prompts, lora=None, scale=20.0, sampling=Sampling(), stops=(), key=None, finished=None):
        """prompts: lists of token ids -> one `Completion` per prompt. What it cost is left in `last`: {"seconds",
        "peak_bytes"}, MLX's peak during the generation (its counter is reset at the start: a caller that reports a
        run's peak keeps its own maximum, as report.Reporter does)."""
        if not prompts or not all(prompts):
            raise ValueError("generate: every prompt needs at least one token")
        t0 = time.perf_counter()
        mx.reset_peak_memory()
        out = self._generate(prompts, lora or {}, scale, sampling, set(stops), key, finished)
        self.last = {"seconds": time.perf_counter() - t0, "peak_bytes": mx.get_peak_memory()}
        return out

    def _generate(self, prompts, lora, scale, sampling, stops, key, finished):
        layers, head = self.weights()
        width = max(len(p) for p in prompts)
        valid = mx.array([[False] * (width - len(p)) + [True] * len(p) for p in prompts])
        ids = mx.array([[0] * (width - len(p)) + list(p) for p in prompts])
        positions = mx.maximum(mx.cumsum(valid.astype(mx.int32), axis=1) - 1, 0)
        caches = [new_cache(spec, width + sampling.max_tokens) for spec in self.specs]  # exact-size buffers
        for c0 in range(0, width, self.prefill):
            c1 = min(width, c0 + self.prefill)
            x = self._forward(ids[:, c0:c1], positions[:, c0:c1], valid[:, :c1], caches, layers, lora, scale)
            mx.eval(x, *[c.arrays() for c in caches])
        nxt_pos = positions[:, -1] + 1
        out = [Completion([]) for _ in prompts]
        live = list(range(len(prompts)))  # prompt index of each batch row
        keys = None if key is None or sampling.temperature <= 0 else mx.random.split(key, sampling.max_tokens)
        for step in range(sampling.max_tokens):
            step_key = None if keys is None else keys[step]
            tokens = pick(self.last_logits(x, head), sampling.temperature, sampling.top_p, step_key).tolist()
            keep = []
            for r, t in enumerate(tokens):
                done = out[live[r]]
                if t in stops:
                    done.stop = t
                    continue
                done.tokens.append(t)
                if len(done.tokens) < sampling.max_tokens and not (finished and finished(live[r], done.tokens)):
                    keep.append(r)
            if not keep:
                break
            if len(keep) < len(live):
                rows = mx.array(keep)
                for c in caches:
                    c.select(rows)
                valid, nxt_pos = valid[rows], nxt_pos[rows]
                live, tokens = [live[r] for r in keep], [tokens[r] for r in keep]
            valid = mx.concatenate([valid, mx.ones((len(live), 1), mx.bool_)], axis=1)
            x = self._forward(mx.array(tokens)[:, None], nxt_pos[:, None], valid, caches, layers, lora, scale)
            nxt_pos = nxt_pos + 1
            mx.eval(x)
        return out
