"""Smoke runs of the benchmark tools on a tiny model, so that they cannot rot (the full runs are not in CI)."""
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

from helpers import sft_batch  # noqa: E402 (after the tools' path)


@pytest.mark.parametrize("arch", ["qwen2"])
def test_bench_gradients(tiny_dir, tmp_path):
    import bench_gradients
    out = tmp_path / "g.json"
    bench_gradients.main(["--model", str(tiny_dir), "--seq", "24", "--rank", "4", "--num-layers", "-1",
                          "--random", "--methods", "mesp", "mebp", "mezo",
                          "--mezo-samples", "1", "50", "--json", str(out)])
    res = {r["method"]: r for r in json.loads(out.read_text())["results"]}
    assert res["mesp"]["cosine"] > 0.99999 and res["mesp"]["rel_err"] < 1e-4
    assert res["mebp"]["cosine"] > 0.99999
    assert len(res["mesp"]["tensors"]) == 2 * 7 * 3  # every lora_a and lora_b of the 3 layers
    assert abs(res["mezo n=1"]["cosine"]) < res["mezo n=50"]["cosine"] < 0.99




@pytest.mark.parametrize("arch", ["qwen3"])
def test_bench_gradients_check(tiny_dir, tmp_path, capsys):
    """--check: MeSP against autodiff in fp64 with the suite's tolerances, PASS with the figures; --check-fp32 adds
    the fp32 comparison against the fp64 truth. Bad flags stop in one line."""
    import bench_gradients
    out = tmp_path / "c.json"
    bench_gradients.main(["--model", str(tiny_dir), "--seq", "24", "--rank", "4", "--num-layers", "-1", "--random",
                          "--check", "--check-fp32", "--json", str(out)])
    res = json.loads(out.read_text())
    assert res["passed"] and [r["dtype"] for r in res["results"]] == ["float64", "float32"]
    assert res["results"][0]["rel_err"] < 1e-6 and len(res["results"][0]["tensors"]) == 2 * 7 * 2
    assert capsys.readouterr().out.count("PASS") == 2
    for argv, words in ((["--layers", "2"], "go with --preset"), (["--check-fp32"], "goes with --check"),
                        (["--preset", "no-such-model"], "unknown preset")):
        with pytest.raises(SystemExit) as e:
            bench_gradients.main(argv)
        assert words in str(e.value) and "\n" not in str(e.value)


def test_make_model_8b_presets_are_the_published_configs():
    """Issue 32's 8B shapes: the fields of meta-llama/Llama-3.1-8B's and Qwen/Qwen3-8B's config.json."""
    import make_model
    llama = make_model.preset_config("llama3.1-8b")  # the spelling of llama-3.1-8b
    assert {k: llama[k] for k in ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
                                  "num_key_value_heads", "vocab_size", "rope_theta", "rms_norm_eps",
                                  "tie_word_embeddings", "max_position_embeddings")} == dict(
        hidden_size=4096, num_hidden_layers=32, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
        vocab_size=128256, rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
        max_position_embeddings=131072)
    assert llama["rope_scaling"] == {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                     "original_max_position_embeddings": 8192, "rope_type": "llama3"}
    qwen = make_model.preset_config("qwen3-8b")
    assert {k: qwen[k] for k in ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
                                 "num_key_value_heads", "head_dim", "vocab_size", "rope_theta", "rms_norm_eps",
                                 "tie_word_embeddings", "max_position_embeddings")} == dict(
        hidden_size=4096, num_hidden_layers=36, intermediate_size=12288, num_attention_heads=32, num_key_value_heads=8,
        head_dim=128, vocab_size=151936, rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
        max_position_embeddings=40960)
    for config in (llama, qwen):  # untied: the head is a weight of its own
        assert ("lm_head", (config["vocab_size"], 4096), "q") in make_model.tensor_shapes(dict(config,
                                                                                              num_hidden_layers=0))


def test_bench_pack(tiny_gguf, tmp_path):
    """tools/bench_pack.py: one training run per setting, tokens per pass and tokens / s read from its metrics; the
    packed run fills its passes."""
    import bench_pack
    out = tmp_path / "p.json"
    rows = bench_pack.main(["--model", str(tiny_gguf), "--iters", "2", "--json", str(out)])
    assert [r["setting"] for r in rows] == ["--no-pack", "--pack"] and json.loads(out.read_text())["rows"] == rows
    unpacked, packed = rows
    assert not packed["low_tokens_per_pass"]
    assert packed["tokens_per_pass"] > 1.5 * unpacked["tokens_per_pass"]
    assert all(r["steps_timed"] == 1 and r["trained_tokens_per_sec"] > 0 and r["processed_tokens_per_sec"] > 0
               for r in rows)
    with pytest.raises(SystemExit) as e:
        bench_pack.main(["--model", str(tiny_gguf), "--data", str(tmp_path / "none"), "--iters", "2"])
    assert "no such data" in str(e.value)


def test_bench_memory(tiny_gguf, tmp_path):
    import bench_memory
    out = tmp_path / "m.json"
    bench_memory.main(["--models", str(tiny_gguf), "--seqs", "32", "--ranks", "4", "--steps", "1",
                       "--methods", "mesp", "mebp", "mezo", "autodiff", "mlx-lm",
                       "--json", str(out), "--png", str(tmp_path / "m.png")])
    res = json.loads(out.read_text())
    rows = {r["method"]: r for r in res["rows"]}
    assert all("peak_mb" in r for r in rows.values()), rows
    assert (tmp_path / "m.png").stat().st_size > 0
    assert res["device"]["device"] and res["device"]["mlx"]
    for r in rows.values():  # every row: a finite loss that passed the check, the device, its host syncs
        assert r["loss_ok"] and r["device"] == res["device"]["device"] and r["evals_per_step"] >= 1, r
        assert r.get("kernels_per_step", 1) > 0, r  # every row but mlx-lm's counts its kernels
    assert all(rows[m]["loss_rel_diff"] <= rows[m]["loss_tol"] for m in ("mebp", "mezo", "autodiff", "mlx-lm"))
    assert rows["mlx-lm"]["same_data"] is True
    assert math.isfinite(rows["mezo"]["loss_step"])  # reported, not compared (its step perturbs the loss)
    # mesp's row beside its engine's memory model, which bounds it; the other engines have none
    assert 0 < rows["mesp"]["extra_mb"] <= 1.05 * rows["mesp"]["model_mb"], rows["mesp"]
    assert rows["mebp"]["model_mb"] is None


def test_trace_blocks(tiny_gguf):
    """One row per block's forward and backward and one for the head, each peak at least its memory before."""
    import trace_blocks
    from mesp_mlx.io.sources import load_model
    rows = trace_blocks.main(["--model", str(tiny_gguf), "--seq", "32", "--plan", "6"])
    n = load_model(str(tiny_gguf)).num_layers
    assert [r["phase"] for r in rows] == ["block_forward"] * n + ["head_loss"] + ["block_backward"] * n
    assert all(r["peak_mb"] >= r["before_mb"] for r in rows), rows


def test_bench_memory_loss_check():
    """A row whose loss is off by more than rounding, or not finite, or on other tokens, fails; rounding passes."""
    import bench_memory
    cpu, gpu = "Device(cpu, 0)", "Device(gpu, 0)"
    row = lambda method, loss, device=cpu, **kw: dict(model="m", seq=256, rank=8, engine_kw="{}", method=method,
                                                      loss=loss, device=device, peak_mb=1.0, s_per_step=1.0, **kw)
    rows = [row("mesp", 10.0), row("mebp", 10.005), row("autodiff", 10.02), row("mezo", float("nan")),  # 5e-4 ok, 2e-3 not
            row("mesp@quantized", 10.0 * (1 + 2e-4)),
            row("mlx-lm", 10.2, act_dtype="bfloat16", same_data=True),  # 2e-2: bf16 rounding (bound 3.1e-2)
            row("mlx-lm", 10.2, act_dtype="float32", same_data=True),  # the same gap in fp32 is a wrong answer
            row("mlx-lm", 10.0, act_dtype="bfloat16", same_data=False),
            dict(row("mesp", 10.0, gpu), seq=512), dict(row("mebp", 10.01, gpu), seq=512),  # 1e-3 on a GPU: TF32
            dict(row("autodiff", 10.03, gpu), seq=512)]
    failed = bench_memory.check_losses(rows)
    assert [r["loss_ok"] for r in rows] == [True, True, False, False, False, True, False, False, True, True, False]
    assert failed == [r for r in rows if not r["loss_ok"]]
    assert "not finite" in rows[3]["loss_why"] and "differently" in rows[7]["loss_why"]
    assert "FAIL" in bench_memory.table(rows) and "| FAIL" in bench_memory.markdown(rows, bench_memory.device_info())


def test_make_model_unquantized(tmp_path):
    """--unquantized: every weight in bf16, drawn as the 4-bit model's are (the same first rows before rounding),
    no quantization entry: a full-precision checkpoint that load_model quantizes on conversion."""
    import mlx.core as mx
    import make_model
    from mesp_mlx.io.sources import load_model
    out = make_model.make_model("qwen2.5-0.5b", tmp_path / "m", layers=2, vocab=2048, quantized=False)
    config = json.loads((out / "config.json").read_text())
    assert "quantization" not in config and "quantization_config" not in config
    weights = mx.load(str(out / "model.safetensors"))
    assert all(w.dtype == mx.bfloat16 for w in weights.values()) and "model.embed_tokens.scales" not in weights
    assert weights["model.layers.1.mlp.up_proj.weight"].shape == (4864, 896)
    store = load_model(str(out))
    assert store.config["quantization"]["bits"] == 4 and store.num_layers == 2


@pytest.mark.parametrize("preset,vocab", [("smollm2-135m", None), ("qwen2.5-0.5b", 2048)])
def test_make_model(tmp_path, preset, vocab):
    """A random 4-bit model of a real shape, one layer: our loader trains a step on it, mlx-lm loads it and computes
    the same loss up to bfloat16 rounding, and the tokenizer has exactly the config's vocabulary."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm import load
    import make_model
    from mesp_mlx.engines import make_engine
    from mesp_mlx.io.sources import load_model
    from mesp_mlx.lora import LoRAConfig, init_lora
    out = make_model.make_model(preset, tmp_path / preset, layers=1, vocab=vocab)
    config = json.loads((out / "config.json").read_text())
    real = make_model.PRESETS[preset]
    assert config["num_hidden_layers"] == 1 and config["vocab_size"] == (vocab or real["vocab_size"])
    assert config["hidden_size"] == real["hidden_size"] and config["quantization"] == {"group_size": 64, "bits": 4}
    weights = mx.load(str(out / "model.safetensors"))
    assert all(w.dtype == mx.uint32 for k, w in weights.items() if k.endswith("proj.weight")), "not quantized"
    assert ("model.layers.0.self_attn.q_proj.bias" in weights) == (real["model_type"] == "qwen2")

    store = load_model(str(out))
    tok = store.tokenizer()
    assert len(tok) == config["vocab_size"]
    ids = tok.encode((Path(json.__file__).parent / "decoder.py").read_text())[:33]
    assert tok.decode(ids) and max(ids) < config["vocab_size"]
    assert "<|im_start|>assistant" in tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                                              add_generation_prompt=True)
    x = mx.array([ids])
    params = init_lora(store.args, LoRAConfig(rank=4), 0)
    stats, grads = make_engine("mesp", store, 20.0).loss_and_grad(params, sft_batch(x[:, :-1], x[:, 1:],
                                                                                     mx.ones((1, 32))))
    loss = stats["loss"]
    assert math.isfinite(loss.item()) and set(grads) == {0}

    model, mtok = load(str(out))
    ref = nn.losses.cross_entropy(model(x[:, :-1]).astype(mx.float32), x[:, 1:]).mean().item()
    # mlx-lm runs in the model's bfloat16: bench_memory's bound for it (8 unit roundoffs relative)
    assert abs(ref - loss.item()) <= 8 * 2 ** -8 * abs(loss.item()), (ref, loss.item())
    assert mtok.encode("def f(x): return x") == tok.encode("def f(x): return x")


def test_bench_memory_preset(tmp_path):
    """`preset:...` specs are generated once into the cache and then reused."""
    import bench_inputs
    spec = "preset:qwen3-0.6b,layers=1,vocab=512"
    path = Path(bench_inputs.resolve_model(spec))
    assert json.loads((path / "config.json").read_text())["model_type"] == "qwen3"
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert Path(bench_inputs.resolve_model(spec)) == path and (path / "model.safetensors").stat().st_mtime_ns == stamp


def test_bench_convergence(tiny_gguf, tmp_path):
    import bench_convergence
    tree = tmp_path / "src"
    tree.mkdir()
    for k in range(6):
        (tree / f"m{k}.py").write_text(f"def f{k}(x):\n    return x + {k}\n" * 30)
    res = bench_convergence.main(["--model", str(tiny_gguf), "--data", str(tree), "--iters", "4", "--seq", "32",
                                  "--report", "2", "--eval-every", "2", "--val-batches", "1", "--lr", "1e-2",
                                  "--methods", "mesp", "mezo", "mlx-lm", "--png", str(tmp_path / "c.png")])
    assert set(res) == {"mesp", "mezo", "mlx-lm"}
    assert all(len(r["train"]) == 2 and r["val"] for r in res.values())


def test_kernel_counter_counts_primitives_and_syncs():
    """Each evaluation's pending graph: an Exp and an Add are two kernels, one fused kernel once compiled; arrays
    already evaluated are leaves, counted by nobody; views are reported apart."""
    import mlx.core as mx
    from count_kernels import KernelCounter
    a, b = mx.ones((4, 4)), mx.zeros((4,))
    mx.eval(a, b)
    original = mx.eval
    with KernelCounter() as k:
        mx.eval(mx.exp(a) + b)
        mx.eval(a)
    s = k.summary()
    assert (s["evals"], s["compute_prims"], s["view_prims"]) == (2, 2, 1), s  # b broadcast to a's shape: a view
    with KernelCounter() as k:
        mx.eval(mx.compile(lambda a, b: mx.exp(a) + b)(a, b))
    assert k.summary()["compute_prims"] == 1, k.summary()
    assert mx.eval is original  # restored on exit


@pytest.mark.parametrize("arch", ["qwen3"])
def test_compiled_blocks_launch_fewer_kernels(tiny_dir):
    """Compute.compile on the GPUs' configuration (one graph per block, quantized products): fewer kernels, the
    same host syncs (one per block forward, one per block backward, one per head chunk and the head's last), and the
    same gradients. A training step adds no sync: each block's optimizer update is evaluated with its backward."""
    import mlx.core as mx
    from count_kernels import engine_step_counts, train_step_counts
    from helpers import assert_grads_close
    from mesp_mlx.engines import make_engine
    from mesp_mlx.io.sources import load_model
    from mesp_mlx.lora import LoRAConfig, init_lora
    from mesp_mlx.ops.linear import Compute
    store = load_model(str(tiny_dir))
    params = init_lora(store.args, LoRAConfig(rank=4), 0)
    ids = mx.arange(33)[None] % store.args.vocab_size
    batch = sft_batch(ids[:, :-1], ids[:, 1:], mx.ones((1, 32)))
    for method in ("mesp", "mebp"):
        counts, grads = {}, {}
        for setting in ("off", "on"):
            engine = make_engine(method, store, 20.0, compute=Compute(sync="block", matmul="quantized",
                                                                      compile=setting))
            counts[setting] = engine_step_counts(engine, params, batch)
            grads[setting] = engine.loss_and_grad(params, batch)[1]
        tile = Compute(sync="block", matmul="quantized").head_tile(32, store.head_rows(), store.args.hidden_size)
        head_chunks = -(-store.args.vocab_size // tile[1])
        assert counts["on"]["evals"] == counts["off"]["evals"] <= 2 * store.args.num_hidden_layers + head_chunks + 2
        step = train_step_counts(engine, dict(params), batch)
        assert step["evals"] == counts["on"]["evals"], method
        # the optimizer's share: per block its gradients concatenated and one fused update of the block's vector
        # (one kernel a parameter before), and the step's count advanced once
        assert step["compute_prims"] - counts["on"]["compute_prims"] <= 2 * store.args.num_hidden_layers + 1, step
        assert counts["on"]["compute_prims"] < 0.9 * counts["off"]["compute_prims"], (method, counts)
        assert_grads_close(grads["on"], grads["off"])


@pytest.mark.parametrize("arch", ["llama"])
@pytest.mark.parametrize("compiled", [False, True])
def test_bench_update_fused_equals_per_parameter(tiny_dir, compiled):
    """tools/bench_update.py: the trainer's block-vector update and one update a parameter end at the very same
    parameters (the same element-wise arithmetic), compiled or not."""
    from bench_update import main
    out = main([str(tiny_dir), "--steps", "3", "--optimizer", "adamw"] + (["--compiled"] if compiled else []))
    assert out["max_abs_diff"] == 0.0 and len(out["fused_s"]) == len(out["per_parameter_s"]) == 2, out


def test_bench_retention(tmp_path, tiny_gguf, capsys):
    """tools/bench_retention.py scores a saved adapter beside its base: one markdown row with both."""
    import bench_retention
    from mesp_mlx.train import main
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("\n".join(json.dumps({"text": f"row {i}: the fox"}) for i in range(4)))
    assert main(["--model", str(tiny_gguf), "--data", str(data), "--sample-prompt", "", "--rank", "4", "--iters", "1",
                 "--no-retention", "--adapter-path", str(tmp_path / "a")]) == 0
    capsys.readouterr()
    bench_retention.main([str(tmp_path / "a"), "--seq", "32"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith(f"| {tmp_path / 'a'}")]
    assert len(rows) == 1 and rows[0].count("/10") == 2
