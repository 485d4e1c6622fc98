"""Qwen3.5 (llama.cpp architecture qwen35) as llama.cpp reads it, judged by llama.cpp itself against mlx-lm's own
qwen3_5.Model on the same weights: a tiny Hugging Face checkpoint (builders.tiny_qwen35: Hk = 2 < Hv = 4, so the
value-head reorder of llama.cpp's converter matters) written as an F32 GGUF (builders.write_tiny_qwen35_gguf) and a
LoRA GGUF (mesp_mlx.io.qwen35_gguf.write_lora). llama.cpp runs in a subprocess, as in test_conformance.py (a file it
refuses can crash the process), with an F32 KV cache.

Tolerances. Both sides compute in fp32 on the CPU; llama.cpp sums in another order (its chunked Gated DeltaNet, its
own matmul and softmax kernels) and its l2 norm takes max(|x|, eps) where mlx-lm adds eps to the sum of squares
(relative 0.5 eps / |x|^2 < 1e-6 here), so the logits agree to EXACT (helpers.py: 1e-5 of the largest logit on the
CPU, measured 2e-6; 2e-3 where mlx-lm runs on a GPU with TF32-like matmuls). The adapter's effect (adapted minus base)
is a difference of two runs each within EXACT of the largest logit, so it agrees to 2 EXACT of that; the effect is
asserted to be at least 5% of the largest logit, so that bound is far below what a misplaced head or a wrong scale
gives (measured O(1) relative: the controls below write the value heads in Hugging Face's order and must fail)."""
import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from builders import mlx_lm_qwen35, qwen35_mlx_lm_weights, tiny_qwen35, write_tiny_qwen35_gguf
from helpers import EXACT, REL_TOL, rel_err
from mesp_mlx.io.qwen35_gguf import (LORA_TARGETS, lora_from_gguf, split_name, tensor_from_gguf,
                                    text_config_from_gguf, value_head_order, write_lora)

IDS = [5, 17, 42, 99, 3, 250, 7, 8, 120, 64, 33, 201]
RANK, SCALE = 4, 2.5

LLAMACPP = """
import sys, json
import numpy as np
from llama_cpp import GGML_TYPE_F32, Llama
out, ids, runs = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
got = {}
for name, (base, lora) in runs.items():
    llm = Llama(model_path=base, lora_path=lora, n_ctx=64, logits_all=True, type_k=GGML_TYPE_F32,
                type_v=GGML_TYPE_F32, n_threads=1, verbose=False)
    llm.eval(ids)
    got[name] = np.array(llm.scores[:len(ids)], dtype=np.float64)
    del llm
np.savez(out, **got)
"""


def llamacpp_logits(runs, out):
    """{name: llama.cpp's logits on IDS} for runs {name: (base GGUF, LoRA GGUF or None)}, in one subprocess."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError as e:
        pytest.skip(f"llama.cpp's bindings cannot be imported ({e}); install them with "
                    ".venv/bin/pip install llama-cpp-python")
    runs = {k: [str(b), None if l is None else str(l)] for k, (b, l) in runs.items()}
    run = subprocess.run([sys.executable, "-c", LLAMACPP, str(out), json.dumps(IDS), json.dumps(runs)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"llama.cpp failed (rc {run.returncode}): {run.stderr[-600:]}"
    got = np.load(out)
    return {k: mx.array(got[k].astype(np.float32)) for k in runs}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen35")
    config, weights = tiny_qwen35(seed=0)
    files = {}
    for grouped in (False, True):
        files[grouped] = write_tiny_qwen35_gguf(root / f"tiny-{'grouped' if grouped else 'llamacpp'}.gguf",
                                                weights, config, grouped_value_heads=grouped)
    return dict(root=root, config=config, weights=weights, gguf=files[False], grouped=files[True])


def test_value_head_order_is_the_converters():
    # Hv = 4 over Hk = 2: grouped [k0v0, k0v1, k1v0, k1v1] -> tiled [k0v0, k1v0, k0v1, k1v1]; llama.cpp's head j
    # then reads key head j % Hk, as its ggml_repeat broadcast does
    assert value_head_order(2, 4).tolist() == [0, 2, 1, 3]
    perm = value_head_order(16, 32)  # Qwen3.5-4B / 9B
    assert [int(perm[j]) // 2 for j in range(32)] == [j % 16 for j in range(32)]
    assert value_head_order(16, 16).tolist() == list(range(16))


def test_mlx_lm_form_is_mlx_lm_sanitize(tiny):
    from copy import deepcopy
    from mlx_lm.models.qwen3_5 import Model, ModelArgs
    model = Model(ModelArgs.from_dict(deepcopy(tiny["config"])))
    theirs = model.sanitize({k: mx.array(v) for k, v in tiny["weights"].items()})
    ours = qwen35_mlx_lm_weights(tiny["weights"], tiny["config"])
    assert set(theirs) == set(ours)
    for k in ours:
        assert theirs[k].shape == ours[k].shape and mx.array_equal(theirs[k], ours[k]), k


def test_llamacpp_reads_tiny_qwen35_as_mlx_lm_computes(tiny):
    ref = mlx_lm_qwen35(tiny["weights"], tiny["config"])(mx.array([IDS]))[0]
    got = llamacpp_logits({"llamacpp": (tiny["gguf"], None), "grouped": (tiny["grouped"], None)},
                          tiny["root"] / "base.npz")
    assert rel_err(got["llamacpp"], ref) <= EXACT
    # the control: value heads left in Hugging Face's grouped order are read by llama.cpp as other heads
    assert rel_err(got["grouped"], ref) > 0.1


def test_gguf_reads_back_to_mlx_lm_form(tiny):
    """The inverse of the converter: the file's config fields and every tensor back in mlx-lm's form (value heads
    regrouped), equal to what mlx-lm's sanitize makes of the checkpoint; A_log = log(-(-exp(A_log))) to float32
    rounding, all else bit for bit."""
    import gguf
    reader = gguf.GGUFReader(str(tiny["gguf"]))
    get = lambda key: reader.fields[f"qwen35.{key}"].contents() if f"qwen35.{key}" in reader.fields else None
    t = tiny["config"]["text_config"]
    cfg = text_config_from_gguf(get)
    assert cfg == {k: t[k] for k in cfg if k in t} | {"partial_rotary_factor": t["rope_parameters"][
        "partial_rotary_factor"], "mrope_section": t["rope_parameters"]["mrope_section"]}
    back = {}
    for tensor in reader.tensors:
        name, arr = tensor_from_gguf(tensor.name, np.array(tensor.data), cfg)
        back["language_model." + name] = arr
    ref = qwen35_mlx_lm_weights(tiny["weights"], tiny["config"])
    assert set(back) == set(ref)
    for name, arr in back.items():
        assert arr.shape == ref[name].shape, name
        if name.endswith("A_log"):
            np.testing.assert_allclose(arr, np.array(ref[name]), rtol=1e-6)
        else:
            assert np.array_equal(arr, np.array(ref[name])), name


def lora_pairs(config, seed=1):
    """{Hugging Face module name: (a (in, r), b (r, out))} on every projection llama.cpp applies a LoRA to."""
    t = config["text_config"]
    rng = np.random.default_rng(seed)
    d, f = t["hidden_size"], t["intermediate_size"]
    hd, nh, nkv = t["head_dim"], t["num_attention_heads"], t["num_key_value_heads"]
    hk, hv, dk, dv = (t["linear_num_key_heads"], t["linear_num_value_heads"], t["linear_key_head_dim"],
                      t["linear_value_head_dim"])
    shapes = {"self_attn.q_proj": (d, 2 * nh * hd), "self_attn.k_proj": (d, nkv * hd),
              "self_attn.v_proj": (d, nkv * hd), "self_attn.o_proj": (nh * hd, d),
              "linear_attn.in_proj_qkv": (d, 2 * hk * dk + hv * dv), "linear_attn.in_proj_z": (d, hv * dv),
              "linear_attn.in_proj_a": (d, hv), "linear_attn.in_proj_b": (d, hv), "linear_attn.out_proj": (hv * dv, d),
              "mlp.gate_proj": (d, f), "mlp.up_proj": (d, f), "mlp.down_proj": (f, d)}
    assert set(shapes) == set(LORA_TARGETS)
    pairs = {}
    for i in range(t["num_hidden_layers"]):
        full = (i + 1) % t["full_attention_interval"] == 0
        for module, (n_in, n_out) in shapes.items():
            if module.startswith("linear_attn." if full else "self_attn."):
                continue
            pairs[f"model.language_model.layers.{i}.{module}"] = (
                rng.normal(0, 0.1, (n_in, RANK)).astype(np.float32),
                rng.normal(0, 0.05, (RANK, n_out)).astype(np.float32))
    return pairs


def mlx_lm_with_lora(tiny, pairs):
    """mlx-lm's model with mlx-lm's own LoRA layers (x W^T + scale (x a) b) holding `pairs`."""
    from mlx_lm.tuner.utils import linear_to_lora_layers
    model = mlx_lm_qwen35(tiny["weights"], tiny["config"])
    linear_to_lora_layers(model, len(model.layers), {"rank": RANK, "scale": SCALE, "dropout": 0.0,
                                                     "keys": list(LORA_TARGETS)})
    for name, (a, b) in pairs.items():
        i, module = split_name(name)
        layer = model.layers[i]
        for part in module.split("."):
            layer = getattr(layer, part)
        layer.lora_a, layer.lora_b = mx.array(a), mx.array(b)
    model.eval()
    return model


def test_qwen35_lora_in_llamacpp(tiny):
    import gguf
    t = tiny["config"]["text_config"]
    pairs = lora_pairs(tiny["config"])
    lora = write_lora(tiny["root"] / "lora.gguf", pairs, t, SCALE)
    grouped = write_lora(tiny["root"] / "lora-grouped.gguf", pairs, t, SCALE, heads_grouped=False)
    reader = gguf.GGUFReader(str(lora))
    assert reader.fields["general.architecture"].contents() == "qwen35"
    assert reader.fields["general.type"].contents() == "adapter"
    assert reader.fields["adapter.lora.alpha"].contents() == pytest.approx(SCALE * RANK)
    assert len(reader.tensors) == 2 * len(pairs)
    tensors = {x.name: np.array(x.data) for x in reader.tensors}
    for base in {n.rsplit(".", 1)[0] for n in tensors}:  # and back, as a reader of such files must
        name, a, b = lora_from_gguf(base, tensors[base + ".lora_a"], tensors[base + ".lora_b"], t)
        assert np.array_equal(a, pairs[name.replace("model.", "model.language_model.", 1)][0])
        assert np.array_equal(b, pairs[name.replace("model.", "model.language_model.", 1)][1])

    ids = mx.array([IDS])
    ref_base = mlx_lm_qwen35(tiny["weights"], tiny["config"])(ids)[0]
    ref = mlx_lm_with_lora(tiny, pairs)(ids)[0]
    got = llamacpp_logits({"base": (tiny["gguf"], None), "lora": (tiny["gguf"], lora),
                           "grouped": (tiny["gguf"], grouped)}, tiny["root"] / "lora.npz")
    big = max(float(mx.max(mx.abs(ref))), float(mx.max(mx.abs(ref_base))))
    ref_effect = ref - ref_base
    assert float(mx.max(mx.abs(ref_effect))) > 0.05 * big  # the adapter does something
    assert rel_err(got["base"], ref_base) <= EXACT
    assert float(mx.max(mx.abs((got["lora"] - got["base"]) - ref_effect))) <= 2 * EXACT * big
    # the control: LoRA rows left in Hugging Face's value-head order update other heads in llama.cpp
    assert rel_err(got["grouped"] - got["base"], ref_effect) > 0.1


# --- qwen35 GGUF bases read into a weight store ---------------------------------------------------------------------
# Quantized files are judged against llama.cpp on their F32 dequantization (tools/compare_llamacpp.f32_copy), as
# test_ggml_types.py judges every type: llama.cpp on the quantized file itself rounds activations to 8 bits, which
# our products (exact on the file's weights) do not. The mixed file's dimensions give rows of whole 256-weight
# blocks, so that K-quants fit: Dv = 64, narrower than a 256-block, so its Q6_K ssm_out keeps tiled columns (and
# Dk = Dv, which llama.cpp's qwen35 assumes).
MIXED_DIMS = dict(hidden_size=256, intermediate_size=256, head_dim=64, linear_key_head_dim=64, linear_value_head_dim=64,
                  rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5,
                                       mrope_section=[8, 4, 4], mrope_interleaved=True))
MIXED_KINDS = ["Q4_K", "Q8_0", "Q5_K", "Q6_K", "Q4_0", "Q3_K"]
# llama.cpp against mlx-lm on these dimensions, on the plain F32 checkpoint (no store of ours involved): measured
# 3.1e-4 of the largest logit (5.7e-5 on the mixed file's F32 copy), growing along the sequence, where the tiny
# dimensions agree to 2e-6; our store equals mlx-lm on the same weights to EXACT (asserted first), so against
# llama.cpp the mixed file is held to that measured gap with 3x margin, far below a misplaced head's O(0.1-1).
LLAMACPP_WIDE = 1e-3


def f32_copy(src, dst):
    sys.path.insert(0, str(Path(__file__).parents[1] / "tools"))
    from compare_llamacpp import f32_copy as copy
    copy(src, dst)
    return dst


def mixed_copy(src, dst):
    """The qwen35 GGUF `src` with each matrix of whole 256-blocks (conv1d aside) as random blocks of the types
    MIXED_KINDS in turn, ssm_out as Q6_K (kept packed); the rest as it is."""
    import gguf
    from test_ggml_types import random_blocks
    reader = gguf.GGUFReader(str(src))
    w = gguf.GGUFWriter(str(dst), "qwen35")
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        vtype = field.types[0]
        w.add_key_value(field.name, field.contents(), vtype,
                        sub_type=field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None)
    k = 0
    for t in reader.tensors:
        shape = tuple(int(s) for s in reversed(t.shape))
        if len(shape) == 2 and shape[1] % 256 == 0 and "conv1d" not in t.name:
            kind = "Q6_K" if "ssm_out" in t.name else MIXED_KINDS[k % len(MIXED_KINDS)]
            k += 1
            raw = random_blocks(kind, *shape, seed=k, exponents=(-3, -2))
            w.add_tensor(t.name, raw, raw_shape=raw.shape, raw_dtype=gguf.GGMLQuantizationType[kind])
        else:
            w.add_tensor(t.name, np.asarray(t.data).astype(np.float32).reshape(shape))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def file_model(path, config):
    """mlx-lm's qwen3_5.Model holding the file's weights, dequantized, in mlx-lm's form (value heads regrouped)."""
    import gguf
    from copy import deepcopy
    from mlx_lm.models.qwen3_5 import Model, ModelArgs
    reader = gguf.GGUFReader(str(path))
    weights = {}
    for t in reader.tensors:
        arr = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32)
        name, arr = tensor_from_gguf(t.name, arr.reshape([int(s) for s in reversed(t.shape)]),
                                     config["text_config"])
        weights["language_model." + name] = mx.array(arr)
    model = Model(ModelArgs.from_dict(deepcopy(config)))
    model.load_weights(list(weights.items()))
    model.eval()
    return model, weights


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """kind -> (GGUF file, its F32 copy, checkpoint config): F32 (its value heads regrouped in the store), Q8_0 on the
    tiny dimensions (Dv = 16 narrower than its 32-groups: out_proj kept tiled) and the mixed K-quant file."""
    root = tmp_path_factory.mktemp("qwen35-bases")
    config, weights = tiny_qwen35(seed=0)
    mixed_config, mixed_weights = tiny_qwen35(seed=0, **MIXED_DIMS)
    out = {"F32": write_tiny_qwen35_gguf(root / "f32.gguf", weights, config),
           "Q8_0": write_tiny_qwen35_gguf(root / "q8.gguf", weights, config, qtype="Q8_0"),
           "mixed": mixed_copy(write_tiny_qwen35_gguf(root / "m32.gguf", mixed_weights, mixed_config),
                               root / "mixed.gguf")}
    return {k: (f, f if k == "F32" else f32_copy(f, root / f"{k}-f32.gguf"), mixed_config if k == "mixed" else config)
            for k, f in out.items()} | {"root": root}


@pytest.mark.parametrize("kind,tiled", [("F32", False), ("Q8_0", True), ("mixed", True)])
def test_gguf_base_store_computes_the_file(bases, kind, tiled):
    """A qwen35 GGUF read into a store: its logits equal mlx-lm's Model on the file's weights (dequantized,
    regrouped) and llama.cpp's on the file's F32 values, EXACT; out_proj keeps the file's tiled columns exactly
    where a kept block spans value heads (then mlx-lm cannot read the store, and it says so). The F32 file's store
    is what mlx-lm makes of the checkpoint (A_log through -exp and log: float32 rounding)."""
    from mesp_mlx.io.sources import load_model
    from mesp_mlx.model import logits
    path, f32, config = bases[kind]
    store = load_model(str(path), quantize=None)
    assert store.args.linear_out_tiled == tiled and store.mlx_lm_readable == (not tiled)
    got = logits(store, mx.array([IDS]))[0]
    model, weights = file_model(path, config)
    assert rel_err(got, model(mx.array([IDS]))[0]) <= EXACT
    theirs = llamacpp_logits({"f32": (f32, None)}, bases["root"] / f"{kind}.npz")["f32"]
    assert rel_err(got, theirs) <= (LLAMACPP_WIDE if kind == "mixed" else EXACT)
    if kind == "mixed":  # every kind of GGML type was read, ssm_out kept as packed Q6_K blocks
        assert set(store.packed_types().values()) >= {"Q6_K", "Q3_K"}
        assert store.packed_types()["model.layers.0.linear_attn.out_proj"] == "Q6_K"
    if kind == "F32":
        from mlx.utils import tree_flatten
        from mlx_lm.utils import load_model as mlx_load
        ref = qwen35_mlx_lm_weights(*reversed(tiny_qwen35(seed=0)))
        have = dict(tree_flatten(mlx_load(store.path)[0].parameters()))
        assert sorted(have) == sorted(ref)
        for k, v in ref.items():
            np.testing.assert_allclose(np.array(have[k]), np.array(v), rtol=1e-6 if k.endswith("A_log") else 0)


@pytest.mark.parametrize("kind", ["Q8_0", "mixed"])
def test_tiled_store_adapters_are_mlx_lms(bases, kind, tmp_path):
    """A store keeping out_proj tiled trains its LoRA A in that order, but every file has mlx-lm's order: mlx-lm's
    model on the file's weights with our adapter folder, PEFT's formula on those weights, the fused folder in
    mlx-lm and llama.cpp with our GGUF LoRA (its effect; on the F32 copy) all give our adapted logits; every format
    reads back to our parameters bit for bit."""
    from dataclasses import replace
    from mlx_lm.tuner.utils import load_adapters
    from safetensors.numpy import load_file
    from mesp_mlx.io.adapters import save_adapter
    from mesp_mlx.io.formats import export_adapter, load_adapter_weights
    from mesp_mlx.io.sources import load_model
    from mesp_mlx.lora import LoRAConfig, init_lora, to_flat
    from mesp_mlx.model import logits
    path, f32, config = bases[kind]
    store = load_model(str(path), quantize=None)
    assert store.args.linear_out_tiled
    lora = LoRAConfig(rank=RANK, scale=SCALE, keys=store.args.projections())
    rng = np.random.default_rng(5)
    params = {i: {p: (mx.array(rng.normal(0, 0.1, a.shape).astype(np.float32)),
                      mx.array(rng.normal(0, 0.05, b.shape).astype(np.float32))) for p, (a, b) in m.items()}
              for i, m in init_lora(store.args, lora).items()}
    ad = tmp_path / "ad"
    save_adapter(ad, params, lora, store.path)
    ids = mx.array([IDS])
    base, ours = logits(store, ids)[0], logits(store, ids, params, SCALE)[0]
    big = float(mx.max(mx.abs(ours)))
    assert float(mx.max(mx.abs(ours - base))) > 0.05 * big  # the adapter does something

    model, weights = file_model(path, config)
    load_adapters(model, str(ad))
    assert rel_err(model(ids)[0], ours) <= EXACT

    expected = {k: tuple(v.shape) for k, v in to_flat(params).items()}
    outs = {fmt: export_adapter(ad, fmt, tmp_path / fmt)[0] for fmt in ("peft", "gguf")}
    for f in (ad / "adapters.safetensors", outs["peft"], outs["gguf"]):
        back = to_flat(load_adapter_weights(f, expected, SCALE, store=store))
        for name, arr in to_flat(params).items():
            assert np.array_equal(np.array(back[name]), np.array(arr)), (f, name)

    peft = load_file(str(outs["peft"] / "adapter_model.safetensors"))
    merged = dict(weights)
    for name, a in peft.items():
        if ".lora_A." in name:
            module = name.removeprefix("base_model.model.model.language_model.").replace(".lora_A.weight", "")
            b = peft[name.replace("lora_A", "lora_B")]
            key = f"language_model.model.{module}.weight"
            merged[key] = merged[key] + SCALE * mx.array(b @ a)
    plain, _ = file_model(path, config)  # the file's weights merged by PEFT's formula, no adapter
    plain.load_weights(list(merged.items()))
    # merged weights round W + s B A once per element: other arithmetic, not the same sums reordered, carried through
    # the whole model (a chain of products): REL_TOL (helpers.py; 1.5e-5 measured with OpenBLAS's Prescott kernels)
    assert rel_err(plain(ids)[0], ours) <= REL_TOL

    from mlx_lm import load
    fused, _ = load(str(export_adapter(ad, "fused", tmp_path / "fused", dtype="float32")[0]))
    assert rel_err(fused(ids)[0], ours) <= REL_TOL

    got = llamacpp_logits({"base": (f32, None), "lora": (f32, outs["gguf"])}, tmp_path / "lora.npz")
    tol = LLAMACPP_WIDE if kind == "mixed" else EXACT
    assert rel_err(got["base"], base) <= tol
    assert float(mx.max(mx.abs((got["lora"] - got["base"]) - (ours - base)))) <= 2 * tol * big


def test_bad_qwen35_files_are_refused_in_one_line(bases, tmp_path):
    """A qwen35moe file, and a qwen35 file whose value heads do not group over its key heads: one line naming the
    file."""
    import gguf
    from mesp_mlx.io import SourceError
    from mesp_mlx.io.sources import load_model
    src = gguf.GGUFReader(str(bases["F32"][0]))
    for arch, change, message in (("qwen35moe", {}, "GGUF architecture 'qwen35moe' is not supported"),
                                  ("qwen35", {"qwen35.ssm.time_step_rank": 3}, "3 value heads")):
        bad = tmp_path / f"{arch}.gguf"
        w = gguf.GGUFWriter(str(bad), arch)
        for field in src.fields.values():
            if field.name.startswith("GGUF.") or field.name == "general.architecture":
                continue
            vtype = field.types[0]
            name = field.name.replace("qwen35.", f"{arch}.", 1)
            w.add_key_value(name, change.get(field.name, field.contents()), vtype,
                            sub_type=field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None)
        for t in src.tensors:
            w.add_tensor(t.name, np.asarray(t.data).reshape([int(s) for s in reversed(t.shape)]))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        with pytest.raises(SourceError, match=message) as e:
            load_model(str(bad), quantize=None)
        assert str(bad) in str(e.value) and "\n" not in str(e.value)


def test_tiled_store_trains_exactly(bases):
    """MeSP's loss and LoRA gradients on a store keeping out_proj tiled (Q8_0's 32-groups over 16-wide heads) equal
    MLX autodiff's through the same blocks. (The mixed file's random blocks make a model whose first-layer decay
    gradients differ by ~3e-3 between the two on its F32 copy too, untiled: too ill-conditioned a judge.)"""
    kind = "Q8_0"
    from helpers import assert_grads_close, sft_batch
    from mesp_mlx.engines import make_engine
    from mesp_mlx.io.sources import load_model
    from mesp_mlx.lora import LoRAConfig, init_lora, tree_map
    from mesp_mlx.ops.linear import Compute
    store = load_model(str(bases[kind][0]), quantize=None)
    assert store.args.linear_out_tiled
    params = tree_map(lambda t: t + 0.02 * mx.random.normal(t.shape, key=mx.random.key(t.size)),
                      init_lora(store.args, LoRAConfig(rank=4, keys=store.args.projections()), 0))
    ids = mx.random.randint(0, store.args.vocab_size, (2, 13), key=mx.random.key(3))
    batch = sft_batch(ids[:, :-1], ids[:, 1:], mx.ones((2, 12)))
    ref_loss, ref = make_engine("autodiff", store, 20.0).loss_and_grad(params, batch)
    loss, grads = make_engine("mesp", store, 20.0, compute=Compute(attn_chunk=5, vocab_chunk=64, token_chunk=7,
                                                                    delta_chunk=4)).loss_and_grad(params, batch)
    assert abs(loss["loss"].item() - ref_loss["loss"].item()) <= EXACT * abs(ref_loss["loss"].item())
    assert_grads_close(grads, ref)
