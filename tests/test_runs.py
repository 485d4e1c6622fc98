"""Runs that must lose nothing: every compute dtype trains, saves, resumes and exports; an adapter folder is held by one
run at a time; a run killed outright resumes to the losses and adapter of an uninterrupted one."""
import json

import mlx.core as mx
import pytest

from mesp_mlx.io.adapter_formats import export_adapter
from mesp_mlx.io.adapters import load_resume, save_resume
from mesp_mlx.ops.linear import DTYPES
from mesp_mlx.train import main
from helpers import ON_GPU

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
    for fmt in ("peft", "gguf"):
        out, _ = export_adapter(tmp_path / "b", fmt)
        assert out.exists()
