"""Bad input, bad files, numerical trouble, kills and resumes: a clear error naming what is wrong, never a traceback,
never a half-written file, and nothing lost."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import mlx.core as mx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesp_mlx.data import DataError, load_split
from mesp_mlx.io import SourceError
from mesp_mlx.io.formats import load_adapter_weights
from mesp_mlx.io.adapters import load_resume
from mesp_mlx.io.sources import load_model
from mesp_mlx.train import main




@pytest.fixture(scope="module")
def tokenizer(tiny_gguf):
    return load_model(str(tiny_gguf)).tokenizer()


def run(tiny_gguf, tmp_path, *flags):
    return main(["--model", str(tiny_gguf), "--sample-prompt", "", "--rank", "4", "--iters", "2",
                 "--adapter-path", str(tmp_path / "out")] + list(flags))


def data_dir(tmp_path, train_bytes, name="data"):
    d = tmp_path / name
    d.mkdir()
    (d / "train.jsonl").write_bytes(train_bytes)
    return d


GOOD = b'{"text": "the quick brown fox"}\n'
BAD_DATA = {
    "malformed JSON": (GOOD + b'{"text": oops}\n', "train.jsonl:2"),
    "unknown row shape": (GOOD + b'{"question": "hi"}\n', "train.jsonl:2"),
    "non-UTF-8 bytes": (GOOD + b'{"text": "caf\xe9"}\n', "train.jsonl:2"),
    "a number for text": (b'{"text": 5}\n', "must be a string"),
    "messages not a list": (b'{"messages": "hello"}\n', "non-empty list"),
    "empty dataset": (b"\n\n", "no training examples"),
}


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_bad_data_is_reported(tiny_gguf, tmp_path, capsys, case):
    content, expected = BAD_DATA[case]
    assert run(tiny_gguf, tmp_path, "--data", str(data_dir(tmp_path, content))) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err
    assert not (tmp_path / "out" / "adapters.safetensors").exists()


def test_skip_bad_rows_counts_them(tiny_gguf, tmp_path, capsys):
    d = data_dir(tmp_path, GOOD * 3 + b'{"text": oops}\n' + b'{"q": 1}\n' + b"\xff\xfe\n")
    assert run(tiny_gguf, tmp_path, "--data", str(d), "--skip-bad-rows") == 0
    assert "skipped 3 bad data row(s)" in capsys.readouterr().out


def test_small_dataset_and_truncation(tiny_gguf, tmp_path, capsys):
    d = data_dir(tmp_path, GOOD)
    assert run(tiny_gguf, tmp_path, "--data", str(d), "--batch-size", "4") == 2
    assert "fewer than --batch-size 4" in capsys.readouterr().err
    long = data_dir(tmp_path, json.dumps({"text": "fox " * 400}).encode() + b"\n", "long")
    assert run(tiny_gguf, tmp_path, "--data", str(long), "--max-seq-length", "32") == 0
    assert "1 examples truncated to 32" in capsys.readouterr().out


BAD_CONFIG = {
    "keys matching nothing": (["--keys", "qq_proj"], "matches no projection"),
    "too many layers": (["--num-layers", "99"], "larger than the model"),
    "rank 0": (["--rank", "0"], "rank must be > 0"),
    "negative learning rate": (["--learning-rate", "-1"], "learning_rate must be > 0"),
    "budget that cannot fit": (["--memory-budget", "10KB"], "already holds"),
    "budget that is not a size": (["--memory-budget", "lots"], "expected a size"),
    "unknown dtype": (["--dtype", "float8"], "dtype must be"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIG))
def test_bad_config_is_reported_before_work(tiny_gguf, tmp_path, capsys, case):
    flags, expected = BAD_CONFIG[case]
    d = data_dir(tmp_path, GOOD * 4)
    assert run(tiny_gguf, tmp_path, "--data", str(d), *flags) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_bad_files_are_reported(tiny_gguf, tmp_path, capsys):
    d = data_dir(tmp_path, GOOD * 4)
    assert run(tiny_gguf, tmp_path, "--data", str(d)) == 0
    good = (tmp_path / "out" / "adapters.safetensors").read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good[: len(good) // 2])
    assert run(tiny_gguf, tmp_path, "--data", str(d), "--resume-adapter-file", str(truncated)) == 2
    assert "truncated.safetensors" in capsys.readouterr().err
    assert run(tiny_gguf, tmp_path, "--data", str(d), "--rank", "8",  # shapes of rank 4 into a rank 8 run
               "--resume-adapter-file", str(tmp_path / "out" / "adapters.safetensors")) == 2
    assert "does not fit" in capsys.readouterr().err
    (tmp_path / "out" / "resume.safetensors").write_bytes(b"\x00" * 100)
    assert run(tiny_gguf, tmp_path, "--data", str(d), "--resume") == 2
    assert "not a readable checkpoint" in capsys.readouterr().err
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert main(["--model", str(tiny_gguf), "--sample-prompt", "", "--data", str(d),
                 "--adapter-path", str(blocker / "sub")]) == 2
    assert "cannot create the adapter directory" in capsys.readouterr().err


def test_nan_loss_stops_with_advice(tiny_gguf, tmp_path, capsys):
    d = data_dir(tmp_path, GOOD * 4)
    rc = run(tiny_gguf, tmp_path, "--data", str(d), "--optimizer", "sgd", "--learning-rate", "1e30", "--iters", "6",
             "--save-every", "1")
    err = capsys.readouterr().err
    assert rc == 2 and "at step" in err and "--resume" in err and "--learning-rate" in err
    assert load_resume(tmp_path / "out") is not None  # the last good checkpoint is kept and loads


ROWS = [{"text": f"row {i}: " + "the quick brown fox jumps over the lazy dog " * (1 + i % 3)} for i in range(10)]


def test_kills_at_random_moments_never_lose_a_checkpoint(tiny_gguf, tmp_path):
    """The trainer process itself (no shell between) killed at random moments, by SIGKILL and SIGTERM in turn (saves
    happen every step, so many kills land inside one): after each kill every file in the adapter directory loads, the
    next --resume is never blocked by the dead holder's lock, and the end has the losses and the adapter of an
    uninterrupted run, bit for bit."""
    d = tmp_path / "data"
    d.mkdir()
    (d / "train.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS))
    common = [sys.executable, "-m", "mesp_mlx.train", "--model", str(tiny_gguf), "--data", str(d),
              "--sample-prompt", "", "--rank", "4", "--steps-per-report", "1", "--steps-per-eval", "1000",
              "--save-every", "1", "--learning-rate", "1e-2", "--iters", "60"]
    env = dict(os.environ, MESP_MLX_NO_BLAS_PRELOAD="1")
    out = tmp_path / "b"
    rng, steps_at_kill, kills = random.Random(0), [], 0
    for k in range(6):
        saved = lambda: (out / "resume.safetensors").exists() and (out / "resume.safetensors").stat().st_mtime_ns
        before = saved()
        proc = subprocess.Popen(common + ["--adapter-path", str(out), "--resume"], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120  # once this process has saved (a loaded machine starts slowly), a random moment
        while time.time() < deadline and saved() == before and proc.poll() is None:
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.15))  # a tiny model's step is ~20 ms: a few steps later, before the run ends
        if proc.poll() is None:  # alive when killed: a kill that landed
            kills += 1
        proc.send_signal(signal.SIGKILL if k % 2 == 0 else signal.SIGTERM)
        assert proc.wait() in (-signal.SIGKILL, 128 + signal.SIGTERM, -signal.SIGTERM, 0)
        for f in out.glob("*.safetensors"):  # pathlib's * also matches the dot-named temporary a kill may leave
            if not f.name.startswith("."):
                mx.load(str(f))  # never half written
        if (out / "resume.safetensors").exists():  # a temp file a kill leaves behind is never read
            steps_at_kill.append(load_resume(out)[2]["step"])
    assert kills >= 4 and steps_at_kill and steps_at_kill[-1] > 0, (kills, steps_at_kill)
    assert subprocess.run(common + ["--adapter-path", str(out), "--resume"], env=env).returncode == 0
    assert subprocess.run(common + ["--adapter-path", str(tmp_path / "a")], env=env).returncode == 0
    losses = lambda p: [r["train_loss"] for r in map(json.loads, (p / "metrics.jsonl").read_text().splitlines())
                        if "train_loss" in r]
    whole, resumed = losses(tmp_path / "a"), losses(out)
    assert len(resumed) == 60 and whole == resumed
    a, b = mx.load(str(tmp_path / "a" / "adapters.safetensors")), mx.load(str(out / "adapters.safetensors"))
    assert set(a) == set(b) and all(mx.array_equal(a[n], b[n]).item() for n in a)
    print(f"{kills} kills landed; checkpoints at steps {steps_at_kill}")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=400))
def test_fuzz_data_loader(tokenizer, tmp_path_factory, blob):
    f = tmp_path_factory.mktemp("fuzz") / "train.jsonl"
    f.write_bytes(blob)
    try:
        load_split(tokenizer, f, 64, True)
    except DataError:
        pass


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(st.none(), st.integers(), st.text(max_size=20),
                          st.dictionaries(st.sampled_from(["role", "content", "text"]),
                                          st.one_of(st.text(max_size=10), st.integers()), max_size=3)),
                max_size=4),
       st.sampled_from(["text", "prompt", "messages"]))
def test_fuzz_row_shapes(tokenizer, tmp_path_factory, values, kind):
    row = {kind: values if kind == "messages" else (values[0] if values else None)}
    if kind == "prompt":
        row["completion"] = values[-1] if values else None
    f = tmp_path_factory.mktemp("fuzz") / "train.jsonl"
    f.write_text(json.dumps(row) + "\n")
    try:
        load_split(tokenizer, f, 64, True)
    except DataError:
        pass


@pytest.fixture(scope="module")
def good_files(tiny_gguf, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("good")
    d = tmp / "data"
    d.mkdir()
    (d / "train.jsonl").write_bytes(GOOD * 4)
    assert main(["--model", str(tiny_gguf), "--sample-prompt", "", "--rank", "4", "--iters", "1", "--data", str(d),
                 "--adapter-path", str(tmp / "out")]) == 0
    return {"gguf": tiny_gguf.read_bytes(), "adapter": (tmp / "out" / "adapters.safetensors").read_bytes()}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(["gguf", "adapter"]), st.integers(0, 10 ** 6), st.integers(0, 10 ** 6),
       st.binary(min_size=1, max_size=16))
def test_fuzz_model_and_adapter_readers(good_files, tmp_path_factory, kind, cut, at, junk):
    """Truncated or overwritten files: a SourceError naming the file, or a correct load, never a crash or hang."""
    data = bytearray(good_files[kind])
    at = at % len(data)
    data[at:at + len(junk)] = junk
    data = bytes(data[: max(1, cut % (len(data) + 1))])
    f = tmp_path_factory.mktemp("fz") / ("m.gguf" if kind == "gguf" else "a.safetensors")
    f.write_bytes(data)
    try:
        if kind == "gguf":
            from mesp_mlx.io.gguf import config_from_gguf, open_gguf
            config_from_gguf(open_gguf(f), f)
        else:
            load_adapter_weights(f, {})
    except SourceError as e:
        assert str(f) in str(e) or f.name in str(e)
