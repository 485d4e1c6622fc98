"""The CLI end to end on tiny models: every data format and method; adapters that mlx-lm loads as its own."""
import json

import mlx.core as mx
import pytest

from conftest import write_tiny_gguf
from mesp_mlx.config import ConfigError, config_from_args
from mesp_mlx.io.sources import load_model
from mesp_mlx.lora import from_flat
from mesp_mlx.model import logits
from mesp_mlx.train import main

ROWS = {"text": [{"text": "the quick brown fox jumps over the lazy dog"}] * 6,
        "completions": [{"prompt": "def main():", "completion": " return 0"}] * 6,
        "chat": [{"messages": [{"role": "user", "content": "the fox"}, {"role": "assistant", "content": "quick"}]}] * 6}


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    f = tmp_path_factory.mktemp("m") / "tiny.gguf"
    write_tiny_gguf(f, "qwen2", "Q8_0")
    return f


def write_data(d, kind):
    d.mkdir()
    for split in ("train", "valid"):
        (d / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS[kind]))
    return d


@pytest.mark.parametrize("method", ["mesp", "mebp", "mezo", "autodiff"])
@pytest.mark.parametrize("kind", ["text", "completions", "chat"])
def test_cli_trains_and_mlx_lm_loads_adapter(tmp_path, tiny_gguf, kind, method):
    if method != "mesp" and kind != "chat":
        pytest.skip("each method runs on the chat data; each format runs with mesp")
    data = write_data(tmp_path / "data", kind)
    out = tmp_path / "ad"
    rc = main(["--model", str(tiny_gguf), "--data", str(data), "--iters", "3", "--method", method,
               "--adapter-path", str(out), "--steps-per-report", "1", "--sample-prompt", "", "--rank", "4",
               "--learning-rate", "1e-2", "--save-every", "2"])
    assert rc == 0
    assert (out / "0000002_adapters.safetensors").exists()
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["lora_parameters"]["rank"] == 4 and cfg["fine_tune_type"] == "lora"
    from mlx_lm.utils import load_model as mlx_lm_load
    from mlx_lm.tuner.utils import load_adapters
    store = load_model(str(tiny_gguf))
    model, _ = mlx_lm_load(store.path)
    model = load_adapters(model, str(out))
    params = from_flat(mx.load(str(out / "adapters.safetensors")))
    assert any(float(mx.abs(b).max()) > 0 for m in params.values() for _, b in m.values())  # it trained
    ids = mx.array([[5, 17, 42, 99, 3]])
    ours, theirs = logits(store, ids, params, cfg["lora_parameters"]["scale"]), model(ids)
    assert float(mx.max(mx.abs(ours - theirs))) <= 2e-3 * float(mx.max(mx.abs(theirs)))
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [l["iter"] for l in lines if "train_loss" in l] == [1, 2, 3]


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
