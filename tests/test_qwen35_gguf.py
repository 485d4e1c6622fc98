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

import mlx.core as mx
import numpy as np
import pytest

from builders import mlx_lm_qwen35, qwen35_mlx_lm_weights, tiny_qwen35, write_tiny_qwen35_gguf
from helpers import EXACT, rel_err
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
