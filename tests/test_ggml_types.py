"""Every GGML type we keep, bit for bit: a tiny GGUF per type with random block bytes (every byte pattern is a valid
block; the fp16 scale fields are set to finite values so that inf * 0 cannot differ between two exact orders), read
into our store, whose weights must equal `gguf.quants.dequantize` exactly on the dequantize path, and whose products
on the quantized path must equal the product with that reference."""
import dataclasses
import json

import mlx.core as mx
import numpy as np
import pytest

from helpers import EXACT, ON_GPU, sft_batch, step_extra_memory
from mesp_mlx.errors import SourceError
from mesp_mlx.io.ggml_types import TYPES
from mesp_mlx.io.sources import load_model
from mesp_mlx.ops.linear import Compute, dense, embedding_rows, frozen_matmul, frozen_matmul_t

GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}

QUANTIZED = sorted(k for k, t in TYPES.items() if t.how != "dense")


def random_blocks(type_name, rows, cols, seed=0, exponents=(-4, 1)):
    """(rows, row bytes) of random blocks whose fp16 fields are finite, of either sign, over a wide range (normals
    times 10 ** uniform(exponents))."""
    spec = TYPES[type_name]
    rng = np.random.default_rng(seed)
    n = rows * cols // spec.block_size
    raw = rng.integers(0, 256, (n, spec.block_bytes), dtype=np.uint8)
    for off in spec.f16_fields:
        vals = (rng.standard_normal(n) * 10.0 ** rng.uniform(*exponents, n)).astype(np.float16)
        raw[:, off:off + 2] = vals.view(np.uint8).reshape(n, 2)
    return raw.reshape(rows, -1)


def write_gguf(path, tensors):
    """A GGUF holding raw tensors {name: (type name, (rows, cols), bytes)} (no model around them)."""
    import gguf
    w = gguf.GGUFWriter(str(path), "llama")
    for name, (type_name, shape, raw) in tensors.items():
        w.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=gguf.GGMLQuantizationType[type_name])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def reference(raw, type_name):
    import gguf
    return gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[type_name]).astype(np.float32)


@pytest.mark.parametrize("type_name", QUANTIZED)
def test_type_is_kept_bit_for_bit(tmp_path, type_name):
    from mesp_mlx.io.gguf import open_gguf, read_tensor
    rows, cols = 6, 512
    raw = random_blocks(type_name, rows, cols)
    f = tmp_path / "t.gguf"
    write_gguf(f, {"blk.0.ffn_up.weight": (type_name, (rows, cols), raw)})
    t = open_gguf(f).tensors[0]
    arrays, quant = read_tensor(t, f)
    ref = reference(raw, type_name)
    assert ref.shape == (rows, cols) and np.isfinite(ref).all()
    from mesp_mlx.ops.linear import Frozen
    if TYPES[type_name].how == "affine":
        assert quant == (32, TYPES[type_name].bits)
        w = Frozen(arrays["weight"], arrays["scales"], arrays["biases"], group_size=32, bits=quant[1])
    else:
        assert quant == type_name and arrays["weight"].dtype == mx.uint8
        w = Frozen(arrays["weight"], ggml=type_name)
    np.testing.assert_array_equal(np.array(dense(w)), ref)                   # the dequantize path
    np.testing.assert_array_equal(np.array(embedding_rows(w, mx.array([4, 1, 4]))), ref[[4, 1, 4]])
    np.testing.assert_array_equal(np.array(dense(w.rows(2, 5))), ref[2:5])
    # the quantized path: MLX's kernel on our packing equals the product with the reference weights up to the
    # summation order (EXACT: fp32 roundoff on the CPU, TF32-like products on GPUs; helpers.py)
    x = mx.array(np.random.default_rng(1).standard_normal((3, cols)).astype(np.float32))
    g = mx.array(np.random.default_rng(2).standard_normal((3, rows)).astype(np.float32))
    r = mx.array(ref)
    q = Compute(matmul="quantized")
    y, yt = frozen_matmul(x, w, q), frozen_matmul_t(g, w, q)
    tol = lambda a, b: float(mx.max(mx.abs(a - b))) / float(mx.max(mx.abs(b)))
    assert tol(y, x @ r.T) < EXACT and tol(yt, g @ r) < EXACT
    if TYPES[type_name].how == "affine" and not ON_GPU:  # the kernel reads our bits as the dequantizer does
        scales = arrays["scales"].astype(mx.float32)
        one_hot = mx.eye(cols)
        cols_ref = mx.quantized_matmul(one_hot, w.weight, scales, w.biases.astype(mx.float32), transpose=True,
                                       group_size=32, bits=quant[1])
        np.testing.assert_array_equal(np.array(cols_ref).T, ref)


def test_scales_stay_fp16_where_exact(tmp_path):
    """Q8_0 with small scales keeps fp16 scales (as mlx-lm's); Q4_K's d * sc needs fp32."""
    from mesp_mlx.io.ggml_types import convert
    raw = random_blocks("Q8_0", 4, 64)
    d = np.full(raw.reshape(-1, 34).shape[0], 0.01, np.float16)
    raw.reshape(-1, 34)[:, :2] = d.view(np.uint8).reshape(-1, 2)
    arrays, _ = convert(raw, "Q8_0", [4, 64], "x")
    assert arrays["scales"].dtype == np.float16
    arrays, _ = convert(random_blocks("Q4_K", 4, 256), "Q4_K", [4, 256], "x")
    assert arrays["scales"].dtype == np.float32


MIXED = ["Q4_K", "Q5_0", "Q6_K", "Q8_0", "Q3_K", "Q2_K", "IQ4_NL", "IQ4_XS", "Q5_K", "Q4_0", "Q5_1", "Q4_1"]


def write_mixed_gguf(tmp_path, kinds=MIXED, pre=None, **overrides):
    """The tiny qwen2 model as a GGUF whose matrices (rows of whole 256-blocks) take the types `kinds` in turn, with
    random blocks whose scales keep the weights below ~1 (a model that computes finite losses): (path, {tensor
    name: (type, shape, bytes)}, {tensor name: reference weights})."""
    from builders import write_tiny_gguf
    import gguf
    f = tmp_path / "m.gguf"
    write_tiny_gguf(f, "qwen2", "F32", **dict(dict(hidden_size=256, intermediate_size=256, num_attention_heads=8,
                                                   num_key_value_heads=2), **overrides))
    reader = gguf.GGUFReader(str(f))
    out, want, k = {}, {}, 0
    for t in reader.tensors:
        shape = tuple(int(s) for s in reversed(t.shape))
        if len(shape) == 2 and shape[1] % 256 == 0:
            kind = kinds[k % len(kinds)]
            k += 1
            raw = random_blocks(kind, *shape, seed=k, exponents=(-4, -2.5))
            out[t.name] = (kind, shape, raw)
            want[t.name] = reference(raw, kind)
        else:
            arr = np.asarray(t.data).astype(np.float32).reshape(shape)
            out[t.name] = ("F32", shape, arr)
            want[t.name] = arr
    g = tmp_path / "mixed.gguf"
    w = gguf.GGUFWriter(str(g), "qwen2")
    for field in reader.fields.values():
        if field.name.startswith(("GGUF.", "general.architecture")):
            continue
        vtype = field.types[0]
        value = pre if field.name == "tokenizer.ggml.pre" and pre else field.contents()
        w.add_key_value(field.name, value, vtype,
                        sub_type=field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None)
    for name, (kind, shape, raw) in out.items():
        if kind == "F32":
            w.add_tensor(name, raw)
        else:
            w.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=gguf.GGMLQuantizationType[kind])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return g, out, want


def test_store_keeps_each_type_and_reads_back(tmp_path):
    """A whole tiny model whose projections mix the types of a Q4_K_M file (and the packed ones): its store's
    weights equal the reference, block by block and through the embedding and head, and its config says which."""
    g, out, want = write_mixed_gguf(tmp_path)
    store = load_model(str(g), quantize=None)
    config = json.loads((store.path / "config.json").read_text())
    from mesp_mlx.io.gguf import hf_name
    from mesp_mlx.models import GGUF_ARCHITECTURES
    q = config["quantization"]
    for name, (kind, _, _) in out.items():
        module = hf_name(name, GGUF_ARCHITECTURES["qwen2"]).rsplit(".", 1)[0]
        entry = q.get(module, {k: q[k] for k in ("group_size", "bits")})
        if TYPES[kind].how == "packed":
            assert q[module] == {"ggml_type": kind}
        elif TYPES[kind].how == "affine":
            assert entry == {"group_size": 32, "bits": TYPES[kind].bits}, (name, kind, entry)
    up = store.layer(0)["mlp.up_proj"]
    np.testing.assert_array_equal(np.array(dense(up)), want["blk.0.ffn_up.weight"])
    for i in range(store.num_layers):
        for module, wt in store.layer(i).items():
            if not module.endswith("norm"):
                np.testing.assert_array_equal(np.array(dense(wt)), want[f"blk.{i}.{GGUF_NAMES[module]}.weight"])
    np.testing.assert_array_equal(np.array(dense(store.head())), want["output.weight"])
    ids = np.array([[3, 7, 3]])
    np.testing.assert_array_equal(np.array(store.embed(ids))[0], want["token_embd.weight"][[3, 7, 3]])
    assert {TYPES[k].how for k, _, _ in out.values()} == {"affine", "packed", "dense"}


def test_unknown_and_truncated_types_are_refused_in_one_line(tmp_path):
    import gguf
    from mesp_mlx.io.ggml_types import convert
    raw = np.zeros((2, 8 * 36), np.uint8)
    with pytest.raises(SourceError, match=r"m.gguf: tensor blk.0.ffn_up.weight has GGUF type Q8_1, which is not"):
        convert(raw, "Q8_1", [2, 256], "m.gguf: tensor blk.0.ffn_up.weight")
    with pytest.raises(SourceError, match=r"has 419 bytes of Q6_K data, expected 420"):
        convert(np.zeros(419, np.uint8), "Q6_K", [2, 256], "m.gguf: tensor x")
    with pytest.raises(SourceError, match=r"rows of whole 256-weight blocks"):
        convert(np.zeros(210, np.uint8), "Q4_K", [2, 128], "m.gguf: tensor x")
    raw = random_blocks("Q6_K", 2, 256)
    raw[1, 208:210] = np.array([np.inf], np.float16).view(np.uint8)
    with pytest.raises(SourceError, match=r"m.gguf: tensor x: Q6_K block 1 has a non-finite scale"):
        convert(raw, "Q6_K", [2, 256], "m.gguf: tensor x")


def test_precision_is_the_users_choice(tmp_path):
    """A Hugging Face directory (bf16 here) stored at each requested precision, each its own store in the cache;
    --no-quantize keeps the weights as they are; bits per weight are reported for the store and its source."""
    from builders import write_tiny
    from mesp_mlx.config import config_from_args
    from mesp_mlx.errors import ConfigError
    d = write_tiny(tmp_path / "m", "qwen2", hidden_size=128, intermediate_size=256)
    for f in d.glob("*.safetensors"):  # the source in bf16, as hub checkpoints are
        mx.save_safetensors(str(f), {k: v.astype(mx.bfloat16) for k, v in mx.load(str(f)).items()})
    stores = {}
    for q in ((64, 4), (32, 8), (128, 3), None):
        stores[q] = load_model(str(d), quantize=q)
        up = stores[q].layer(0)["mlp.up_proj"]
        if q is None:
            assert not up.quantized and up.weight.dtype == mx.bfloat16
            assert stores[q].bits_per_weight() == 16.0
        else:
            assert (up.group_size, up.bits) == q
            assert stores[q].bits_per_weight() == q[1] + 32 / q[0]  # fp16 scale and bias per group
        assert stores[q].info["source_bits_per_weight"] == 16.0
    assert len({s.path for s in stores.values()}) == 4
    c = config_from_args(["--no-quantize"])
    assert c.quantization() is None and config_from_args(["--q-bits", "8"]).quantization() == (64, 8)
    with pytest.raises(ConfigError, match="q_bits must be one of"):
        config_from_args(["--q-bits", "7"])
    with pytest.raises(ConfigError, match="q_group_size must be one of"):
        config_from_args(["--q-group-size", "16"])


@pytest.mark.parametrize("path", ["quantized", "dequantize"])
def test_mixed_store_trains_exactly(tmp_path, path):
    """MeSP's loss and LoRA gradients on a store of every kind of weight equal MLX autodiff's, on both matmul
    paths (the packed types have no quantized kernel: both dequantize them)."""
    from helpers import assert_grads_close
    from mesp_mlx.engines import make_engine
    from mesp_mlx.lora import LoRAConfig, init_lora, tree_map
    g, _, _ = write_mixed_gguf(tmp_path)
    store = load_model(str(g), quantize=None)
    params = tree_map(lambda t: t + 0.02 * mx.random.normal(t.shape, key=mx.random.key(t.size)),
                      init_lora(store.args, LoRAConfig(rank=4), 0))
    ids = mx.random.randint(0, store.args.vocab_size, (2, 13), key=mx.random.key(3))
    batch = sft_batch(ids[:, :-1], ids[:, 1:], mx.ones((2, 12)))
    c = Compute(matmul=path)
    ref_loss, ref = make_engine("autodiff", store, 20.0, compute=c).loss_and_grad(params, batch)
    loss, grads = make_engine("mesp", store, 20.0, compute=Compute(matmul=path, attn_chunk=5, vocab_chunk=64,
                                                                    token_chunk=7)).loss_and_grad(params, batch)
    assert abs(loss["loss"].item() - ref_loss["loss"].item()) <= EXACT * abs(ref_loss["loss"].item())
    assert_grads_close(grads, ref)


def test_packed_store_memory_follows_the_model(tmp_path):
    """A store of Q6_K blocks (dequantized on the fly) streams as the affine ones do: a MeSP step's measured extra
    peak sits under the engine's memory model, which counts the packed bytes of each block."""
    from mesp_mlx.engines import make_engine
    from mesp_mlx.lora import LoRAConfig, init_lora
    g, _, _ = write_mixed_gguf(tmp_path, kinds=["Q6_K"], intermediate_size=768, num_hidden_layers=4)
    store = load_model(str(g), quantize=None)
    assert store.bits_per_weight() > 6.5  # Q6_K blocks: 6.5625 bits; the 1-D tensors are not matrices
    params = init_lora(store.args, LoRAConfig(rank=8), 0)
    seq = 256
    ids = mx.random.randint(0, store.args.vocab_size, (1, seq + 1), key=mx.random.key(0))
    batch = sft_batch(ids[:, :-1], ids[:, 1:], mx.ones((1, seq)))
    for path in ("dequantize", "quantized"):
        engine = make_engine("mesp", store, 20.0, compute=Compute(matmul=path))
        extra = step_extra_memory(engine, params, batch)
        model = engine.memory_model(1, seq, params)
        assert extra <= 1.05 * model["peak"], (path, extra, model)


def test_logits_match_llamacpp_on_the_same_file(tmp_path):
    """llama.cpp on the mixed-type file and on its F32 dequantization (tools/compare_llamacpp.py, the same
    measurement as on the real files): our logits on the file equal llama.cpp's on the F32 copy to fp32 roundoff
    (so every type means to us what it means to llama.cpp), and are no further from them than llama.cpp's own run
    of the file (which rounds activations to 8 bits)."""
    pytest.importorskip("llama_cpp", reason="llama.cpp's bindings (llama-cpp-python) are not installed")
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).parent.parent / "tools"))
    from compare_llamacpp import f32_copy, llamacpp_logits, stats
    from mesp_mlx.model import logits
    g, _, _ = write_mixed_gguf(tmp_path, pre="default")  # llama.cpp refuses the pre-tokenizer name "gpt2"
    f32_copy(g, tmp_path / "f32.gguf")
    ids = [int(i) for i in np.random.default_rng(0).integers(0, 300, 48)]
    ref = llamacpp_logits(tmp_path / "f32.gguf", ids, f32_cache=True)
    theirs = stats(llamacpp_logits(g, ids, f32_cache=False), ref)
    ours = stats(np.array(logits(load_model(str(g)), mx.array([ids]))[0]), ref)
    # fp32 through two layers of different summation orders: ~1e-6 relative (2e-6 measured on SmolLM2's 30)
    assert ours["rel_l2"] < 1e-5 and ours["argmax_agree"] == len(ids), ours
    assert ours["rel_l2"] <= theirs["rel_l2"], (ours, theirs)


def test_requantize_on_request_prints_its_error(tmp_path, capsys):
    """--requantize: the file's quantized tensors re-quantized to 4-bit group 64 (a store mlx-lm reads), with the
    weights' relative L2 error against the file's values printed and recorded; kept exactly otherwise."""
    from helpers import mlx_lm_model, rel_err
    from mesp_mlx.model import logits
    g, out, want = write_mixed_gguf(tmp_path)
    store = load_model(str(g), requantize=True)
    assert load_model(str(g)).path != store.path
    err = store.info["requantized_rel_l2"]
    assert f"weights {err:.4f} off the file's" in capsys.readouterr().err
    num = den = 0.0
    for i in range(store.num_layers):
        for module, wt in store.layer(i).items():
            if not module.endswith("norm"):
                assert (wt.group_size, wt.bits) == (64, 4)
                num += float(mx.sum((dense(wt) - mx.array(want[f"blk.{i}.{GGUF_NAMES[module]}.weight"])) ** 2))
                den += float(mx.sum(mx.array(want[f"blk.{i}.{GGUF_NAMES[module]}.weight"]) ** 2))
    for module, name in (("model.embed_tokens", "token_embd.weight"), ("lm_head", "output.weight")):
        ref = mx.array(want[name])
        num += float(mx.sum((dense(store._top(module)) - ref) ** 2))
        den += float(mx.sum(ref ** 2))
    assert abs((num / den) ** 0.5 - err) < 1e-3 * err and 0.01 < err < 0.5
    ids = mx.array([[1, 5, 9, 200]])
    assert rel_err(logits(store, ids), mlx_lm_model(store.path)(ids)) < 1e-4


def test_cli_trains_on_every_type(tmp_path, capsys):
    """The CLI on the mixed-type GGUF: it trains, reports the store's bits per weight beside the file's, and says
    that mlx-lm cannot read packed blocks instead of printing an mlx-lm command that would fail."""
    from mesp_mlx.train import main
    g, _, _ = write_mixed_gguf(tmp_path)
    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "valid"):
        (data / f"{split}.jsonl").write_text("\n".join(json.dumps({"text": "the quick brown fox"}) for _ in range(4)))
    rc = main(["--model", str(g), "--data", str(data), "--iters", "2", "--adapter-path", str(tmp_path / "ad"),
               "--sample-prompt", "", "--rank", "4"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    store = load_model(str(g))
    assert f"{store.bits_per_weight():.2f} bits per weight as stored, {store.info['source_bits_per_weight']:.2f} " \
           "in the source" in out.out + out.err
    assert "mlx-lm cannot read" in out.out + out.err and "mlx_lm.generate" not in out.out + out.err



def test_memory_budget_on_packed_types(tmp_path, capsys):
    """--memory-budget on a GGUF whose matrices are Q6_K and Q3_K blocks kept as bytes (issue 32): a run under a
    budget keeps MLX's peak within MLX's share, and a budget too small is refused before any work, in one line
    naming the smallest budget that fits."""
    import re
    from mesp_mlx.plan import GROWTH
    from mesp_mlx.resident import resident_bytes
    from mesp_mlx.train import main
    g, _, _ = write_mixed_gguf(tmp_path, kinds=["Q6_K", "Q3_K"], intermediate_size=1024)
    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "valid"):
        (data / f"{split}.jsonl").write_text("\n".join(json.dumps({"text": "the quick brown fox " * 8})
                                                       for _ in range(4)))
    common = ["--model", str(g), "--data", str(data), "--iters", "2", "--sample-prompt", "", "--rank", "4",
              "--steps-per-report", "1"]
    assert main(common + ["--adapter-path", str(tmp_path / "none"), "--memory-budget", "1KB"]) == 2
    capsys.readouterr()  # the process has now loaded what a run loads before its plan; its resident set is stable
    held = int(resident_bytes() * (1 + GROWTH))
    # the leanest plan needs ~6 MB of MLX's share here (Q3_K products 64 rows at a time)
    assert main(common + ["--adapter-path", str(tmp_path / "small"), "--memory-budget", f"{held + 3_000_000}B"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(r"needs at least \d+ MB.*Raise --memory-budget to \d+MB", err[0]), err
    assert not (tmp_path / "small").exists()
    share = 30_000_000
    out = tmp_path / "a"
    assert main(common + ["--adapter-path", str(out), "--memory-budget", f"{held + share}B"]) == 0
    assert "memory budget" in capsys.readouterr().out
    peaks = [r["peak_memory_gb"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
             if "peak_memory_gb" in r]
    assert peaks and max(peaks) * 1e9 <= share, peaks


@pytest.mark.parametrize("type_name", sorted(k for k, t in TYPES.items() if t.how == "packed"))
def test_row_blocked_products_equal_the_whole(type_name):
    """Products with a packed weight dequantized dequant_rows output rows at a time (the memory planner's bound on
    their temporaries): the forward's columns are the whole product's dot products, the transposed product the
    same sums over rows split into partial sums; both equal the whole product to one product's rounding (EXACT),
    with the last block short and a bias, evaluated block by block or as one graph."""
    from helpers import rel_err
    from mesp_mlx.ops.linear import Frozen
    rows, cols = 300, 512
    raw = random_blocks(type_name, rows, cols, exponents=(-4, -2))
    bias = mx.random.normal((rows,), key=mx.random.key(1))
    w = Frozen(mx.array(raw), bias=bias, ggml=type_name)
    x = mx.random.normal((2, 5, cols), key=mx.random.key(2))
    g = mx.random.normal((2, 5, rows), key=mx.random.key(3))
    whole = Compute(matmul="dequantize")
    ref_y, ref_dx = frozen_matmul(x, w, whole), frozen_matmul_t(g, w, whole)
    for sync in ("chunk", "block"):
        blocked = Compute(matmul="dequantize", dequant_rows=64, sync=sync)
        y, dx = frozen_matmul(x, w, blocked), frozen_matmul_t(g, w, blocked)
        assert y.shape == ref_y.shape and dx.shape == ref_dx.shape
        assert rel_err(y, ref_y) <= EXACT and rel_err(dx, ref_dx) <= EXACT, (sync, rel_err(y, ref_y),
                                                                             rel_err(dx, ref_dx))


def test_planner_row_blocks_packed_products(tmp_path):
    """Where a whole packed matrix's dequantization does not fit a budget, the planner row-blocks its products
    (Compute.dequant_rows), and a MeSP step so planned stays under the memory model, measured, and below the same
    plan's step with whole matrices."""
    from mesp_mlx.engines import make_engine
    from mesp_mlx.lora import LoRAConfig, init_lora
    from mesp_mlx.plan import MARGIN, PLANS, candidate_plans, engine_settings, plan_for_budget, predicted_peak
    g, _, _ = write_mixed_gguf(tmp_path, kinds=["Q3_K", "Q6_K"], intermediate_size=2048)
    store = load_model(str(g), quantize=None)
    params = init_lora(store.args, LoRAConfig(rank=4), 0)
    seq = 64
    ids = mx.random.randint(0, store.args.vocab_size, (1, seq + 1), key=mx.random.key(0))
    batch = sft_batch(ids[:, :-1], ids[:, 1:], mx.ones((1, seq)))
    assert len(candidate_plans(store)) > len(PLANS)
    whole = min(predicted_peak(store, 20.0, 1, seq, params, "adamw", True, engine_settings(Compute(), plan))
                for plan in PLANS)  # the leanest plan that dequantizes whole matrices
    settings, peak = plan_for_budget(store, 20.0, 1, seq, params, "adamw", True, int(whole * 0.9), Compute())
    c = settings["compute"]
    assert c.dequant_rows and peak <= whole * 0.9
    engine = make_engine("mesp", store, 20.0, **settings)
    extra = step_extra_memory(engine, params, batch)
    assert extra <= peak / MARGIN, (extra, peak / MARGIN)
    unblocked = make_engine("mesp", store, 20.0, **dict(settings, compute=dataclasses.replace(c, dequant_rows=0)))
    assert extra < step_extra_memory(unblocked, params, batch)
    # the same gradients either way
    _, g_blocked = engine.loss_and_grad(params, batch)
    _, g_whole = unblocked.loss_and_grad(params, batch)
    from helpers import assert_grads_close
    assert_grads_close(g_blocked, g_whole)
