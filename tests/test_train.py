"""The CLI end to end on tiny models: every data format and method; adapters that mlx-lm loads as its own."""
import json

import mlx.core as mx
import pytest

from mesp_mlx.config import ConfigError, config_from_args
from mesp_mlx.io.sources import load_model
from mesp_mlx.lora import from_flat
from mesp_mlx.model import logits
from mesp_mlx.train import main
from builders import launcher, run_two_processes
from helpers import EXACT, REL_TOL, mlx_lm_model, rel_err

ROWS = {"text": [{"text": "the quick brown fox jumps over the lazy dog"}] * 6,
        "completions": [{"prompt": "def main():", "completion": " return 0"}] * 6,
        "chat": [{"messages": [{"role": "user", "content": "the fox"}, {"role": "assistant", "content": "quick"}]}] * 6}




def write_data(d, kind):
    d.mkdir()
    for split in ("train", "valid"):
        (d / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS[kind]))
    return d


@pytest.mark.parametrize("method", ["mesp", "mebp", "mezo", "autodiff"])
@pytest.mark.parametrize("kind", ["text", "completions", "chat"])
def test_cli_trains_and_mlx_lm_loads_adapter(tmp_path, tiny_gguf, kind, method):
    data = write_data(tmp_path / "data", kind)
    out = tmp_path / "ad"
    rc = main(["--model", str(tiny_gguf), "--data", str(data), "--iters", "3", "--method", method,
               "--adapter-path", str(out), "--steps-per-report", "1", "--sample-prompt", "", "--rank", "4",
               "--learning-rate", "1e-2", "--save-every", "2"])
    assert rc == 0
    assert (out / "0000002_adapters.safetensors").exists()
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["lora_parameters"]["rank"] == 4 and cfg["fine_tune_type"] == "lora"
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [l["iter"] for l in lines if "train_loss" in l] == [1, 2, 3]
    store = load_model(str(tiny_gguf))
    params = from_flat(mx.load(str(out / "adapters.safetensors")))
    assert any(float(mx.abs(b).max()) > 0 for m in params.values() for _, b in m.values())  # it trained
    scale = cfg["lora_parameters"]["scale"]
    ids = mx.array([[5, 17, 42, 99, 3, 250, 7]])
    ours = logits(store, ids, params, scale)

    # mlx_lm.load(..., adapter_path=...) takes the adapter as its own: same tensors, same scale, same logits. With
    # its base dequantized through fp32 scales, as ours is, both compute W x + s (x A) B in fp32 from the same
    # numbers in another order (ours forms q, k and v's down-projections as one product and adds the LoRA term in
    # the GEMM's epilogue): logits are the end of a chain of every layer's products, REL_TOL in helpers' error
    # model (EXACT is one product's), while a wrong scale, a transposed or misplaced LoRA tensor is off by more
    # than 1e-3 (checked below), ten times that.
    model = mlx_lm_model(store.path, out)
    theirs = model(ids)
    assert rel_err(ours, theirs) <= REL_TOL, rel_err(ours, theirs)
    assert rel_err(logits(store, ids, params, 1.1 * scale), theirs) > 1e-3  # the check sees a 10% scale error
    assert rel_err(logits(store, ids, None, scale), theirs) > 1e-3  # and an adapter that is not applied

    # Loose check against mlx-lm's quantized kernels, on the base model only: they work through the fp16 scales
    # (unit roundoff 2^-11 = 4.9e-4 relative per weight), which over two blocks and the head stays within 4x of
    # that, 2e-3 of the largest logit. With a trained adapter the same gap is amplified by the update's size, so it
    # bounds nothing there (a lr=1e-2 adapter on this tiny random model took it to ~1%).
    base = mlx_lm_model(store.path, None, fp32_base=False)(ids)
    assert rel_err(logits(store, ids), base) <= 2e-3


def test_resume_from_mlx_lm_adapter(tmp_path, tiny_gguf):
    data = write_data(tmp_path / "data", "text")
    common = ["--model", str(tiny_gguf), "--data", str(data), "--sample-prompt", "", "--rank", "4"]
    assert main(common + ["--iters", "2", "--adapter-path", str(tmp_path / "a")]) == 0
    assert main(common + ["--iters", "1", "--adapter-path", str(tmp_path / "b"), "--resume-adapter-file",
                          str(tmp_path / "a" / "adapters.safetensors")]) == 0
    assert main(common + ["--iters", "1", "--rank", "8", "--adapter-path", str(tmp_path / "c"),
                          "--resume-adapter-file", str(tmp_path / "a" / "adapters.safetensors")]) == 2


def test_typos_are_reported(tmp_path):
    with pytest.raises(SystemExit):
        config_from_args(["--learning-rat", "1e-3"])
    recipe = tmp_path / "r.yaml"
    recipe.write_text("learning_rat: 0.001\n")
    with pytest.raises(ConfigError, match="learning_rat"):
        config_from_args(["-c", str(recipe)])
    with pytest.raises(ConfigError, match="rank"):
        config_from_args(["--rank", "0"])
    with pytest.raises(ConfigError, match="learning_rate"):
        config_from_args(["--learning-rate", "-1"])


def test_bad_data_names_file_and_line(tmp_path, tiny_gguf, capsys):
    d = tmp_path / "data"
    d.mkdir()
    (d / "train.jsonl").write_text('{"text": "ok"}\n{"text": oops}\n')
    assert main(["--model", str(tiny_gguf), "--data", str(d), "--sample-prompt", "",
                 "--adapter-path", str(tmp_path / "a")]) == 2
    assert "train.jsonl:2" in capsys.readouterr().err


@pytest.mark.real
def test_default_run_reduced(tmp_path):
    from mesp_mlx.io.sources import smollm2_gguf
    try:
        smollm2_gguf(install=False)
    except Exception as e:
        pytest.skip(str(e))
    assert main(["-c", "recipes/default.yaml", "--iters", "2", "--steps-per-report", "1", "--sample-tokens", "8",
                 "--adapter-path", str(tmp_path / "ad")]) == 0
    assert (tmp_path / "ad" / "adapters.safetensors").exists()


def train_losses(out):
    return [r["train_loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if "train_loss" in r]


MORE = [{"text": f"row {i}: " + "the quick brown fox jumps over the lazy dog " * (1 + i % 3)} for i in range(10)]


@pytest.mark.parametrize("method", ["mesp", "mezo"])
def test_resume_continues_the_same_run(tmp_path, tiny_gguf, method):
    """Stopped after 3 steps and resumed to 7: the losses of every step equal those of one uninterrupted run (adamw
    moments, step count, data position across an epoch boundary, and MeZO's seeds all restored)."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("\n".join(json.dumps(r) for r in MORE))
    common = ["--model", str(tiny_gguf), "--data", str(data), "--sample-prompt", "", "--rank", "4",
              "--batch-size", "2", "--steps-per-report", "1", "--learning-rate", "1e-2", "--method", method]
    assert main(common + ["--iters", "7", "--adapter-path", str(tmp_path / "a")]) == 0
    assert main(common + ["--iters", "3", "--adapter-path", str(tmp_path / "b")]) == 0
    assert main(common + ["--iters", "7", "--adapter-path", str(tmp_path / "b"), "--resume"]) == 0
    whole, resumed = train_losses(tmp_path / "a"), train_losses(tmp_path / "b")
    assert len(resumed) == 7
    assert max(abs(x - y) for x, y in zip(whole, resumed)) <= 1e-6, (whole, resumed)
    a = mx.load(str(tmp_path / "a" / "adapters.safetensors"))
    b = mx.load(str(tmp_path / "b" / "adapters.safetensors"))
    assert all(float(mx.max(mx.abs(a[k] - b[k]))) <= 1e-6 for k in a)
    assert (tmp_path / "a" / "training.png").stat().st_size > 0
    # a resume with settings that change the numbers is refused, naming them
    assert main(common + ["--iters", "8", "--adapter-path", str(tmp_path / "b"), "--resume", "--rank", "8"]) == 2


@pytest.mark.parametrize("optimizer,extra", [("sgd", []), ("adamw", []),
                                             ("adam", ["--lr-schedule", "cosine", "--warmup", "2",
                                                       "--optimizer-config", '{"bias_correction": true}'])])
def test_fused_update_equals_unfused(tmp_path, tiny_gguf, optimizer, extra):
    """Block by block (the step's first block advances the count and the schedule, the others reuse them) equals one
    update of the whole tree, with a schedule and Adam's bias correction reading the count too."""
    from mesp_mlx.trainer import Trainer
    data = write_data(tmp_path / "data", "text")
    params = {}
    for fused in (True, False):
        cfg = config_from_args(["--model", str(tiny_gguf), "--data", str(data), "--sample-prompt", "", "--rank", "4",
                                "--optimizer", optimizer, "--learning-rate", "1e-2"] + extra +
                               ([] if fused else ["--no-fused-update"]))
        t = Trainer(cfg, log=lambda *a: None)
        assert t.fused == fused
        for _ in range(3):
            t.step()
        assert t.opt.state["step"].item() == 3
        params[fused] = t.params
    for i in params[True]:
        for p in params[True][i]:
            for k in (0, 1):
                assert float(mx.max(mx.abs(params[True][i][p][k] - params[False][i][p][k]))) <= 1e-7


def test_compiled_update_equals_plain(tmp_path, tiny_gguf):
    """The optimizer update compiled (where the engine compiles its blocks: GPUs) or not: the same adamw steps, to
    fp32 rounding of the fused element-wise kernels (a few ulps of each update, ~1e-9 on parameters ~1e-2)."""
    import dataclasses
    from mesp_mlx.trainer import Trainer
    data = write_data(tmp_path / "data", "text")
    params = {}
    for setting in ("on", "off"):
        cfg = config_from_args(["--model", str(tiny_gguf), "--data", str(data), "--sample-prompt", "", "--rank", "4",
                                "--optimizer", "adamw", "--learning-rate", "1e-2"])
        t = Trainer(cfg, log=lambda *a: None)
        t.compute = dataclasses.replace(t.compute, sync="block", compile=setting)
        assert t.compute.compiled == (setting == "on")
        for _ in range(3):
            t.step()
        params[setting] = t.params
    for i in params["on"]:
        for p in params["on"][i]:
            for k in (0, 1):
                assert float(mx.max(mx.abs(params["on"][i][p][k] - params["off"][i][p][k]))) <= 1e-7


def test_sigterm_saves_and_resumes(tmp_path, tiny_gguf):
    """SIGTERM mid-run: a clean exit (status 143, no traceback) with a checkpoint that resumes to the same losses."""
    import os
    import signal
    import subprocess
    import sys
    import time
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("\n".join(json.dumps(r) for r in MORE))
    common = [sys.executable, "-m", "mesp_mlx.train", "--model", str(tiny_gguf), "--data", str(data),
              "--sample-prompt", "", "--rank", "4", "--steps-per-report", "1", "--steps-per-eval", "1000",
              "--learning-rate", "1e-2"]
    env = dict(os.environ, MESP_MLX_NO_BLAS_PRELOAD="1")
    proc = subprocess.Popen(common + ["--iters", "100000", "--adapter-path", str(tmp_path / "b")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    metrics = tmp_path / "b" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err and "--resume" in out
    stopped = len(train_losses(tmp_path / "b"))
    assert stopped >= 3
    n = stopped + 2
    assert subprocess.run(common + ["--iters", str(n), "--adapter-path", str(tmp_path / "b"), "--resume"],
                          env=env, capture_output=True).returncode == 0
    assert subprocess.run(common + ["--iters", str(n), "--adapter-path", str(tmp_path / "a")],
                          env=env, capture_output=True).returncode == 0
    whole, resumed = train_losses(tmp_path / "a"), train_losses(tmp_path / "b")
    assert len(resumed) == n and max(abs(x - y) for x, y in zip(whole, resumed)) <= 1e-6


def test_mlx_lm_fuse_accepts_our_adapter(tmp_path, tiny_gguf):
    import subprocess
    import sys
    data = write_data(tmp_path / "data", "text")
    out = tmp_path / "ad"
    assert main(["--model", str(tiny_gguf), "--data", str(data), "--iters", "3", "--sample-prompt", "", "--rank", "4",
                 "--learning-rate", "1e-2", "--adapter-path", str(out)]) == 0
    store = load_model(str(tiny_gguf))
    fused = tmp_path / "fused"
    r = subprocess.run([sys.executable, "-m", "mlx_lm", "fuse", "--model", str(store.path), "--adapter-path", str(out),
                        "--save-path", str(fused)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    from mlx_lm.utils import load_model as mlx_lm_load
    model, _ = mlx_lm_load(fused)
    params = from_flat(mx.load(str(out / "adapters.safetensors")))
    ids = mx.array([[5, 17, 42, 99, 3]])
    ours, theirs = logits(store, ids, params, 20.0), model(ids)
    # fusing re-quantizes W + s*A*B to 4 bits, so the fused model is close to ours, not equal
    assert float(mx.max(mx.abs(ours - theirs))) <= 0.1 * float(mx.max(mx.abs(ours)))
    assert (mx.argmax(ours, -1) == mx.argmax(theirs, -1)).all()


@pytest.mark.parametrize("recipe", ["default", "chat", "code", "paper", "dpo", "kto", "grpo"])
def test_recipes_parse_and_find_their_data(recipe, monkeypatch, tmp_path):
    from pathlib import Path
    from mesp_mlx.data import resolve_data
    monkeypatch.chdir(tmp_path)  # recipes work from any directory
    cfg = config_from_args(["-c", str(Path(__file__).resolve().parents[1] / "recipes" / f"{recipe}.yaml")])
    assert resolve_data(cfg.data).is_dir()


@pytest.mark.real
@pytest.mark.parametrize("recipe", ["default", "chat", "code", "paper", "dpo", "kto", "grpo"])
def test_recipes_fill_their_passes_over_the_weights(recipe):
    """Issue 32: on its shipped data (SmolLM2's tokenizer) no recipe's batches are short: each holds at least
    LOW_TOKENS_PER_PASS real tokens per pass over the weights (packing where the objective packs, else the batch)."""
    from pathlib import Path
    from mesp_mlx.io.sources import smollm2_gguf
    from mesp_mlx.trainer import LOW_TOKENS_PER_PASS, Trainer, pass_fill
    try:
        smollm2_gguf(install=False)
    except Exception as e:
        pytest.skip(str(e))
    t = Trainer(config_from_args(["-c", str(Path(__file__).resolve().parents[1] / "recipes" / f"{recipe}.yaml")]),
                log=lambda *a: None)
    c = t.cfg
    real, _ = pass_fill(t.data["train"], t.objective, c.batch_size, 1, c.seed, t.pack)
    assert real >= LOW_TOKENS_PER_PASS, (recipe, real)

def test_source_tree_holds_out_files(tmp_path, tiny_gguf):
    from mesp_mlx.data import load_source_tree
    tree = tmp_path / "src"
    tree.mkdir()
    for name in ("a.py", "b.py", "c.py"):
        (tree / name).write_text(f"def {name[0]}():\n    return 1\n" * 20)
    out = load_source_tree(load_model(str(tiny_gguf)).tokenizer(), tree, 32)
    assert out["train"] and out["valid"]


def test_memory_budget_bounds_the_process(tmp_path, tiny_gguf, capsys):
    """The budget is the process's: what it holds before the first step is measured, MLX's share planned from the
    rest (both reported), and a budget the fixed part alone fills is refused before any work."""
    import subprocess
    import sys
    from mesp_mlx.plan import GROWTH
    from mesp_mlx.resident import resident_bytes
    data = write_data(tmp_path / "data", "text")
    common = ["--model", str(tiny_gguf), "--data", str(data), "--sample-prompt", "", "--rank", "4", "--iters", "2",
              "--steps-per-report", "1", "--adapter-path", str(tmp_path / "a")]
    assert main(common + ["--memory-budget", "1KB"]) == 2
    assert "already holds" in capsys.readouterr().err and not (tmp_path / "a").exists()
    assert main(common + ["--memory-budget", f"{int(resident_bytes() * (1 + GROWTH)) + 50_000_000}B"]) == 0
    log = capsys.readouterr().out
    assert "the process holds" in log and "MLX's share" in log
    peaks = [r["peak_memory_gb"] for r in map(json.loads, (tmp_path / "a" / "metrics.jsonl").read_text().splitlines())
             if "peak_memory_gb" in r]
    assert peaks and max(peaks) * 1e9 <= 50e6
    assert main(common + ["--memory-budget", "50MB", "--method", "mebp"]) == 2
    # a fresh process (the suite's own resident set is not a run's): its peak RSS stays within the budget
    run = subprocess.run([sys.executable, "-m", "mesp_mlx.train"] + common[:-1] + [str(tmp_path / "b"),
                         "--memory-budget", "300MB"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "PyTorch was not found" not in run.stderr  # transformers' note on a run that never asked for it
    rss = [r["rss_peak_mb"] for r in map(json.loads, (tmp_path / "b" / "metrics.jsonl").read_text().splitlines())
           if "rss_peak_mb" in r]
    assert rss and max(rss) * 2 ** 20 <= 300e6, rss


def two_process_setup(tmp_path):
    """(mlx.launch, the mesp-train entry point, a data folder of 8 rows) for the loopback data-parallel tests."""
    launch, entry = launcher()
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("\n".join(json.dumps(r) for r in MORE[:8]))
    return launch, entry, data


@pytest.mark.parametrize("method", ["mesp", "mezo"])
def test_two_processes_equal_one_with_twice_the_batch(tmp_path, tiny_gguf, method):
    """Data-parallel over mx.distributed (ring backend on loopback, started by mlx.launch): two processes with batch
    2 log the same losses and write the same adapter as one process with batch 4."""
    _, _, data = two_process_setup(tmp_path)
    # SGD: AdamW divides by sqrt(v), which turns 1e-7 differences in near-zero gradients into visible ones
    common = ["--model", str(tiny_gguf), "--data", str(data), "--sample-prompt", "", "--rank", "4", "--iters", "5",
              "--steps-per-report", "1", "--optimizer", "sgd", "--method", method,
              # MeZO's step is lr * c * z over every LoRA entry, c a finite difference that turns fp32 rounding of
              # the two losses (~5e-7) into ~2.5e-5: at lr 1e-2 that difference grew ~10x a step on this tiny model
              # (chaotic, not a reduction error); at 1e-3 the five steps stay within the tolerance below
              "--learning-rate", "1e-3" if method == "mezo" else "1e-2"]
    run_two_processes(common + ["--batch-size", "2", "--adapter-path", str(tmp_path / "two")])
    assert main(common + ["--batch-size", "4", "--adapter-path", str(tmp_path / "one")]) == 0
    one, two = train_losses(tmp_path / "one"), train_losses(tmp_path / "two")
    # Both compute the same means in another order: the group's mean of two half-batch means is the whole batch's
    # mean with its sums split, so each step's loss and gradient agree to a whole-model chain's rounding (REL_TOL),
    # and five SGD steps add at most five such differences to the adapter. mezo's projection is a finite
    # difference: fp32 rounding of the two losses is amplified by 1/(2 eps) = 50.
    tol = 2e-3 if method == "mezo" else REL_TOL
    assert len(two) == 5 and max(abs(x - y) / abs(y) for x, y in zip(one, two)) <= tol, (one, two)
    a = mx.load(str(tmp_path / "one" / "adapters.safetensors"))
    b = mx.load(str(tmp_path / "two" / "adapters.safetensors"))
    assert max(rel_err(b[k], a[k]) for k in a) <= (100 * tol if method == "mezo" else 5 * tol)


def test_help_documents_every_flag(capsys):
    import dataclasses
    from mesp_mlx.config import TrainConfig, parser
    helps = {a.dest: " ".join(a.help.split()) for a in parser()._actions if a.help}
    for f in dataclasses.fields(TrainConfig):
        if f.name != "hf_dataset":  # a recipe-only key, as in mlx-lm
            assert helps[f.name].startswith(" ".join(f.metadata["help"].split())), f.name
            if f.metadata["choices"]:
                assert "{" + ",".join(f.metadata["choices"]) + "}" in helps[f.name]
            if f.default is not None:
                assert f"(default: {f.default})" in helps[f.name]
    assert "--learning-rate" in parser().format_help()


def test_test_split_warmup_and_optimizer_config(tmp_path, tiny_gguf, capsys):
    from mesp_mlx.trainer import Trainer
    data = write_data(tmp_path / "data", "text")
    (data / "test.jsonl").write_text((data / "valid.jsonl").read_text())
    common = ["--model", str(tiny_gguf), "--data", str(data), "--sample-prompt", "", "--rank", "4",
              "--adapter-path", str(tmp_path / "a")]
    # --no-train --test: mlx-lm's test report only; its loss is the engine's mean loss over the test rows
    assert main(common + ["--no-train", "--test"]) == 0
    out = capsys.readouterr().out
    assert "Test loss" in out and "Test ppl" in out and not (tmp_path / "a" / "metrics.jsonl").exists()
    # warmup: linear from 0 over 4 steps, then the constant rate; optimizer settings reach the optimizer
    cfg = config_from_args(common + ["--warmup", "4", "--learning-rate", "1e-2", "--optimizer-config",
                                     '{"adamw": {"betas": [0.8, 0.9], "weight_decay": 0.0}}'])
    t = Trainer(cfg, log=lambda *a: None)
    rates = []
    for _ in range(6):
        rates.append(t.current_lr())
        t.step()
        t.step_no += 1
    assert rates == pytest.approx([0.0, 2.5e-3, 5e-3, 7.5e-3, 1e-2, 1e-2])
    assert t.opt.betas == [0.8, 0.9] and t.opt.weight_decay == 0.0
    with pytest.raises(ConfigError, match="momentum is not a setting of adamw"):
        config_from_args(common + ["--optimizer-config", "momentum: 0.9"])
    assert main(common + ["--test", "--iters", "1"]) == 0
    assert "Test loss" in capsys.readouterr().out
    (data / "test.jsonl").unlink()
    assert main(common + ["--test", "--iters", "1"]) == 2
    assert "test split" in capsys.readouterr().err


def test_report_to_wandb_without_wandb_is_one_line(tmp_path, tiny_gguf, capsys):
    import importlib.util
    if importlib.util.find_spec("wandb"):
        pytest.skip("wandb is installed here")
    data = write_data(tmp_path / "data", "text")
    assert main(["--model", str(tiny_gguf), "--data", str(data), "--sample-prompt", "", "--iters", "1",
                 "--report-to", "wandb", "--adapter-path", str(tmp_path / "a")]) == 2
    assert "pip install wandb" in capsys.readouterr().err


def test_lora_dropout_run_resumes_exactly_and_mlx_lm_reads_it(tmp_path, tiny_gguf):
    """--lora-dropout trains (masks drawn from seed and step), resumes to the same losses, and is recorded where
    mlx-lm reads it; mlx-lm's model in eval mode (no dropout) computes our adapted logits."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("\n".join(json.dumps(r) for r in MORE))
    common = ["--model", str(tiny_gguf), "--data", str(data), "--sample-prompt", "", "--rank", "4", "--batch-size",
              "2", "--steps-per-report", "1", "--learning-rate", "1e-2", "--lora-dropout", "0.25"]
    assert main(common + ["--iters", "5", "--adapter-path", str(tmp_path / "a")]) == 0
    assert main(common + ["--iters", "3", "--adapter-path", str(tmp_path / "b")]) == 0
    assert main(common + ["--iters", "5", "--adapter-path", str(tmp_path / "b"), "--resume"]) == 0
    whole, resumed = train_losses(tmp_path / "a"), train_losses(tmp_path / "b")
    assert len(resumed) == 5 and max(abs(x - y) for x, y in zip(whole, resumed)) <= 1e-6
    assert main(common[:-2] + ["--iters", "5", "--adapter-path", str(tmp_path / "c")]) == 0
    assert train_losses(tmp_path / "c")[1:] != whole[1:]  # the dropout changed the run
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["lora_parameters"]["dropout"] == 0.25
    store = load_model(str(tiny_gguf))
    params = from_flat(mx.load(str(tmp_path / "a" / "adapters.safetensors")))
    ids = mx.array([[5, 17, 42, 99, 3]])
    model = mlx_lm_model(store.path, tmp_path / "a")
    model.eval()
    assert rel_err(logits(store, ids, params, cfg["lora_parameters"]["scale"]), model(ids)) <= EXACT
    assert main(common + ["--method", "mezo", "--iters", "1", "--adapter-path", str(tmp_path / "d")]) == 2


def test_two_processes_resume_exactly(tmp_path, tiny_gguf):
    """A data-parallel run stopped after 3 steps and resumed to 5 (rank 0 reads the checkpoint and sends parameters,
    AdamW moments, step count and data position to the other process) logs the losses of an uninterrupted run."""
    import os
    import subprocess
    import sys
    launch, entry, data = two_process_setup(tmp_path)
    env = dict(os.environ, MESP_MLX_NO_BLAS_PRELOAD="1")
    common = [str(launch), "-n", "2", "--python", sys.executable, str(entry), "--model", str(tiny_gguf), "--data",
              str(data), "--sample-prompt", "", "--rank", "4", "--steps-per-report", "1", "--learning-rate", "1e-2",
              "--batch-size", "2"]

    def run(*flags):
        r = subprocess.run(common + list(flags), env=env, capture_output=True, text=True, timeout=300)
        assert "Traceback" not in r.stderr, r.stderr[-2000:]  # mlx.launch exits 0 even when a rank fails
        return r

    run("--iters", "5", "--adapter-path", str(tmp_path / "a"))
    run("--iters", "3", "--adapter-path", str(tmp_path / "b"))
    assert "resumed" in run("--iters", "5", "--adapter-path", str(tmp_path / "b"), "--resume").stdout
    whole, resumed = train_losses(tmp_path / "a"), train_losses(tmp_path / "b")
    assert len(whole) == len(resumed) == 5 and max(abs(x - y) for x, y in zip(whole, resumed)) <= 1e-6, (whole,
                                                                                                        resumed)
