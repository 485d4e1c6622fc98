"""The retention check (issue 37): the shipped set loads on a real model's template, a bad set is refused in one
line before any training, answers count only as whole words, and a run reports what it kept, on the console and in
metrics.jsonl, exactly as a second scoring of the saved adapter gives it."""
import json

import mlx.core as mx
import pytest

from mesp_mlx.engines import make_engine
from mesp_mlx.errors import DataError
from mesp_mlx.io.sources import load_model
from mesp_mlx.lora import from_flat
from mesp_mlx.retention import MAX_TOKENS, SHIPPED, _pattern, load_retention_set, score
from mesp_mlx.sampler import Generator
from mesp_mlx.train import main


def test_answers_count_as_whole_words():
    assert _pattern("7").search("There are 7 days.") and not _pattern("7").search("It has 17 of them")
    assert _pattern("paris").search("The capital is Paris.") and not _pattern("Rome").search("Romeo")
    assert _pattern("H₂O").search("water is H₂O") and _pattern("fifty-six").search("Fifty-six!")


def write_set(d, rows, text="The sun rises in the east and sets in the west."):
    d.mkdir()
    (d / "questions.jsonl").write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows))
    (d / "general.txt").write_text(text)
    return d


@pytest.mark.parametrize("rows,where,what", [
    ([{"prompt": "a?", "answers": ["b"]}, "{oops"], ":2:", "not a valid JSON line"),
    ([{"prompt": "a?", "answers": []}], ":1:", "expected {\"prompt\": str, \"answers\": [str, ...]}"),
    ([{"prompt": "a?", "answers": ["b"]}, {"question": "c?"}], ":2:", "expected"),
    ([{"prompt": "word " * 600, "answers": ["b"]}], ":1:", "do not fit the model's context"),
])
def test_a_bad_set_is_one_line_before_any_training(tmp_path, tiny_gguf, capsys, rows, where, what):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text(json.dumps({"text": "the quick brown fox"}))
    bad = write_set(tmp_path / "set", rows)
    rc = main(["--model", str(tiny_gguf), "--data", str(data), "--sample-prompt", "", "--rank", "4", "--iters", "1",
               "--retention-data", str(bad), "--max-seq-length", "32", "--adapter-path", str(tmp_path / "a")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and where in err[0] and what in err[0] and "Traceback" not in err[0], err
    assert not (tmp_path / "a" / "adapters.safetensors").exists()


def test_shipped_set_fits_the_default_models_template(tiny_gguf):
    store = load_model(str(tiny_gguf))
    rset = load_retention_set(None, store.tokenizer(), True, 4096, 16)
    assert len(rset.questions) == len((SHIPPED / "questions.jsonl").read_text().splitlines()) == 10
    assert len(rset.text) > 100


def test_a_run_reports_what_it_kept(tmp_path, tiny_gguf, capsys):
    """The console line and the metrics record of a run equal a second scoring of the adapter it saved, and of the
    base; --no-retention leaves both out."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("\n".join(json.dumps({"text": f"row {i}: the quick brown fox"})
                                                for i in range(4)))
    common = ["--model", str(tiny_gguf), "--data", str(data), "--sample-prompt", "", "--rank", "4", "--iters", "2",
              "--learning-rate", "1e-2", "--max-seq-length", "32"]
    assert main(common + ["--adapter-path", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "knowledge before training:" in out and "knowledge kept:" in out
    rec = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()][-1]
    store = load_model(str(tiny_gguf))
    tok = store.tokenizer()
    # a text run: its questions still go through the chat template
    rset = load_retention_set(None, tok, True, store.args.max_position_embeddings, MAX_TOKENS)
    engine = make_engine("mesp", store, 20.0)
    params = from_flat(mx.load(str(tmp_path / "a" / "adapters.safetensors")))
    now, base = (score(Generator(store), tok, rset, engine, p, 20.0, 32) for p in (params, {}))
    assert rec["iter"] == 2 and rec["retention_questions"] == 10
    assert (rec["retention_answers"], rec["retention_answers_base"]) == (now["answers"], base["answers"])
    # the same streamed forward of the same weights: the same arithmetic
    assert rec["general_loss"] == pytest.approx(now["general_loss"], rel=1e-6)
    assert rec["general_loss_base"] == pytest.approx(base["general_loss"], rel=1e-6)
    assert rec["general_loss"] != rec["general_loss_base"]  # the adapter changed the model
    assert main(common + ["--adapter-path", str(tmp_path / "b"), "--no-retention"]) == 0
    assert "knowledge" not in capsys.readouterr().out
    assert not any("general_loss" in line for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines())
