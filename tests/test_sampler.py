"""The key/value-cached generator (sampler.py) against the plain forward: on every tiny family (sliding windows,
NoPE layers, q/k norms, sandwich norms, merged projections, partial RoPE), left-padded prompts of different lengths
give each row the logits its own unpadded sequence gives, at the prompt's end and at every generated token, in
every way of holding the weights; draws are reproducible from their key and stay in the nucleus."""
import mlx.core as mx
import pytest

from helpers import REL_TOL, assert_close
from mesp_mlx.io.sources import load_model
from mesp_mlx.model import logits
from mesp_mlx.ops.block import new_cache
from mesp_mlx.ops.linear import Compute
from mesp_mlx.sampler import Generator, Sampling, pick, weight_holding

PROMPTS = [[5, 17, 42, 99, 3, 25, 7, 12, 60, 2, 9], [11, 4], [8, 8, 1, 30, 44]]


def _cached_logits(gen, prompts, steps, layers=None, head=None):
    """Every row's logits after its prompt and after each of `steps` greedy tokens, through the generator's own
    pieces (its prefill in blocks of 4 columns to cross block ends), and the tokens chosen."""
    width = max(map(len, prompts))
    valid = mx.array([[False] * (width - len(p)) + [True] * len(p) for p in prompts])
    ids = mx.array([[0] * (width - len(p)) + p for p in prompts])
    pos = mx.maximum(mx.cumsum(valid.astype(mx.int32), axis=1) - 1, 0)
    caches = [new_cache(spec, 8) for spec in gen.specs]
    for c0 in range(0, width, 4):
        x = gen._forward(ids[:, c0:c0 + 4], pos[:, c0:c0 + 4], valid[:, :c0 + 4], caches, layers, {}, 20.0)
    out, tokens, nxt = [], [], pos[:, -1] + 1
    for _ in range(steps + 1):
        z = gen.last_logits(x, head)
        out.append(z)
        t = mx.argmax(z, axis=-1)
        tokens.append(t.tolist())
        valid = mx.concatenate([valid, mx.ones((len(prompts), 1), mx.bool_)], axis=1)
        x = gen._forward(t[:, None], nxt[:, None], valid, caches, layers, {}, 20.0)
        nxt = nxt + 1
    return out, tokens


@pytest.mark.parametrize("memory", [None, 1])
def test_cached_logits_equal_the_plain_forward(tiny_dir, memory):
    store = load_model(str(tiny_dir))
    gen = Generator(store, memory=memory)
    assert gen.holding == ("streamed" if memory else "dense" if gen.compute.path == "dequantize" else "stored")
    layers, head = gen.weights()
    steps = 7  # past Gemma's and Mistral's windows (5, 6 keys) for the shortest prompt
    got, tokens = _cached_logits(gen, PROMPTS, steps, layers, head)
    for r, prompt in enumerate(PROMPTS):
        seq = prompt + [t[r] for t in tokens[:steps]]
        ref = logits(store, mx.array([seq]))[0, len(prompt) - 1:]
        for s in range(steps + 1):
            assert_close(got[s][r], ref[s].astype(mx.float32), f"row {r} step {s}")


def test_generate_is_greedy_decoding_of_the_plain_forward(tiny_gguf):
    """Each generated token is an argmax of the plain forward's logits on the sequence so far (to the error model:
    a near-tie may go either way), rows stop at their stop ids, and a caller can finish a row early."""
    store = load_model(str(tiny_gguf))
    gen = Generator(store, Compute(matmul="quantized"))
    out = gen.generate(PROMPTS, sampling=Sampling(max_tokens=6))
    for prompt, c in zip(PROMPTS, out):
        assert len(c.tokens) == 6 and c.stop is None
        z = logits(store, mx.array([prompt + c.tokens]))[0, len(prompt) - 1:-1]
        best = mx.max(z, axis=-1)
        chosen = mx.take_along_axis(z, mx.array(c.tokens)[:, None], axis=-1)[:, 0]
        assert float(mx.max(best - chosen)) <= REL_TOL * float(mx.max(mx.abs(z)))
    stop = out[1].tokens[2]
    again = gen.generate(PROMPTS, sampling=Sampling(max_tokens=6), stops=[stop],
                         finished=lambda i, toks: i == 0 and len(toks) == 3)
    assert again[1].tokens == out[1].tokens[:2] and again[1].stop == stop
    assert again[0].tokens == out[0].tokens[:3] and again[0].stop is None
    cut = out[2].tokens.index(stop) if stop in out[2].tokens else 6
    assert again[2].tokens == out[2].tokens[:cut]


def test_draws_are_reproducible_and_stay_in_the_nucleus():
    z = mx.log(mx.array([[0.5, 0.3, 0.15, 0.05]] * 4000))
    a = pick(z, 1.0, 0.7, mx.random.key(3))
    assert a.tolist() == pick(z, 1.0, 0.7, mx.random.key(3)).tolist()
    counts = [a.tolist().count(t) for t in range(4)]
    assert counts[2] == counts[3] == 0  # 0.5 + 0.3 reaches 0.7: the rest never drawn
    assert abs(counts[0] / 4000 - 0.5 / 0.8) < 0.04  # renormalised within the nucleus (4 sigma ~ 0.03)
    full = pick(z, 1.0, 1.0, mx.random.key(4)).tolist()
    assert all(full.count(t) for t in range(4))
    assert pick(z[:1] * 0 + mx.array([[0.0, 2.0, 2.0, 1.0]]), 0.0).tolist() == [1]  # first of equal maxima


def test_weights_are_held_as_memory_allows(tiny_gguf):
    store = load_model(str(tiny_gguf))
    args = store.args
    dense = args.num_hidden_layers * sum(i * o for i, o in args.projection_shapes().values()) * 4
    cpu = Compute(matmul="dequantize")
    assert weight_holding(store, cpu, dense) == "dense"
    assert weight_holding(store, cpu, dense - 1) == ("stored" if store.num_layers * store.layer_bytes() < dense
                                                     else "streamed")
    assert weight_holding(store, Compute(matmul="quantized"), dense) == "stored"
    assert weight_holding(store, cpu, 0) == "streamed"
