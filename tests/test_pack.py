"""--pack: short rows packed into rows of max_seq_length. The packing keeps every (input, target) pair and mask
once and never predicts across rows; the segment-masked attention and the per-token RoPE have exact backwards
(against MLX autodiff); and a packed batch's whole-model gradient equals the gradient of the same rows as a padded
batch, for every engine."""
import json
import random

import mlx.core as mx
import numpy as np
import pytest

from helpers import EXACT, assert_close, assert_grads_close, mlx_lm_model, rel_err, sft_batch
from mesp_mlx.cursor import DataCursor
from mesp_mlx.data import Dataset, collate, collate_packed, epoch_groups, make_batch, pack_rows
from mesp_mlx.engines import make_engine
from mesp_mlx.io.sources import load_model
from mesp_mlx.lora import LoRAConfig, from_flat
from mesp_mlx.model import logits
from mesp_mlx.objectives import SFT
from mesp_mlx.ops.attention import attention_backward, attention_forward
from mesp_mlx.ops.linear import Compute
from mesp_mlx.ops.rope import rope_backward, rope_forward, rope_spec, segment_positions
from mesp_mlx.train import main
from test_engines import perturbed_lora
from test_train import write_data

R = lambda *s: mx.random.normal(s)


def vjp(fn, primals, cot):
    return mx.vjp(fn, primals, [cot])[1]


def random_dataset(n, longest, seed=0):
    rng = random.Random(seed)
    examples = []
    for _ in range(n):
        length = rng.randint(2, longest)
        examples.append(([rng.randrange(1, 500) for _ in range(length)], rng.randrange(0, length - 1)))
    return Dataset(examples)


# ---------------------------------------------------------------------------------------------------- packing


def test_pack_rows_first_fit():
    bins = pack_rows([5, 3, 9, 2, 7, 1, 10, 12], 10)
    assert bins == [[0, 1, 3], [2, 5], [4], [6], [7]]  # first fit, in order; 12 > 10 stays alone
    assert sorted(i for b in bins for i in b) == list(range(8))


@pytest.mark.parametrize("capacity,batch_size", [(32, 3), (64, 1)])
def test_packed_batches_keep_every_pair_once(capacity, batch_size):
    data = random_dataset(60, 30)
    seen, masked, rows = [], 0.0, 0
    for group in epoch_groups(data, batch_size, seed=1, epoch=0, pack=capacity):
        inputs, targets, mask, segments = [np.array(a) for a in make_batch(data, group, packed=True)]
        assert inputs.shape == segments.shape and inputs.shape[1] <= capacity
        for r, row in enumerate(group):
            rows += 1
            for k, i in enumerate(row):
                ids, start = data.examples[i]
                at = np.nonzero(segments[r] == k)[0]
                assert len(at) == len(ids) - 1 and np.all(np.diff(at) == 1)  # one contiguous run of positions
                # its own pairs: no target is the next row's first token
                assert inputs[r, at].tolist() == ids[:-1] and targets[r, at].tolist() == ids[1:]
                assert mask[r, at].tolist() == [float(t >= max(start - 1, 0)) for t in range(len(ids) - 1)]
                seen.append(i)
            pad = segments[r] == len(row)
            assert not mask[r, pad].any() and np.all(segments[r, ~pad] < len(row))
        masked += mask.sum()
    assert sorted(seen) == list(range(len(data)))
    assert masked == sum(np.array(collate([e])[2]).sum() for e in data.examples)
    total = sum(len(ids) - 1 for ids, _ in data.examples)
    assert rows <= 1.3 * total / capacity + 1  # it packs: within 30% of full rows (first fit on ~16-pair rows)


def test_packing_is_deterministic_and_resumes_exactly():
    data = random_dataset(50, 20, seed=3)
    first = epoch_groups(data, 2, seed=5, epoch=1, pack=40)
    assert first == epoch_groups(data, 2, seed=5, epoch=1, pack=40)
    assert first != epoch_groups(data, 2, seed=5, epoch=2, pack=40)  # each epoch packs another order
    cursor = DataCursor(data, SFT().make_batch, 2, seed=5, pack=40)
    per_epoch = len(epoch_groups(data, 2, 5, 0, 40))
    run = [cursor.next_batch() for _ in range(per_epoch + 3)]  # across an epoch boundary
    for position in (1, per_epoch - 1, per_epoch + 1):
        resumed = DataCursor(data, SFT().make_batch, 2, seed=5, pack=40)
        resumed.seek(position)
        batch, same = resumed.next_batch(), run[position]
        assert batch.segments is not None and all(mx.array_equal(getattr(batch, f), getattr(same, f))
                                                  for f in ("inputs", "targets", "mask", "segments"))
    plain = DataCursor(data, SFT().make_batch, 2, seed=5).next_batch()
    assert plain.segments is None  # unpacked batches have no segments


def test_segment_positions():
    seg = mx.array([[0, 0, 0, 1, 1, 2, 3, 3], [0, 0, 0, 0, 0, 1, 1, 1]])
    assert segment_positions(seg).tolist() == [[0, 1, 2, 0, 1, 0, 0, 1], [0, 1, 2, 3, 4, 0, 1, 2]]


# ------------------------------------------------------------------------------------ ops: RoPE and attention

LONGROPE = {"type": "longrope", "long_factor": [1.0, 1.5, 2.0, 3.0, 5.0, 8.0], "short_factor": [1.0] * 6}
SEGMENTS = mx.array([[0] * 5 + [1] * 3 + [2] * 7 + [3] * 4, [0] * 11 + [1] * 8])  # (2, 19), the 2nd: 1 + padding


@pytest.mark.parametrize("traditional", [False, True])
@pytest.mark.parametrize("dims,scaling", [(16, None), (16, {"rope_type": "linear", "factor": 2.0}),
                                          (12, LONGROPE)])  # partial, with LongRoPE's attention factor
def test_rope_at_positions(traditional, dims, scaling):
    rope = rope_spec(dims, 10000.0, traditional, scaling, 256, 64)
    pos = segment_positions(SEGMENTS)
    mx.random.seed(0)
    x, dy = R(2, 3, 19, 16), R(2, 3, 19, 16)
    # the reference: each packed row rotated on its own by MLX's fused kernel from position 0, as if unpacked
    ref = mx.array(x)
    for b in range(2):
        seg = SEGMENTS[b].tolist()
        for s in set(seg):
            t0, t1 = seg.index(s), len(seg) - seg[::-1].index(s)
            ref[b:b + 1, :, t0:t1] = rope_forward(x[b:b + 1, :, t0:t1], rope)
    y = rope_forward(x, rope, pos)
    assert_close(y, ref, "forward")
    assert_close(rope_backward(dy, rope, pos), vjp(lambda x: rope_forward(x, rope, pos), [x], dy)[0], "backward")
    x64, dy64 = x.astype(mx.float64), dy.astype(mx.float64)
    with mx.stream(mx.cpu):  # fp64 exists on the CPU only; there the backward is exact to rounding
        ref64 = vjp(lambda x: rope_forward(x, rope, pos), [x64], dy64)[0]
        assert rel_err(rope_backward(dy64, rope, pos), ref64) < 1e-12
    # positions 0..T-1 in every row: the same rotation as the fused kernel's
    assert_close(rope_forward(x, rope, mx.broadcast_to(mx.arange(19), (2, 19))), rope_forward(x, rope))


def plain_attention(q, k, v, scale, segments, window=None):
    """The T x T reference, its mask built with numpy: causal, same segment, and inside the window."""
    g = q.shape[1] // k.shape[1]
    k, v = mx.repeat(k, g, axis=1), mx.repeat(v, g, axis=1)
    t = q.shape[2]
    i, j = np.arange(t)[:, None], np.arange(t)[None, :]
    seg = np.array(segments)
    ok = (j <= i)[None] & (seg[:, :, None] == seg[:, None, :])
    if window is not None:
        ok &= (i - j < window)[None]
    s = (q @ k.swapaxes(-1, -2)) * scale + mx.array(np.where(ok, 0.0, -1e9).astype(np.float32))[:, None]
    return mx.softmax(s, axis=-1) @ v


@pytest.mark.parametrize("hq,hkv,chunk,window", [(3, 3, 256, None), (6, 2, 5, None), (4, 1, 4, None),
                                                 (4, 2, 4, 3), (6, 3, 256, 6)])
def test_attention_within_segments(hq, hkv, chunk, window):
    mx.random.seed(1)
    q, k, v, do = R(2, hq, 19, 8), R(2, hkv, 19, 8), R(2, hkv, 19, 8), R(2, hq, 19, 8)
    scale = 8 ** -0.5
    o, lse = attention_forward(q, k, v, scale, chunk, window=window, segments=SEGMENTS)
    ref = plain_attention(q, k, v, scale, SEGMENTS, window)
    assert_close(o, ref, "o")
    grads = attention_backward(do, q, k, v, o, lse, scale, chunk, window=window, segments=SEGMENTS)
    refs = vjp(lambda q, k, v: plain_attention(q, k, v, scale, SEGMENTS, window), [q, k, v], do)
    for g, r, n in zip(grads, refs, "qkv"):
        assert_close(g, r, "d" + n)
    unmasked = attention_forward(q, k, v, scale, chunk, window=window)[0]
    assert float(mx.max(mx.abs(unmasked - ref))) > 1e-2  # the segments are seen


# ------------------------------------------------------------------------------- whole model, every engine


def rows(vocab, seed=0):
    """Four short rows (token ids, loss start), some with a masked prompt."""
    rng = random.Random(seed)
    return [([rng.randrange(vocab) for _ in range(n)], start) for n, start in ((8, 0), (5, 2), (10, 0), (4, 3))]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3_text", "qwen3_5"])
def test_packed_gradient_equals_padded(tmp_path, arch):
    """The rows as one packed batch (two packed rows, one of them with padding, segments across query blocks and
    token blocks) and as a padded batch of four: the same token-weighted loss and the same gradient. The reference
    is the autodiff engine on the padded batch; a packed batch whose segments are dropped must not match it."""
    from builders import write_tiny
    store = load_model(str(write_tiny(tmp_path / arch, arch)))
    params = perturbed_lora(store, LoRAConfig(rank=4))
    ex = rows(store.args.vocab_size)
    padded = sft_batch(*collate(ex))
    arrays = collate_packed([[ex[0], ex[1], ex[3]], [ex[2]]])
    packed = sft_batch(*arrays)
    assert packed.inputs.shape == (2, 14) and padded.inputs.shape == (4, 9)
    ref_loss, ref = make_engine("autodiff", store, 20.0).loss_and_grad(params, padded)
    small = Compute(attn_chunk=5, mlp_chunk=6, vocab_chunk=64, token_chunk=7, delta_chunk=4)
    for method, compute in (("mesp", small), ("mesp", Compute()), ("mebp", small), ("autodiff", Compute())):
        engine = make_engine(method, store, 20.0, compute=compute)
        loss, grads = engine.loss_and_grad(params, packed)
        assert abs(loss["loss"].item() - ref_loss["loss"].item()) <= EXACT * abs(ref_loss["loss"].item()), method
        assert_grads_close(grads, ref)
        assert abs(engine.loss(params, packed)["loss"].item() - ref_loss["loss"].item()) <= EXACT * abs(ref_loss["loss"].item())
    _, crossing = make_engine("mesp", store, 20.0, compute=small).loss_and_grad(params, sft_batch(*arrays[:3]))
    with pytest.raises(AssertionError):
        assert_grads_close(crossing, ref)


# ------------------------------------------------------------------------------------------------------ CLI


def test_cli_trains_packed_and_mlx_lm_loads_adapter(tmp_path, tiny_gguf):
    data = write_data(tmp_path / "data", "chat")
    out = tmp_path / "ad"
    rc = main(["--model", str(tiny_gguf), "--data", str(data), "--pack", "--max-seq-length", "64", "--epochs", "2",
               "--batch-size", "1", "--method", "mesp", "--adapter-path", str(out), "--steps-per-report", "1",
               "--sample-prompt", "", "--rank", "4", "--learning-rate", "1e-2"])
    assert rc == 0
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    train = [l for l in lines if "train_loss" in l]
    # 6 rows of ~15 tokens pack into fewer rows of <= 64: fewer steps per epoch than rows (that a packed step
    # descends as the padded one does is test_packed_gradient_equals_padded's: the same gradient, exactly)
    assert 2 <= len(train) < 2 * 6
    store = load_model(str(tiny_gguf))
    params = from_flat(mx.load(str(out / "adapters.safetensors")))
    scale = json.loads((out / "adapter_config.json").read_text())["lora_parameters"]["scale"]
    ids = mx.array([[5, 17, 42, 99, 3, 250, 7]])
    ours = logits(store, ids, params, scale)
    theirs = mlx_lm_model(store.path, out)(ids)  # same bound as test_train's CLI test: rounding only
    assert rel_err(ours, theirs) <= EXACT, rel_err(ours, theirs)
    assert rel_err(logits(store, ids, None, scale), theirs) > 1e-3  # the adapter trained and is applied


def test_packed_run_resumes_exactly(tmp_path, tiny_gguf):
    """Stopped after 2 packed steps and resumed to 5 (across an epoch boundary: the 10 rows of 19-45 pairs pack into
    8 rows of <= 48, 4 steps an epoch): the same losses and adapter as one uninterrupted run; a resume without
    --pack is refused."""
    from test_train import MORE, train_losses
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("\n".join(json.dumps(r) for r in MORE))
    common = ["--model", str(tiny_gguf), "--data", str(data), "--sample-prompt", "", "--rank", "4", "--pack",
              "--max-seq-length", "48", "--batch-size", "2", "--steps-per-report", "1", "--learning-rate", "1e-2"]
    assert main(common + ["--iters", "5", "--adapter-path", str(tmp_path / "a")]) == 0
    assert main(common + ["--iters", "2", "--adapter-path", str(tmp_path / "b")]) == 0
    assert main(common + ["--iters", "5", "--adapter-path", str(tmp_path / "b"), "--resume"]) == 0
    whole, resumed = train_losses(tmp_path / "a"), train_losses(tmp_path / "b")
    assert len(resumed) == 5 and max(abs(x - y) for x, y in zip(whole, resumed)) <= 1e-6, (whole, resumed)
    a = mx.load(str(tmp_path / "a" / "adapters.safetensors"))
    b = mx.load(str(tmp_path / "b" / "adapters.safetensors"))
    assert all(float(mx.max(mx.abs(a[k] - b[k]))) <= 1e-6 for k in a)
    unpacked = [a for a in common if a != "--pack"]
    assert main(unpacked + ["--iters", "6", "--adapter-path", str(tmp_path / "b"), "--resume"]) == 2


def test_pass_fill_counts_real_tokens_per_micro_batch():
    """Real tokens and padded positions per batch: unpacked, each batch's rows padded to its longest; packed, the
    rows of packed examples (first-fit leaves at most one row half empty)."""
    from mesp_mlx.trainer import pass_fill
    data = random_dataset(40, 20)
    tokens = sum(len(ids) - 1 for ids, _ in data.examples)
    real, padded = pass_fill(data, SFT(), 4, 1, 0, 0)
    assert real == tokens / 10 and padded >= real
    real, padded = pass_fill(data, SFT(), 1, 1, 0, 64)
    bins = len(epoch_groups(data, 1, 0, 0, 64))
    assert real == tokens / bins and bins <= 2 * tokens / 64 + 1


def test_short_rows_say_their_passes_are_short(tmp_path, tiny_gguf, capsys):
    """A run whose batches hold few tokens says so once at the start, with the number and the remedy, and
    metrics.jsonl records the figures; the same rows packed into rows of 256 fill the passes and say nothing."""
    from mesp_mlx.trainer import LOW_TOKENS_PER_PASS
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("\n".join(json.dumps({"text": f"row {i}: the quick brown fox"})
                                                for i in range(60)))
    common = ["--model", str(tiny_gguf), "--data", str(data), "--iters", "1", "--sample-prompt", "",
              "--no-retention", "--rank", "4", "--max-seq-length", "256", "--steps-per-report", "1"]
    first = lambda out: json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert main(common + ["--adapter-path", str(tmp_path / "a")]) == 0
    notes = [line for line in capsys.readouterr().out.splitlines() if "tokens per pass over the weights" in line]
    rec = first(tmp_path / "a")
    assert len(notes) == 1 and "--pack" in notes[0] and "--batch-size" in notes[0], notes
    assert rec["low_tokens_per_pass"] and rec["tokens_per_pass"] < LOW_TOKENS_PER_PASS
    assert f"{rec['tokens_per_pass']:.0f} tokens per pass" in notes[0] and rec["weight_passes_per_step"] == 3
    assert main(common + ["--pack", "--adapter-path", str(tmp_path / "b")]) == 0
    assert "tokens per pass over the weights" not in capsys.readouterr().out
    rec = first(tmp_path / "b")
    assert not rec["low_tokens_per_pass"] and rec["tokens_per_pass"] >= LOW_TOKENS_PER_PASS
