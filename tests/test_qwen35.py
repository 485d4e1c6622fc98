"""Qwen3.5 (dense) plumbing: its checkpoints' forms into one store, its configs, LoRA keys per kind of block, and
adapter / fused names exactly as mlx-lm's own Qwen3.5 model names its parameters (mlx-lm loads adapters with
strict=False: a wrong name would be ignored silently). The block math is tested in test_gated_delta.py."""
import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from builders import TINY, tiny_weights, write_tiny
from mesp_mlx.io import SourceError
from mesp_mlx.io.adapters import save_adapter
from mesp_mlx.io.formats import export_adapter, load_adapter_weights
from mesp_mlx.io.formats.mlx_lm import read_config
from mesp_mlx.io.sources import load_model
from mesp_mlx.lora import LoRAConfig, init_lora, resolve_keys, to_flat
from mesp_mlx.models import UnsupportedModel, model_args
from mesp_mlx.ops.block import DELTA_PROJECTIONS, PROJECTIONS
from mesp_mlx.ops.linear import Frozen

CONFIG = TINY["qwen3_5"]
TEXT = {k: v for k, v in CONFIG.items() if k not in ("model_type", "tie_word_embeddings")}


def write_hf(path, extra=True, text_only=False):
    """The tiny model as Hugging Face publishes Qwen3.5: a multimodal config with the language model under
    text_config, `model.language_model.*` names, norms stored as multiplier - 1 (not the gated norm), conv1d
    [C, 1, K]; a vision tensor and an MTP tensor beside them. text_only: transformers' Qwen3_5ForCausalLM
    (a flat qwen3_5_text config, `model.layers.*`)."""
    weights = {}
    for name, arr in tiny_weights(CONFIG).items():
        if name.endswith("conv1d.weight"):
            arr = arr.swapaxes(1, 2)
        elif arr.ndim == 1 and name.endswith(("layernorm.weight", "q_norm.weight", "k_norm.weight")) \
                or name == "model.norm.weight":
            arr = arr - 1
        inner = name.startswith("model.") and not text_only
        weights[name.replace("model.", "model.language_model.", 1) if inner else name] = arr
    if extra:
        weights["model.visual.blocks.0.attn.qkv.weight"] = mx.ones((8, 8))
        weights["mtp.layers.0.mlp.gate_proj.weight"] = mx.ones((8, 8))
    path.mkdir(parents=True)
    config = {"model_type": "qwen3_5", "architectures": ["Qwen3_5ForConditionalGeneration"],
              "tie_word_embeddings": False, "text_config": dict(TEXT, model_type="qwen3_5_text"),
              "vision_config": {"model_type": "qwen3_5", "depth": 1}}
    if text_only:
        config = dict(TEXT, model_type="qwen3_5_text", tie_word_embeddings=False)
    (path / "config.json").write_text(json.dumps(config))
    mx.save_safetensors(str(path / "model.safetensors"), weights)
    return path


def write_mlx_community(path):
    """The tiny model as mlx-lm saves a converted Qwen3.5: the multimodal config, `language_model.*` names, already
    sanitized (norms the multiplier, conv1d [C, K, 1])."""
    weights = {"language_model." + k: v for k, v in tiny_weights(CONFIG).items()}
    weights["vision_tower.blocks.0.attn.qkv.weight"] = mx.ones((8, 8))
    path.mkdir(parents=True)
    config = {"model_type": "qwen3_5", "text_config": dict(TEXT, model_type="qwen3_5_text", tie_word_embeddings=False)}
    (path / "config.json").write_text(json.dumps(config))
    mx.save_safetensors(str(path / "model.safetensors"), weights)
    return path


def layer_arrays(store, i):
    return {k: (v.weight if isinstance(v, Frozen) else v) for k, v in store.layer(i).items()}


def same_stores(a, b):
    for i in range(a.num_layers):
        la, lb = layer_arrays(a, i), layer_arrays(b, i)
        assert sorted(la) == sorted(lb), i
        for k in la:
            assert la[k].dtype == lb[k].dtype and np.array_equal(np.array(la[k]), np.array(lb[k])), (i, k)
    assert np.array_equal(np.array(a.final_norm()), np.array(b.final_norm()))
    assert np.array_equal(np.array(a.head().weight), np.array(b.head().weight))


def test_every_form_gives_the_same_store(tmp_path):
    """Hugging Face's form (shifted, reshaped, vision and MTP dropped), mlx-lm's nested form and the flat form all
    convert to the same store, whose block weights are what the blocks take: conv taps (C, K), A_log, dt_bias and
    the gated norm as plain arrays."""
    flat = load_model(str(write_tiny(tmp_path / "flat", "qwen3_5")), quantize=None)
    hf = load_model(str(write_hf(tmp_path / "hf")), quantize=None)
    community = load_model(str(write_mlx_community(tmp_path / "community")), quantize=None)
    text_only = load_model(str(write_hf(tmp_path / "text", text_only=True)), quantize=None)
    same_stores(flat, hf)
    same_stores(flat, community)
    same_stores(flat, text_only)
    assert text_only.config["model_type"] == "qwen3_5"  # mlx-lm has no qwen3_5_text module
    assert hf.config["model_type"] == "qwen3_5" and "text_config" not in hf.config
    names = [k for f in hf.path.glob("*.safetensors") for k in mx.load(str(f))]
    assert not any("visual" in k or "mtp" in k for k in names)
    w0, w1 = hf.layer(0), hf.layer(1)
    conv_dim = 2 * 2 * 16 + 4 * 16
    assert w0["linear_attn.conv1d"].shape == (conv_dim, 4)
    assert w0["linear_attn.A_log"].shape == w0["linear_attn.dt_bias"].shape == (4,)
    assert w0["linear_attn.norm"].shape == (16,) and isinstance(w0["linear_attn.in_proj_b"], Frozen)
    assert w1["self_attn.q_proj"].out_dims == 2 * 4 * 16 and w1["self_attn.q_norm"].shape == (16,)
    ref = tiny_weights(CONFIG)  # the gated norm kept as it is, the others shifted back to the multiplier
    assert np.array_equal(np.array(w0["linear_attn.norm"]), np.array(ref["model.layers.0.linear_attn.norm.weight"]))
    assert np.array_equal(np.array(w0["input_layernorm"]), np.array(ref["model.layers.0.input_layernorm.weight"]))


def test_quantized_store_keeps_small_tensors(tmp_path):
    """Quantizing quantizes the projections (in_proj_a / in_proj_b too, as mlx-lm does) and nothing else: conv
    taps, A_log (fp32), dt_bias and norms stay as they were."""
    src = write_hf(tmp_path / "hf")
    weights = mx.load(str(src / "model.safetensors"))
    bf16 = {k: v if k.endswith("A_log") else v.astype(mx.bfloat16) for k, v in weights.items()}
    mx.save_safetensors(str(src / "model.safetensors"), bf16)
    store = load_model(str(src), quantize=(32, 4))
    w = store.layer(0)
    for p in DELTA_PROJECTIONS:
        assert w[p].scales is not None, p
    assert w["linear_attn.A_log"].dtype == mx.float32 and w["linear_attn.dt_bias"].dtype == mx.bfloat16
    assert w["linear_attn.conv1d"].dtype == mx.bfloat16
    assert not any("conv1d" in k or "A_log" in k for k in store.quantization)


def test_store_loads_in_mlx_lm_as_the_checkpoint_does(tmp_path):
    """mlx-lm reads the store (flat config, model_type qwen3_5) to the same parameters as the Hugging Face
    checkpoint it came from: nothing dropped, no norm shifted twice."""
    from mlx_lm.utils import load_model as mlx_load
    src = write_hf(tmp_path / "hf", extra=False)
    store = load_model(str(src), quantize=None)
    ref, _ = mlx_load(src)
    got, _ = mlx_load(store.path)
    want, have = dict(tree_flatten(ref.parameters())), dict(tree_flatten(got.parameters()))
    assert sorted(want) == sorted(have)
    for k in want:
        assert np.array_equal(np.array(want[k]), np.array(have[k])), k


@pytest.mark.parametrize("change,message", [
    (dict(num_experts=8, num_experts_per_tok=2), "mixture-of-experts"),
    (dict(linear_num_value_heads=3), "linear_num_value_heads 3 is not a multiple of linear_num_key_heads 2"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0}), "rope_parameters type 'yarn'"),
    (dict(layer_types=["full_attention"] * 4), "layer_types disagree with full_attention_interval 2"),
])
def test_config_refusals_name_the_file(tmp_path, change, message):
    src = write_hf(tmp_path / "hf", extra=False)
    config = json.loads((src / "config.json").read_text())
    config["text_config"].update(change)
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModel, match=message) as e:
        load_model(str(src))
    assert str(src / "config.json") in str(e.value) and "\n" not in str(e.value)


def test_moe_model_type_is_refused(tmp_path):
    d = write_tiny(tmp_path / "moe", "qwen3_5", model_type="qwen3_5_moe")
    with pytest.raises(UnsupportedModel, match="model_type 'qwen3_5_moe' is not supported") as e:
        load_model(str(d))
    assert str(d / "config.json") in str(e.value) and "\n" not in str(e.value)


def test_rope_and_block_specs_follow_mlx_lm():
    """RoPE from rope_parameters on int(head_dim * partial_rotary_factor) features, base rope_theta, split halves,
    as mlx-lm's attention builds it; the multimodal sections of a text model are 1-D RoPE; delta specs on the
    linear layers."""
    from mlx_lm.models.qwen3_5 import DecoderLayer, TextModelArgs
    args = model_args(CONFIG)
    specs = args.block_specs()
    assert [s.delta is not None for s in specs] == [True, False, True, False]
    assert specs[0] is specs[2] and specs[1] is specs[3]
    d = specs[0].delta
    assert (d.n_k_heads, d.n_v_heads, d.k_dim, d.v_dim, d.conv_kernel) == (2, 4, 16, 16, 4)
    full = specs[1]
    assert full.output_gate and full.qk_norm and full.delta is None
    rope = DecoderLayer(TextModelArgs.from_dict(CONFIG), 1).self_attn.rope
    assert (full.rope.dims, full.rope.traditional) == (rope.dims, rope.traditional) == (4, False)
    want = rope.base ** (np.arange(0, 4, 2) / 4)
    assert np.allclose(np.array(full.rope.freqs), want, rtol=1e-5)  # fp32 powers
    mrope = dict(CONFIG, rope_parameters=dict(CONFIG["rope_parameters"], rope_type="mrope"))
    assert np.array_equal(np.array(model_args(mrope).block_spec(layer=1).rope.freqs), np.array(full.rope.freqs))


def test_lora_keys_per_block():
    """The default adapts every projection of each block (mlx-lm's default: every Linear); named keys adapt the
    blocks that have them; a key no block has is refused in one line."""
    args = model_args(CONFIG)
    params = init_lora(args, LoRAConfig(rank=2, keys=args.projections()))
    assert [set(params[i]) for i in range(4)] == [set(DELTA_PROJECTIONS), set(PROJECTIONS)] * 2
    assert params[1]["self_attn.q_proj"][1].shape == (2, 2 * 4 * 16)
    assert params[0]["linear_attn.in_proj_qkv"][1].shape == (2, 2 * 2 * 16 + 4 * 16)
    assert params[0]["linear_attn.in_proj_b"][1].shape == (2, 4)
    assert params[0]["linear_attn.out_proj"][0].shape == (4 * 16, 2)
    keys = resolve_keys(["q_proj", "in_proj_qkv"], "keys", args)
    narrow = init_lora(args, LoRAConfig(rank=2, keys=keys, num_layers=3))
    assert {i: tuple(m) for i, m in narrow.items()} == {1: ("self_attn.q_proj",), 2: ("linear_attn.in_proj_qkv",),
                                                        3: ("self_attn.q_proj",)}
    only_full = init_lora(args, LoRAConfig(rank=2, keys=resolve_keys(["o_proj"], "keys", args), num_layers=1))
    assert list(only_full) == [3]
    with pytest.raises(ValueError, match="'qkv_proj' matches no projection") as e:
        resolve_keys(["qkv_proj"], "keys", args)
    assert "\n" not in str(e.value)


def mlx_lm_names(num_layers, keys):
    """The adapter parameter names of mlx-lm's own Qwen3.5 model after its LoRA conversion."""
    from mlx_lm.models.qwen3_5 import Model, ModelArgs
    from mlx_lm.tuner.utils import linear_to_lora_layers
    model = Model(ModelArgs.from_dict(dict(CONFIG)))
    model.freeze()
    linear_to_lora_layers(model, num_layers, {"rank": 2, "scale": 10.0, "dropout": 0.0, "keys": keys})
    return {k: v.shape for k, v in tree_flatten(model.trainable_parameters())}


@pytest.mark.parametrize("short,num_layers", [(None, -1), (["q_proj", "in_proj_qkv", "down_proj"], 3)])
def test_adapter_names_are_mlx_lms(tmp_path, short, num_layers):
    """The adapter file's names and shapes are exactly mlx-lm's Qwen3.5 LoRA parameters (its default keys: every
    Linear; or the keys named), mlx-lm loads it, and it reads back to the same parameters."""
    from mlx_lm.models.qwen3_5 import Model, ModelArgs
    from mlx_lm.tuner.utils import load_adapters
    store = load_model(str(write_tiny(tmp_path / "q", "qwen3_5")), quantize=None)
    args = store.args
    keys = resolve_keys(short, "keys", args) if short else args.projections()
    lora = LoRAConfig(rank=2, scale=10.0, keys=keys, num_layers=num_layers)
    params = init_lora(args, lora, seed=1)
    params = {i: {p: (a, mx.random.normal(b.shape, key=mx.random.key(i))) for p, (a, b) in m.items()}
              for i, m in params.items()}
    ad = tmp_path / "ad"
    save_adapter(ad, params, lora, store.path)
    written = {k: v.shape for k, v in mx.load(str(ad / "adapters.safetensors")).items()}
    assert written == mlx_lm_names(num_layers, None if short is None else set(keys))
    model = Model(ModelArgs.from_dict(dict(CONFIG)))
    load_adapters(model, str(ad))
    loaded = dict(tree_flatten(model.parameters()))
    for k, v in mx.load(str(ad / "adapters.safetensors")).items():
        assert np.array_equal(np.array(loaded[k]), np.array(v)), k
    got_lora, expected = read_config(ad, store)
    assert expected == {k: tuple(v.shape) for k, v in to_flat(params).items()}
    back = load_adapter_weights(ad / "adapters.safetensors", expected, store=store)
    assert to_flat(back).keys() == to_flat(params).keys()
    for k, v in to_flat(params).items():
        assert np.array_equal(np.array(to_flat(back)[k]), np.array(v)), k


def test_adapter_without_mlx_lms_prefix_is_refused(tmp_path):
    """Names without `language_model.` would be ignored by mlx-lm: such a file is refused, naming what is missing."""
    store = load_model(str(write_tiny(tmp_path / "q", "qwen3_5")), quantize=None)
    params = init_lora(store.args, LoRAConfig(rank=2, keys=store.args.projections()))
    mx.save_safetensors(str(tmp_path / "plain.safetensors"), to_flat(params))
    expected = {k: tuple(v.shape) for k, v in to_flat(params).items()}
    with pytest.raises(SourceError, match="language_model.model.layers") as e:
        load_adapter_weights(tmp_path / "plain.safetensors", expected, store=store)
    assert "\n" not in str(e.value)


def test_fused_folder_loads_in_mlx_lm(tmp_path):
    """The fused folder is read by mlx-lm as qwen3_5 with the merged projections, every other tensor as the store
    holds it (norms not shifted again, conv taps, A_log in fp32)."""
    from mlx_lm.utils import load_model as mlx_load
    store = load_model(str(write_hf(tmp_path / "hf", extra=False)), quantize=None)
    keys = resolve_keys(["in_proj_z", "q_proj"], "keys", store.args)
    lora = LoRAConfig(rank=2, scale=3.0, keys=keys)
    params = init_lora(store.args, lora, seed=2)
    params = {i: {p: (a, 0.1 * mx.random.normal(b.shape, key=mx.random.key(7 + i))) for p, (a, b) in m.items()}
              for i, m in params.items()}
    save_adapter(tmp_path / "ad", params, lora, store.path)
    out, _ = export_adapter(tmp_path / "ad", "fused", tmp_path / "fused", dtype="float32")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen3_5" and config["architectures"] == ["Qwen3_5ForConditionalGeneration"]
    fused, _ = mlx_load(out)
    base, _ = mlx_load(store.path)
    got, ref = dict(tree_flatten(fused.parameters())), dict(tree_flatten(base.parameters()))
    assert sorted(got) == sorted(ref)
    assert got["language_model.model.layers.0.linear_attn.A_log"].dtype == mx.float32
    merged = {f"language_model.model.layers.{i}.{p}.weight": (a, b) for i, m in params.items() for p, (a, b) in m.items()}
    for k in ref:
        want = ref[k] + 3.0 * (merged[k][0] @ merged[k][1]).T if k in merged else ref[k]
        assert np.allclose(np.array(got[k]), np.array(want), rtol=1e-6, atol=1e-6), k


@pytest.mark.parametrize("quantized", [True, False])
def test_make_model_presets_load_in_both(tmp_path, quantized):
    """tools/make_model.py's Qwen3.5 presets (real shapes, 4 layers, a small vocabulary): mlx-lm's form quantized
    (the small linear-attention tensors not), or Hugging Face's unquantized; our store of it is read by mlx-lm to
    the same parameters as the directory itself."""
    import sys
    from pathlib import Path
    from mlx_lm.utils import load_model as mlx_load
    sys.path.insert(0, str(Path(__file__).parents[1] / "tools"))
    import make_model
    out = make_model.make_model("qwen3.5-0.8b", tmp_path / "m", layers=4, vocab=300, quantized=quantized)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen3_5" and config["text_config"]["hidden_size"] == 1024
    assert config["text_config"]["num_hidden_layers"] == 4 and config["text_config"]["linear_num_value_heads"] == 16
    weights = mx.load(str(out / "model.safetensors"))
    prefix = "language_model.model." if quantized else "model.language_model."
    a = prefix + "layers.0.linear_attn."
    assert weights[a + "A_log"].dtype == mx.float32 and (a + "conv1d.scales") not in weights
    assert (a + "in_proj_b.scales" in weights) == quantized
    store = load_model(str(out), quantize=None)
    assert store.args.linear(0) and not store.args.linear(3) and store.layer(0)["linear_attn.conv1d"].shape == (6144, 4)
    ref, _ = mlx_load(out)
    got, _ = mlx_load(store.path)
    want, have = dict(tree_flatten(ref.parameters())), dict(tree_flatten(got.parameters()))
    assert sorted(want) == sorted(have)
    for k in want:
        assert want[k].dtype == have[k].dtype and mx.array_equal(want[k], have[k]).item(), k


def test_mixed_precision_mlx_lm_checkpoint(tmp_path):
    """An mlx-lm checkpoint quantized with a per-module entry (in_proj_b at 8 bits, the rest 4) keeps it: the
    store reads that module at 8 bits (the entry renamed into the store's naming), and mlx-lm reads the store to
    the checkpoint's parameters."""
    from mlx_lm.utils import load_model as mlx_load
    src = write_mlx_community(tmp_path / "community")
    weights = mx.load(str(src / "model.safetensors"))
    special = "language_model.model.layers.0.linear_attn.in_proj_b"
    out = {}
    for name, arr in weights.items():
        module = name[:-len(".weight")]
        if name.endswith("proj.weight") or name.endswith(("in_proj_b.weight", "in_proj_a.weight", "in_proj_z.weight",
                                                          "in_proj_qkv.weight")):
            bits = 8 if module == special else 4
            w, s, b = mx.quantize(arr, group_size=32, bits=bits)
            out.update({name: w, f"{module}.scales": s, f"{module}.biases": b})
        else:
            out[name] = arr
    mx.save_safetensors(str(src / "model.safetensors"), out)
    config = json.loads((src / "config.json").read_text())
    config["quantization"] = {"group_size": 32, "bits": 4, special: {"group_size": 32, "bits": 8}}
    (src / "config.json").write_text(json.dumps(config))
    store = load_model(str(src))
    assert store.layer(0)["linear_attn.in_proj_b"].bits == 8 and store.layer(0)["linear_attn.in_proj_a"].bits == 4
    ref, _ = mlx_load(src)
    got, _ = mlx_load(store.path)
    want, have = dict(tree_flatten(ref.parameters())), dict(tree_flatten(got.parameters()))
    assert sorted(want) == sorted(have)
    for k in want:
        assert want[k].dtype == have[k].dtype and mx.array_equal(want[k], have[k]).item(), k


def test_keys_no_adapted_block_has_are_refused(tmp_path):
    """--keys q_proj --num-layers 1 on a model whose last block is a linear-attention one would train nothing."""
    from mesp_mlx.config import TrainConfig
    from mesp_mlx.errors import ConfigError
    from mesp_mlx.trainer import Trainer
    d = write_tiny(tmp_path / "q", "qwen3_5", num_hidden_layers=3)  # layers 0, 2 linear, 1 full
    with pytest.raises(ConfigError, match="none of the last 1 block") as e:
        Trainer(TrainConfig(model=str(d), keys=["q_proj"], num_layers=1, device="cpu"), log=lambda *a, **k: None)
    assert "\n" not in str(e.value)
