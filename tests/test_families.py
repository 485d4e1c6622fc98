"""The families beyond Llama / Qwen: Gemma 3 (text, and the language model of a multimodal checkpoint), Mistral,
SmolLM3, Phi-3 / Phi-4-mini. Logits and gradients on the tiny models of every family are in test_models.py and
test_engines.py (builders.TINY); here: GGUF sources, sliding windows that bind, fp64 exactness, the CLI's adapter
in mlx-lm, and the one-line refusals."""
import json
import shutil

import mlx.core as mx
import pytest

from builders import TINY, tiny_weights, write_tiny, write_tiny_gguf
from helpers import EXACT, mlx_lm_model, rel_err, sft_batch
from mesp_mlx.engines import make_engine
from mesp_mlx.io import SourceError
from mesp_mlx.io.sources import load_model
from mesp_mlx.lora import LoRAConfig, init_lora, tree_map
from mesp_mlx.model import logits
from mesp_mlx.ops.linear import Compute

NEW = ("gemma3_text", "mistral", "smollm3", "phi3")


def ids_of(vocab, t, seed=0):
    return mx.random.randint(0, vocab, (2, t), key=mx.random.key(seed))


@pytest.mark.parametrize("arch,overrides,original", [
    # llama.cpp records neither Gemma 3's layer pattern (6) nor its query scalar (head_dim): the original says so
    ("gemma3_text", dict(sliding_window_pattern=6, num_hidden_layers=6, query_pre_attn_scalar=16,
                         rope_scaling=None), {}),
    # llama.cpp writes Mistral as a llama GGUF (q/k rows permuted), without a window
    ("mistral", dict(sliding_window=None, layer_types=None), {}),
    # Phi-3.5-mini-like: LongRoPE (factors as tensors), RoPE on 12 of 16 features, untied head
    ("phi3", {}, {}),
    # Phi-4-mini-like: the same with a tied head
    ("phi3", dict(tie_word_embeddings=True), {}),
    # Phi-3-mini-4k-like: no scaling, every feature rotated, a sliding window (ignored by mlx-lm's Phi-3 and ours)
    ("phi3", dict(rope_scaling=None, partial_rotary_factor=1.0, max_position_embeddings=64, sliding_window=2047), {}),
    # SmolLM3: q/k rows permuted as for Llama; the file does not record no_rope_layers, llama.cpp's fixed interval
    # (every fourth layer without RoPE) is what the original's list says
    ("smollm3", dict(num_hidden_layers=4, no_rope_layers=[1, 1, 1, 0]), {})])
def test_gguf_matches_original(tmp_path, arch, overrides, original):
    f = tmp_path / "m.gguf"
    write_tiny_gguf(f, arch, "F32", **overrides)
    orig = write_tiny(tmp_path / "orig", arch, vocab_size=300, **overrides)
    store = load_model(str(f), quantize=None)
    ids = ids_of(300, 20)  # T = 20 > Gemma's window of 5
    ours = logits(store, ids)
    err = rel_err(ours, mlx_lm_model(orig)(ids))
    assert err < EXACT, err
    assert rel_err(ours, mlx_lm_model(store.path)(ids)) < EXACT  # mlx-lm reads our store the same way
    if arch == "gemma3_text":  # the store holds w, not llama.cpp's 1 + w
        w = mx.load(str(orig / "model.safetensors"))["model.layers.0.post_feedforward_layernorm.weight"]
        assert rel_err(store.layer(0)["post_feedforward_layernorm"], w) < 1e-6
    w = mx.load(str(orig / "model.safetensors"))
    if arch == "phi3":  # fused projections stored as they are (no permutation), LongRoPE factors in the config
        for module in ("self_attn.qkv_proj", "mlp.gate_up_proj"):
            assert mx.array_equal(store.layer(1)[module].weight, w[f"model.layers.1.{module}.weight"])
        want = dict(TINY["phi3"], **overrides)
        assert not store.args.rope_traditional and store.args.partial_rotary_factor == want["partial_rotary_factor"]
        assert store.args.original_max_position_embeddings == want["original_max_position_embeddings"]
        assert store.config.get("rope_scaling") == (want["rope_scaling"] and dict(want["rope_scaling"]))
        stored = [k for f in store.path.glob("*.safetensors") for k in mx.load(str(f))]
        assert not any("rope_factors" in k for k in stored)
    if arch == "smollm3":  # q/k rows permuted (read with the traditional rope); layer 4 without RoPE
        assert store.args.rope_traditional
        assert [spec.rope is not None for spec in store.args.block_specs()] == [True, True, True, False]
        assert not mx.array_equal(store.layer(0)["self_attn.q_proj"].weight, w["model.layers.0.self_attn.q_proj.weight"])


def test_gemma3_quantized_gguf(tmp_path):
    f = tmp_path / "m.gguf"
    write_tiny_gguf(f, "gemma3_text", "Q8_0", sliding_window_pattern=6, num_hidden_layers=6, query_pre_attn_scalar=16,
                    hidden_size=64, rope_scaling=None)
    store = load_model(str(f))
    assert store.args.model_type == "gemma3_text" and store.layer(0)["mlp.up_proj"].quantized
    ids = ids_of(300, 9)
    assert rel_err(logits(store, ids), mlx_lm_model(store.path)(ids)) < EXACT


# Q8_0 needs rows of whole 32-blocks: Phi-3's MLP width 96 (down_proj's rows are 80 long otherwise)
QUANTIZED_GGUF = {"phi3": dict(intermediate_size=96), "smollm3": dict(num_hidden_layers=4, no_rope_layers=None)}


@pytest.mark.parametrize("arch", sorted(QUANTIZED_GGUF))
def test_quantized_gguf(tmp_path, arch):
    """Q8_0 files of the fused (Phi-3) and permuted NoPE (SmolLM3) families: repacked exactly, read as mlx-lm reads
    our store."""
    f = tmp_path / "m.gguf"
    write_tiny_gguf(f, arch, "Q8_0", **QUANTIZED_GGUF[arch])
    store = load_model(str(f))
    module = "mlp.gate_up_proj" if arch == "phi3" else "mlp.up_proj"
    assert store.args.model_type == arch and store.layer(0)[module].quantized
    ids = ids_of(300, 9)
    assert rel_err(logits(store, ids), mlx_lm_model(store.path)(ids)) < EXACT


def test_gemma3_multimodal_checkpoint_trains_its_language_model(tmp_path):
    """A `gemma3` (vision + text) directory: its language model, stored on its own, is the text model."""
    text = write_tiny(tmp_path / "text", "gemma3_text")
    d = tmp_path / "mm"
    d.mkdir()
    cfg = {k: v for k, v in TINY["gemma3_text"].items() if k not in ("model_type", "vocab_size")}
    (d / "config.json").write_text(json.dumps({"model_type": "gemma3", "vocab_size": TINY["gemma3_text"]["vocab_size"],
                                               "text_config": cfg, "vision_config": {"hidden_size": 8}}))
    weights = {"language_model." + k: v for k, v in tiny_weights(TINY["gemma3_text"]).items()}
    weights.update({"vision_tower.encoder.weight": mx.zeros((8, 8)), "multi_modal_projector.proj.weight":
                    mx.zeros((8, 48))})
    mx.save_safetensors(str(d / "model.safetensors"), weights)
    store = load_model(str(d), quantize=None)
    ids = ids_of(190, 12)
    assert mx.array_equal(logits(store, ids), logits(load_model(str(text), quantize=None), ids))


def test_windows_bind(tmp_path):
    """The tiny models' windows (5 and 6 keys) are shorter than the sequence: without them the logits change, so
    the equality with mlx-lm in test_models sees them. Mistral's sliding_window alone (Hugging Face's reading: every
    layer) is the same as naming every layer sliding."""
    ids = ids_of(190, 12)
    ref = logits(load_model(str(write_tiny(tmp_path / "g", "gemma3_text")), quantize=None), ids)
    wide = logits(load_model(str(write_tiny(tmp_path / "gw", "gemma3_text", sliding_window=512)), quantize=None), ids)
    assert rel_err(wide, ref) > 1e-3
    assert mx.array_equal(wide[:, :5], ref[:, :5])  # within the window nothing changes
    ids = ids_of(181, 12)
    base = dict(layer_types=None, num_hidden_layers=2)
    alone = load_model(str(write_tiny(tmp_path / "m1", "mistral", **base)), quantize=None)
    named = load_model(str(write_tiny(tmp_path / "m2", "mistral", layer_types=["sliding_attention"] * 2,
                                      num_hidden_layers=2)), quantize=None)
    none = load_model(str(write_tiny(tmp_path / "m3", "mistral", sliding_window=None, **base)), quantize=None)
    assert [s.window for s in alone.args.block_specs()] == [6, 6]
    assert mx.array_equal(logits(alone, ids), logits(named, ids))
    assert rel_err(logits(alone, ids), logits(none, ids)) > 1e-3


@pytest.mark.parametrize("arch", ["gemma3_text", "phi3", "smollm3", "qwen3_5"])
def test_fp64_gradients_exact(tmp_path, arch):
    """In fp64 a wrong term cannot hide in rounding. MLX evaluates exp in fp32 precision even for float64 (the
    attention backward against its vjp differs by ~1e-7 in fp64 for that reason alone), so MeSP's gradients
    equal autodiff's to a few 1e-7 (measured 0.9-1.5e-7 on these models), not to fp64 roundoff; 1e-6 holds that
    with margin while a wrong scale, sign or missing term is off by 1e-3 or more."""
    store = load_model(str(write_tiny(tmp_path / arch, arch)), quantize=None)
    with mx.stream(mx.cpu):
        params = init_lora(store.args, LoRAConfig(rank=4), seed=1)
        params = tree_map(lambda t: (t + 0.02 * mx.random.normal(t.shape, key=mx.random.key(t.size)))
                          .astype(mx.float64), params)
        ids = ids_of(store.args.vocab_size, 17)
        batch = sft_batch(ids[:, :-1], ids[:, 1:], mx.ones((2, 16)))
        compute = Compute(dtype=mx.float64, attn_chunk=4, mlp_chunk=6, vocab_chunk=64, token_chunk=7, delta_chunk=5)
        _, ref = make_engine("autodiff", store, 20.0, compute=Compute(dtype=mx.float64)).loss_and_grad(params, batch)
        _, got = make_engine("mesp", store, 20.0, compute=compute).loss_and_grad(params, batch)
        worst = max(rel_err(got[i][p][k], ref[i][p][k]) for i in ref for p in ref[i] for k in (0, 1))
    assert worst < 1e-6, worst


def write_data(d):
    d.mkdir()
    rows = [{"text": "the quick brown fox jumps over the lazy dog"}] * 6
    for split in ("train", "valid"):
        (d / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return d


@pytest.mark.parametrize("arch,from_gguf", [(a, a == "gemma3_text") for a in NEW + ("qwen3_5",)] +
                         [(a, True) for a in sorted(QUANTIZED_GGUF)])
def test_cli_adapter_loads_in_mlx_lm(tmp_path, tiny_gguf, arch, from_gguf):
    """One training run per family (and from a GGUF for Gemma 3, Phi-3 and SmolLM3); mlx_lm.load(...,
    adapter_path=...) takes the adapter as its own (same module names and shapes, Phi-3's fused ones included) and
    gives our logits (fp32 base on both sides, as in test_train)."""
    from mesp_mlx.train import main
    if arch == "gemma3_text":  # from a GGUF, as most people get Gemma 3
        model = tmp_path / "g.gguf"
        write_tiny_gguf(model, arch, "Q8_0", sliding_window_pattern=6, num_hidden_layers=6, query_pre_attn_scalar=16,
                        hidden_size=64)
    elif from_gguf:  # a Q8_0 file with its own tokenizer
        model = tmp_path / "m.gguf"
        write_tiny_gguf(model, arch, "Q8_0", **QUANTIZED_GGUF[arch])
    else:  # a Hugging Face directory, with the tiny GGUF's tokenizer
        model = write_tiny(tmp_path / arch, arch, vocab_size=300)
        tok = load_model(str(tiny_gguf)).path
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tok / name, model / name)
    out = tmp_path / "ad"
    assert main(["--model", str(model), "--data", str(write_data(tmp_path / "data")), "--iters", "2",
                 "--method", "mesp", "--adapter-path", str(out), "--sample-prompt", "", "--rank", "4",
                 "--learning-rate", "1e-2"]) == 0
    store = load_model(str(model))
    from mesp_mlx.lora import from_flat
    params = from_flat(mx.load(str(out / "adapters.safetensors")))
    assert set(params[0]) == set(store.args.projections(0))
    scale = json.loads((out / "adapter_config.json").read_text())["lora_parameters"]["scale"]
    ids = mx.array([[5, 17, 42, 99, 3, 250, 7, 8, 9, 10]])
    ours = logits(store, ids, params, scale)
    err = rel_err(ours, mlx_lm_model(store.path, out)(ids))
    assert err <= EXACT, err
    assert rel_err(logits(store, ids), ours) > 1e-4  # the adapter is applied (and trained)


def test_refusals(tmp_path):
    def error(d):
        with pytest.raises(SourceError) as e:
            load_model(str(d))
        msg = str(e.value)
        assert "\n" not in msg and "config.json" in msg
        return msg

    d = write_tiny(tmp_path / "m", "llama")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(dict(cfg, model_type="gpt_neox")))
    msg = error(d)
    assert all(name in msg for name in ("gemma3_text", "mistral", "phi3", "smollm3", "qwen3"))
    for arch, bad, words in [("gemma3_text", dict(final_logit_softcapping=30.0), "final_logit_softcapping"),
                             ("gemma3_text", dict(attn_logit_softcapping=50.0), "attn_logit_softcapping"),
                             ("gemma3_text", dict(hidden_activation="relu"), "hidden_activation"),
                             ("phi3", dict(rope_scaling={"type": "yarn", "factor": 2.0}), "rope_scaling"),
                             ("phi3", dict(rope_scaling={"type": "longrope", "long_factor": [1.0] * 5,
                                                         "short_factor": [1.0] * 5}), "long_factor"),
                             ("smollm3", dict(no_rope_layers=[1, 0]), "no_rope_layers"),
                             ("mistral", dict(layer_types=["sliding_attention", "chunked_attention",
                                                           "full_attention"]), "layer_types")]:
        d = write_tiny(tmp_path / f"{arch}-{words}", arch, **bad)
        assert words in error(d), (arch, bad)


def test_gguf_architecture_refusal(tmp_path):
    """A GGUF of an architecture we do not read is refused in one line that names those we do."""
    import gguf
    import numpy as np
    f = tmp_path / "phi2.gguf"
    w = gguf.GGUFWriter(str(f), "phi2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(SourceError) as e:
        load_model(str(f))
    msg = str(e.value)
    assert "\n" not in msg and "'phi2'" in msg
    assert all(name in msg for name in ("llama", "qwen2", "qwen3", "gemma3", "phi3", "smollm3"))
