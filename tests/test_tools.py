"""Smoke runs of the benchmark tools on a tiny model, so that they cannot rot (the full runs are not in CI)."""
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))


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




def test_bench_memory(tiny_gguf, tmp_path):
    import bench_memory
    out = tmp_path / "m.json"
    bench_memory.main(["--models", str(tiny_gguf), "--seqs", "32", "--ranks", "4", "--steps", "1",
                       "--methods", "mesp", "mebp", "mezo", "autodiff", "mlx-lm",
                       "--json", str(out), "--png", str(tmp_path / "m.png")])
    rows = {r["method"]: r for r in json.loads(out.read_text())["rows"]}
    assert all("peak_mb" in r for r in rows.values()), rows
    assert (tmp_path / "m.png").stat().st_size > 0


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
    assert res["mesp"]["train"][-1][2] < res["mesp"]["train"][0][2] + 0.5
