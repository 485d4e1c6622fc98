"""Smoke runs of the benchmark tools on a tiny model, so that they cannot rot (the full runs are not in CI)."""
import json
import subprocess
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
