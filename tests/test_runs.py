"""Runs that must lose nothing: every compute dtype trains, saves, resumes and exports; an adapter folder is held by one
run at a time; a run killed outright resumes to the losses and adapter of an uninterrupted one."""
import json

import mlx.core as mx
import pytest

from mesp_mlx.io.formats import export_adapter, load_adapter_weights
from mesp_mlx.io.sources import load_model
from mesp_mlx.lora import to_flat
from mesp_mlx.io.adapters import load_resume, save_resume
from mesp_mlx.ops.linear import DTYPES
from mesp_mlx.train import main
from helpers import ON_GPU, rel_err

ROWS = [{"text": f"row {i}: " + "the quick brown fox jumps over the lazy dog " * (1 + i % 3)} for i in range(10)]


def train_losses(out):
    return [r["train_loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if "train_loss" in r]


def write_rows(d):
    d.mkdir()
    (d / "train.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS))
    return d


def test_float64_state_round_trips_bit_for_bit(tmp_path):
    """MLX cannot write F64 safetensors: the resume file carries float64 arrays (any shape, a scalar too) exactly."""
    x = mx.random.normal((3, 5)).astype(mx.float64, stream=mx.cpu) / 3
    opt = {"step": mx.array(7, mx.uint64), "lr": mx.array(1 / 3, mx.float64), "w": {"m": x, "v": x * x}}
    save_resume(tmp_path, {0: {"p": (x, x.astype(mx.float32))}}, opt, {"step": 7})
    params, got, state = load_resume(tmp_path)
    assert state == {"step": 7}
    assert params[0]["p"][0].dtype == mx.float64 and mx.array_equal(params[0]["p"][0], x).item()
    for a, b in ((got["lr"], opt["lr"]), (got["w"]["m"], x), (got["w"]["v"], x * x), (got["step"], opt["step"])):
        assert a.dtype == b.dtype and a.shape == b.shape and mx.array_equal(a, b).item()


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_dtype_trains_saves_resumes_and_exports(tmp_path, tiny_gguf, dtype):
    """3 steps, then resumed to 5: the losses and the adapter equal those of 5 uninterrupted steps, bit for bit (the
    same arithmetic on the same restored numbers); the adapter then exports to PEFT and GGUF."""
    if dtype == "float64" and ON_GPU:
        pytest.skip("float64 exists only on the CPU")
    common = ["--model", str(tiny_gguf), "--data", str(write_rows(tmp_path / "data")), "--sample-prompt", "",
              "--rank", "4", "--batch-size", "2", "--steps-per-report", "1", "--learning-rate", "1e-2",
              "--dtype", dtype]
    assert main(common + ["--iters", "5", "--adapter-path", str(tmp_path / "a")]) == 0
    assert main(common + ["--iters", "3", "--adapter-path", str(tmp_path / "b")]) == 0
    assert main(common + ["--iters", "5", "--adapter-path", str(tmp_path / "b"), "--resume"]) == 0
    whole, resumed = train_losses(tmp_path / "a"), train_losses(tmp_path / "b")
    assert len(whole) == 5 and whole == resumed
    a = mx.load(str(tmp_path / "a" / "adapters.safetensors"))
    b = mx.load(str(tmp_path / "b" / "adapters.safetensors"))
    assert set(a) == set(b) and all(mx.array_equal(a[k], b[k]).item() for k in a)
    # each export reads back as the trained adapter, to its float16 rounding (2^-11 of the largest entry)
    expected = {k: tuple(v.shape) for k, v in b.items()}
    store = load_model(str(tiny_gguf))
    for fmt in ("peft", "gguf"):
        out, _ = export_adapter(tmp_path / "b", fmt)
        back = to_flat(load_adapter_weights(out, expected, 20.0, store=store))
        assert set(back) == set(b) and max(rel_err(back[k].astype(mx.float32), b[k].astype(mx.float32))
                                           for k in b) <= 2 ** -11, fmt


def test_dropout_keys_never_repeat_across_steps_and_micro_batches(tmp_path, tiny_gguf):
    """The old seeds, (seed * 1_000_003 + step) * 64 + micro, made step s's micro-batch 64 draw the masks of step
    s+1's micro-batch 0 once --grad-accumulation-steps exceeded 64. Folded keys: every (step, micro, block,
    projection) draws its own mask, and the same one again when asked again (resume)."""
    from mesp_mlx.config import config_from_args
    from mesp_mlx.ops.block import _dropout_masks, block_dropout
    from mesp_mlx.trainer import Trainer
    cfg = config_from_args(["--model", str(tiny_gguf), "--data", str(write_rows(tmp_path / "data")),
                            "--sample-prompt", "", "--lora-dropout", "0.5", "--grad-accumulation-steps", "65"])
    t = Trainer(cfg, log=lambda *a: None)
    keys = {}
    for step in range(3):
        t.step_no = step
        for micro in range(65):
            keys[(step, micro)] = tuple(t.dropout_key(micro).tolist())
    assert len(set(keys.values())) == len(keys)
    t.step_no = 1
    assert tuple(t.dropout_key(0).tolist()) == keys[(1, 0)]
    x = mx.zeros((1, 16, 64))
    lora = {"self_attn.q_proj": None, "self_attn.k_proj": None}

    def mask(step, micro, block, name):
        t.step_no = step
        return _dropout_masks(block_dropout((0.5, t.dropout_key(micro)), block), lora, 1, 16)(name, x)

    first = mask(0, 64, 0, "self_attn.q_proj")
    others = [mask(1, 0, 0, "self_attn.q_proj"), mask(0, 63, 0, "self_attn.q_proj"), mask(0, 64, 1, "self_attn.q_proj"),
              mask(0, 64, 0, "self_attn.k_proj")]
    assert all(not mx.array_equal(first, m).item() for m in others)
    assert mx.array_equal(first, mask(0, 64, 0, "self_attn.q_proj")).item()
    t.group.rank = 1  # data-parallel: the other process's rows draw their own masks
    assert not mx.array_equal(first, mask(0, 64, 0, "self_attn.q_proj")).item()


def test_one_run_per_adapter_folder_and_a_killed_holder_never_blocks(tmp_path, tiny_gguf):
    """Two real processes: while a run trains into a folder, a second run, a resume and an export into it are refused
    in one line naming the holder's pid; after the holder is killed with SIGKILL the next --resume runs."""
    import os
    import signal
    import subprocess
    import sys
    import time
    out = tmp_path / "out"
    common = [sys.executable, "-m", "mesp_mlx.train", "--model", str(tiny_gguf), "--data",
              str(write_rows(tmp_path / "data")), "--sample-prompt", "", "--rank", "4", "--steps-per-report", "1",
              "--steps-per-eval", "1000", "--save-every", "1", "--adapter-path", str(out)]
    env = dict(os.environ, MESP_MLX_NO_BLAS_PRELOAD="1")
    holder = subprocess.Popen(common + ["--iters", "100000"], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (out / "resume.safetensors").exists():
            time.sleep(0.05)
        assert holder.poll() is None
        export = [sys.executable, "-m", "mesp_mlx.export", "--adapter-path", str(out), "--format", "peft"]
        for argv in (common + ["--iters", "3"], common + ["--iters", "3", "--resume"], export):
            second = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
            err = [line for line in second.stderr.splitlines() if line.startswith("error:")]
            assert second.returncode == 2 and len(err) == 1 and f"pid {holder.pid}" in err[0], second.stderr
            assert "Traceback" not in second.stderr
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    steps = load_resume(out)[2]["step"]
    done = subprocess.run(common + ["--iters", str(steps + 2), "--resume"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert len(train_losses(out)) == steps + 2
