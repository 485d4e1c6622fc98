"""Adapter export and import (issue 17): GGUF LoRA as llama.cpp reads it, PEFT, the exact fuse, round trips.

References are written from each format's own formula on that format's own base weights, read with independent readers
(the `gguf` package, `safetensors.numpy`, mlx-lm's loader). Tolerance: fp32 on the CPU. The compared quantities are the
same sums taken in a different order (x W^T + s (x A) B against x (W + s (A B)^T)^T, or a rope on permuted rows), so
they agree to a few ulp times sqrt(K) for K <= 160 terms: far below the 1e-5 bound on max |a - b| / max |b| used here.
llama.cpp itself, every family and both sources: tests/test_conformance.py. Not tested: `peft` itself (it needs
torch, which this project does not install); its formula is.
"""
import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from builders import write_tiny, write_tiny_gguf
from mesp_mlx.io import SourceError
from mesp_mlx.io.formats import export_adapter
from mesp_mlx.io.formats import load_adapter_weights
from mesp_mlx.io.adapters import save_adapter
from mesp_mlx.io.sources import load_model
from mesp_mlx.lora import LoRAConfig, init_lora, to_flat
from mesp_mlx.model import logits
from mesp_mlx.ops.linear import dense

TOL = 1e-5
LORA = LoRAConfig(rank=4, scale=2.5)  # alpha = 10
QK = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k"}
GGUF = {**QK, "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def llamacpp_permute(arr, n):
    """llama.cpp's converter on axis 0, as builders.write_tiny_gguf applies it (written out again here on purpose)."""
    return arr.reshape(n, 2, arr.shape[0] // n // 2, *arr.shape[1:]).swapaxes(1, 2).reshape(arr.shape)


def random_params(store, seed):
    """All seven projections of every block, with a nonzero B (init_lora's B is zero, which would test nothing)."""
    params = init_lora(store.args, LORA, seed)
    rng = np.random.default_rng(seed)
    return {i: {p: (a, mx.array(rng.normal(0, 0.05, b.shape).astype(np.float32))) for p, (a, b) in mods.items()}
            for i, mods in params.items()}


def expected(params):
    return {k: tuple(v.shape) for k, v in to_flat(params).items()}


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """One tiny Llama twice: as a GGUF (q/k rows permuted by llama.cpp's converter) and as a Hugging Face directory
    with the same weights; both converted dense (quantize=None) so each store is exactly its source. Each store gets
    an adapter folder with its own random parameters."""
    root = tmp_path_factory.mktemp("llama")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MESP_MLX_CACHE", str(root / "cache"))
        config, weights = write_tiny_gguf(root / "l.gguf", "llama", "F32")
        hf = root / "hf"
        hf.mkdir()
        (hf / "config.json").write_text(json.dumps(config))
        mx.save_safetensors(str(hf / "model.safetensors"), {k: mx.array(v) for k, v in weights.items()})
        out = {"root": root, "gguf_file": root / "l.gguf", "hf_weights": weights, "config": config}
        for kind, src in (("gguf", root / "l.gguf"), ("hf", hf)):
            store = load_model(str(src), quantize=None)
            params = random_params(store, seed=3)
            save_adapter(root / f"ad-{kind}", params, LORA, store.path)
            out[kind] = (store, params, root / f"ad-{kind}")
    return out


def gguf_tensors(path):
    import gguf
    reader = gguf.GGUFReader(str(path))
    return reader, {t.name: t for t in reader.tensors}


def gguf_array(t):
    """A tensor as numpy in the shape ggml's ne gives reversed (rows = ne[1])."""
    import gguf.quants
    return gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape([int(s) for s in reversed(t.shape)])


@pytest.mark.parametrize("source", ["gguf", "hf"])
def test_gguf_lora_is_llamacpp_layout_and_formula(llama, source):
    """Metadata, names and ne shapes as llama.cpp's loader checks them; then llama.cpp's formula
    y = W x + (alpha / r) B (A x) on the base GGUF's own (permuted) weights reproduces every adapted projection of
    ours, after the test's own permutation of q/k outputs when the store came from a Hugging Face directory."""
    store, params, ad = llama[source]
    out = llama["root"] / f"{source}.gguf"
    export_adapter(ad, "gguf", out)
    reader, lora = gguf_tensors(out)
    field = lambda k: reader.fields[k].contents()
    assert field("general.type") == "adapter" and field("adapter.type") == "lora"
    assert field("general.architecture") == "llama"
    alpha = field("adapter.lora.alpha")
    assert alpha == LORA.scale * LORA.rank
    n = store.num_layers
    assert set(lora) == {f"blk.{i}.{g}.weight.lora_{ab}" for i in range(n) for g in GGUF.values() for ab in "ab"}
    _, base = gguf_tensors(llama["gguf_file"])
    heads = {"self_attn.q_proj": store.args.num_attention_heads, "self_attn.k_proj": store.args.num_key_value_heads}
    rng = np.random.default_rng(0)
    worst = 0.0
    for i in range(n):
        frozen = store.layer(i)
        for path, g in GGUF.items():
            w = base[f"blk.{i}.{g}.weight"]
            ta, tb = lora[f"blk.{i}.{g}.weight.lora_a"], lora[f"blk.{i}.{g}.weight.lora_b"]
            # llama.cpp: ne(W) = [in, out], ne(a) = [in, r], ne(b) = [r, out]
            assert list(ta.shape) == [w.shape[0], LORA.rank] and list(tb.shape) == [LORA.rank, w.shape[1]]
            W, A, B = gguf_array(w), gguf_array(ta), gguf_array(tb)
            x = rng.normal(size=(5, W.shape[1])).astype(np.float32)
            ref = x @ W.T + (alpha / B.shape[1]) * (x @ A.T) @ B.T
            a, b = params[i][path]
            ours = np.array(mx.array(x) @ dense(frozen[path]).T + LORA.scale * (mx.array(x) @ a) @ b)
            if source == "hf" and path in heads:
                ours = llamacpp_permute(ours.T, heads[path]).T
            worst = max(worst, rel(ours, ref))
    assert worst <= TOL, worst


def test_llama_row_order_end_to_end(llama):
    """The same model as two stores in two row orders: an adapter trained on the HF-sourced store, exported to GGUF
    and imported into the GGUF-sourced store (and the reverse through PEFT) gives the same logits."""
    (gs, gp, gad), (hs, hp, had) = llama["gguf"], llama["hf"]
    ids = mx.array([[1, 17, 42, 5, 99, 7, 250, 3]])
    export_adapter(had, "gguf", llama["root"] / "h2g.gguf")
    moved = load_adapter_weights(llama["root"] / "h2g.gguf", expected(hp), LORA.scale, store=gs)
    ref = np.array(logits(hs, ids, hp, LORA.scale))
    assert rel(logits(gs, ids, moved, LORA.scale), ref) <= TOL
    # the permutation matters: the same numbers in HF order on the GGUF store are a different model
    assert rel(logits(gs, ids, hp, LORA.scale), ref) > 1e-3
    export_adapter(gad, "peft", llama["root"] / "g2h")
    moved = load_adapter_weights(llama["root"] / "g2h", expected(gp), LORA.scale, store=hs)
    assert rel(logits(hs, ids, moved, LORA.scale), np.array(logits(gs, ids, gp, LORA.scale))) <= TOL


def test_peft_tensors_follow_peft_formula(llama):
    """PEFT names, shapes and config; y = W x + (lora_alpha / r) B A x on the Hugging Face weights reproduces our
    projections from the GGUF-sourced store (whose q/k outputs the test un-permutes by inverting llama.cpp's map)."""
    from safetensors.numpy import load_file
    store, params, ad = llama["gguf"]
    out = llama["root"] / "peft"
    export_adapter(ad, "peft", out)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM" and cfg["r"] == LORA.rank
    assert cfg["lora_alpha"] == LORA.scale * LORA.rank
    # what transformers can load: the GGUF's directory, the file named in the README (`gguf_file=`)
    assert cfg["base_model_name_or_path"] == str(llama["gguf_file"].parent)
    assert 'gguf_file="l.gguf"' in (out / "README.md").read_text()
    assert sorted(cfg["target_modules"]) == sorted(p.split(".")[-1] for p in GGUF)
    tensors = load_file(str(out / "adapter_model.safetensors"))
    hf = llama["hf_weights"]
    heads = {"self_attn.q_proj": store.args.num_attention_heads, "self_attn.k_proj": store.args.num_key_value_heads}
    s = cfg["lora_alpha"] / cfg["r"]
    rng = np.random.default_rng(1)
    worst = 0.0
    for i in range(store.num_layers):
        frozen = store.layer(i)
        for path in GGUF:
            name = f"base_model.model.model.layers.{i}.{path}"
            A, B, W = tensors[f"{name}.lora_A.weight"], tensors[f"{name}.lora_B.weight"], hf[f"model.layers.{i}."
                                                                                                f"{path}.weight"]
            assert A.shape == (LORA.rank, W.shape[1]) and B.shape == (W.shape[0], LORA.rank)
            x = rng.normal(size=(5, W.shape[1])).astype(np.float32)
            ref = x @ W.T + s * (x @ A.T) @ B.T
            a, b = params[i][path]
            ours = np.array(mx.array(x) @ dense(frozen[path]).T + LORA.scale * (mx.array(x) @ a) @ b)
            if path in heads:  # invert the converter's permutation: find where each HF row went
                n = ours.shape[1]
                where = llamacpp_permute(np.arange(n), heads[path])
                inv = np.empty(n, int)
                inv[where] = np.arange(n)
                ours = ours[:, inv]
            worst = max(worst, rel(ours, ref))
    assert worst <= TOL, worst


@pytest.mark.parametrize("fmt", ["peft", "gguf", "mlx-lm"])
@pytest.mark.parametrize("source", ["gguf", "hf"])
def test_round_trip_is_bit_for_bit(llama, source, fmt):
    store, params, ad = llama[source]
    out = llama["root"] / f"rt-{source}-{fmt}"
    path, _ = export_adapter(ad, fmt, out)
    if fmt == "mlx-lm":
        path = path / "adapters.safetensors"
    back = load_adapter_weights(path, expected(params), LORA.scale, store=store)
    for name, arr in to_flat(params).items():
        assert np.array_equal(np.array(to_flat(back)[name]), np.array(arr)), name


def test_import_with_another_scale_rescales_b(llama, capsys):
    store, params, ad = llama["hf"]
    export_adapter(ad, "peft", llama["root"] / "rescale")
    back = load_adapter_weights(llama["root"] / "rescale" / "adapter_model.safetensors", expected(params), 5.0,
                                store=store)
    assert "trained with scale 2.5, this run uses 5" in capsys.readouterr().err
    a, b = params[0]["mlp.up_proj"]
    assert np.array_equal(np.array(back[0]["mlp.up_proj"][0]), np.array(a))
    assert np.allclose(5.0 * np.array(back[0]["mlp.up_proj"][1]), 2.5 * np.array(b), rtol=1e-6, atol=0)


def test_fused_llama_from_gguf_equals_adapted(llama):
    """Merged fp32 weights in Hugging Face row order (rope_traditional dropped), loaded by mlx-lm itself."""
    from mlx_lm.utils import load_model as mlx_lm_load
    store, params, ad = llama["gguf"]
    out, lines = export_adapter(ad, "fused", llama["root"] / "fused", dtype="float32")
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization" not in cfg and not cfg.get("rope_traditional")
    assert (out / "tokenizer.json").exists()
    model, _ = mlx_lm_load(Path(out))
    ids = mx.array([[1, 17, 42, 5, 99, 7, 250, 3]])
    ref = np.array(logits(store, ids, params, LORA.scale))
    assert rel(model(ids), ref) <= TOL
    assert "max |logit error|" in lines[0]

    # re-quantized: the error it reports is the one mlx-lm's model shows on the same probe tokens
    from mesp_mlx.io.formats import fused
    q_out = llama["root"] / "fused-q4"
    msg, err = fused.write(params, LORA, store, q_out, "float32", quantize=(64, 4), probe_tokens=16)
    model, _ = mlx_lm_load(Path(q_out))
    probe = mx.array([[(7 + 31 * k) % store.args.vocab_size for k in range(16)]])
    ref = np.array(logits(store, probe, params, LORA.scale))
    measured = rel(model(probe), ref)
    # same 4-bit weights on both sides; only the order of fp32 sums differs (mlx-lm's quantized kernel vs ours)
    assert abs(err - measured) <= 1e-4 and err > 1e-3, (err, measured)
    assert f"{err:.2e}" in msg


def test_fused_qwen2_from_quantized_store(tmp_path):
    """A 4-bit store (dequantized exactly on export) with q/k/v biases; float32 output."""
    from mlx_lm.utils import load_model as mlx_lm_load
    store = load_model(str(write_tiny(tmp_path / "q", "qwen2")))
    params = random_params(store, seed=5)
    save_adapter(tmp_path / "ad", params, LORA, store.path)
    out, _ = export_adapter(tmp_path / "ad", "fused", tmp_path / "fused", dtype="float32")
    model, _ = mlx_lm_load(Path(out))
    ids = mx.array([[1, 17, 42, 5, 99, 7, 150, 3]])
    assert rel(model(ids), np.array(logits(store, ids, params, LORA.scale))) <= TOL


def cli(capsys, *argv):
    from mesp_mlx.export import main
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr()


def test_cli_writes_and_states_the_scale(llama, capsys):
    out = llama["root"] / "cli.gguf"
    rc, io = cli(capsys, "--adapter-path", llama["hf"][2], "--format", "gguf", "--out", out)
    assert rc == 0 and out.exists()
    assert "adapter.lora.alpha = 10 with rank 4; llama.cpp applies alpha / rank = 2.5" in io.out


def test_cli_bad_inputs_are_one_line_errors(llama, tmp_path, capsys):
    missing = tmp_path / "nope"
    rc, io = cli(capsys, "--adapter-path", missing, "--format", "gguf")
    assert rc == 2 and io.err.count("\n") == 1 and io.err.startswith("error: ") and str(missing) in io.err
    rc, io = cli(capsys, "--adapter-path", llama["hf"][2], "--format", "onnx")
    assert rc == 2 and io.err.count("\n") == 1 and "'onnx' is not one of mlx-lm, gguf, peft, fused" in io.err
    other = write_tiny(tmp_path / "qwen3", "qwen3")  # same hidden size, other head layout and MLP width
    rc, io = cli(capsys, "--adapter-path", llama["hf"][2], "--format", "peft", "--model", other)
    assert rc == 2 and io.err.count("\n") == 1 and "adapters.safetensors: adapter does not fit the model" in io.err
    with pytest.raises(SourceError, match="not a GGUF LoRA adapter"):
        load_adapter_weights(llama["gguf_file"], {}, store=llama["gguf"][0])
