"""KTO: the loss and stats against TRL's KTOTrainer formula written out in numpy float64, every engine's gradients
against autodiff of the loss written plainly (fp32 and fp64), the KL reference point a constant of the gradient, the
data encoding (TRL's rotated KL completions), and the CLI: a run, its reports and reference cache, its refusals."""
import json

import mlx.core as mx
import numpy as np
import pytest

from helpers import EXACT, assert_grads_close, rel_err
from mesp_mlx.engines import make_engine
from mesp_mlx.io.sources import load_model
from mesp_mlx.objectives import KTO, Objective
from mesp_mlx.ops.linear import Compute
from mesp_mlx.ops.preference import kto_losses, row_logps
from test_preference import metrics, perturbed


def kto_batch(vocab, objective, labels=(1.0, 0.0, 1.0), reference=None, seed=0, dtype=mx.float32, kl_seed=None):
    """B = len(labels) examples as 2B rows of 16 targets: each example's completion, then its KL completion (the
    same 5-token prompt, another answer), answers of different lengths, right-padded. kl_seed: other KL answers."""
    b = len(labels)
    mx.random.seed(seed)
    ids = mx.random.randint(0, vocab, (2 * b, 17))
    if kl_seed is not None:
        ids[b:, 5:] = mx.random.randint(0, vocab, (b, 12), key=mx.random.key(kl_seed))
    ids[b:, :5] = ids[:b, :5]
    mask = mx.ones((2 * b, 16))
    mask[:, :4] = 0
    mask[1, 12:] = 0
    mask[b, 9:] = 0
    mask[2 * b - 1, 13:] = 0
    if reference is None:  # made-up reference scores (any numbers: the reference is a constant of the loss)
        reference = [-40.0 - 3 * k for k in range(2 * b)]
    return objective.batch(ids[:, :-1], ids[:, 1:], mask, reference=mx.array(reference, dtype),
                           desirable=mx.array(labels, dtype))


def trl_kto(policy, reference, labels, beta, wd, wu):
    """TRL's KTOTrainer.kto_loss and its logged metrics, in numpy float64: policy, reference: each row's summed
    log-prob, the B completions then the B KL completions; labels: B booleans."""
    policy, reference = np.asarray(policy, np.float64), np.asarray(reference, np.float64)
    b = len(labels)
    sig = lambda x: 1.0 / (1.0 + np.exp(-x))
    kl = max(np.mean(policy[b:] - reference[b:]), 0.0)
    chosen = [k for k in range(b) if labels[k]]
    rejected = [k for k in range(b) if not labels[k]]
    ratio_c, ratio_r = policy[chosen] - reference[chosen], policy[rejected] - reference[rejected]
    losses = np.concatenate([wd * (1 - sig(beta * (ratio_c - kl))), wu * (1 - sig(beta * (kl - ratio_r)))])
    mean = lambda x: float(np.mean(x)) if len(x) else 0.0  # an empty group: 0 (TRL: NaN, 0 in the margin)
    rc, rr = mean(beta * ratio_c), mean(beta * ratio_r)
    return {"loss": float(np.mean(losses)), "rewards_chosen": rc, "rewards_rejected": rr, "reward_margin": rc - rr,
            "kl": kl, "logps_chosen": mean(policy[chosen]), "logps_rejected": mean(policy[rejected])}


CASES = {  # labels, reference of the KL rows relative to their policy scores (negative: kl > 0), weights
    "mixed": ((1.0, 0.0, 1.0), -2.0, 1.0, 1.0),
    "clamped": ((1.0, 0.0, 0.0), +3.0, 1.0, 1.0),
    "weighted": ((0.0, 1.0, 0.0, 1.0), -1.5, 1.33, 0.7),
    "only desirable": ((1.0, 1.0), -4.0, 1.0, 1.0),
    "only undesirable": ((0.0, 0.0, 0.0), -0.5, 1.0, 2.0),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_loss_and_stats_equal_trls_formula(case):
    labels, kl_shift, wd, wu = CASES[case]
    b, beta = len(labels), 0.5
    nll = mx.random.uniform(0.05, 3.0, (2 * b, 16), key=mx.random.key(3))
    batch = kto_batch(50, KTO(beta, wd, wu), labels)
    policy = np.array(row_logps(nll, batch.mask)[0].tolist(), np.float64)
    # own rows: log-ratios of a few nats either way; KL rows: the reference kl_shift from the policy's score
    reference = np.concatenate([policy[:b] + np.linspace(-3.0, 3.0, b), policy[b:] + kl_shift
                                + np.linspace(-0.5, 0.5, b)])
    batch = kto_batch(50, KTO(beta, wd, wu), labels, reference.tolist())
    ours = KTO(beta, wd, wu).loss_stats(nll, batch)
    want = trl_kto(policy, np.array(batch.fields["reference"].tolist()), [bool(x) for x in labels], beta, wd, wu)
    assert list(ours) == list(KTO.stats) == list(want)
    for k, v in want.items():
        assert abs(ours[k].item() - v) <= EXACT * max(abs(v), 1.0), (k, ours[k].item(), v)
    if case == "clamped":
        assert ours["kl"].item() == 0.0
    if case.startswith("only"):
        assert ours["rewards_rejected" if labels[0] else "rewards_chosen"].item() == 0.0


KL_REF_SHIFT = 2.0  # the KL rows' reference scores lie this far below the policy's: kl = 2, inside the sigmoid


def with_kl_reference(store, params, batch, shift=KL_REF_SHIFT):
    """The batch with its KL rows' reference scores set to each row's policy log-prob (full logits) minus shift, so
    kl is positive and moves the loss, without saturating it."""
    from mesp_mlx.model import logits
    b = batch.inputs.shape[0] // 2
    z = logits(store, batch.inputs, params, 20.0).astype(mx.float32)
    logp = mx.take_along_axis(z - mx.logsumexp(z, axis=-1, keepdims=True), batch.targets[..., None], -1)[..., 0]
    kl_rows = mx.sum(logp * batch.mask, axis=-1)[b:]
    ref = batch.fields["reference"]
    ref = mx.concatenate([ref[:b], (kl_rows - shift).astype(ref.dtype)])
    return batch.objective.batch(batch.inputs, batch.targets, batch.mask, **{**batch.fields, "reference": ref})


@pytest.mark.parametrize("method", ["mesp", "mebp"])
def test_kto_gradients_equal_autodiff(tiny_dir, method):
    store = load_model(str(tiny_dir))
    params = perturbed(store)
    batch = with_kl_reference(store, params, kto_batch(store.args.vocab_size, KTO(0.1, 1.2, 0.8)))
    ref_stats, ref = make_engine("autodiff", store, 20.0).loss_and_grad(params, batch)
    compute = Compute(attn_chunk=5, vocab_chunk=64, token_chunk=7)
    stats, grads = make_engine(method, store, 20.0, compute=compute).loss_and_grad(params, batch)
    assert list(stats) == list(ref_stats) == list(KTO.stats)
    assert ref_stats["kl"].item() > 0  # the reference point is in play
    for k, v in ref_stats.items():
        assert abs(stats[k].item() - v.item()) <= EXACT * max(abs(v.item()), 1.0), k
    assert_grads_close(grads, ref)
    evaluated = make_engine(method, store, 20.0, compute=compute).loss(params, batch)
    assert abs(evaluated["loss"].item() - ref_stats["loss"].item()) <= EXACT * abs(ref_stats["loss"].item())


def test_kto_gradients_exact_in_fp64(tmp_path):
    """fp64 on the CPU, as test_preference_gradients_exact_in_fp64: MLX's fp32-precision exp bounds the agreement
    at a few 1e-7; a wrong per-row scalar is off by far more."""
    from conftest import write_tiny
    store = load_model(str(write_tiny(tmp_path / "m", "qwen2")), quantize=None)
    with mx.stream(mx.cpu):
        params = perturbed(store, mx.float64)
        batch = kto_batch(store.args.vocab_size, KTO(0.1, 1.0, 1.5), dtype=mx.float64)
        compute = Compute(dtype=mx.float64, attn_chunk=4, mlp_chunk=6, vocab_chunk=64, token_chunk=7)
        ref_stats, ref = make_engine("autodiff", store, 20.0, compute=Compute(dtype=mx.float64)).loss_and_grad(
            params, batch)
        for method in ("mesp", "mebp"):
            stats, got = make_engine(method, store, 20.0, compute=compute).loss_and_grad(params, batch)
            worst = max(rel_err(got[i][p][k], ref[i][p][k]) for i in ref for p in ref[i] for k in (0, 1))
            assert worst < 1e-6, (method, worst)
            assert abs(stats["loss"].item() - ref_stats["loss"].item()) <= 1e-7 * abs(ref_stats["loss"].item())


class ConstantKL(Objective):
    """KTO's loss over the B completion rows alone, with the reference point kl a given number."""
    stats = ("loss",)

    def __init__(self, kl, beta, wd, wu):
        self.kl, self.beta, self.wd, self.wu = kl, beta, wd, wu

    def loss_stats(self, nll, batch):
        logp, _ = row_logps(nll, batch.mask.astype(nll.dtype))
        ratio = logp - batch.fields["reference"]
        return {"loss": mx.mean(kto_losses(ratio, self.kl, batch.fields["desirable"], self.beta, self.wd, self.wu))}


def test_kl_reference_point_carries_no_gradient(tmp_path):
    """Other KL completions move kl and so the loss, but each gradient is that of the loss with kl held constant
    at its value: nothing flows back through the KL rows."""
    from conftest import write_tiny
    store = load_model(str(write_tiny(tmp_path / "m", "llama")))
    params = perturbed(store)
    kto = KTO(0.5, 1.0, 1.0)
    engine = make_engine("mesp", store, 20.0, compute=Compute(vocab_chunk=64, token_chunk=7))
    losses = []
    for kl_seed, shift in ((None, 2.0), (11, 4.0)):
        batch = with_kl_reference(store, params, kto_batch(store.args.vocab_size, kto, kl_seed=kl_seed), shift)
        stats, grads = engine.loss_and_grad(params, batch)
        kl, b = stats["kl"].item(), batch.inputs.shape[0] // 2
        # the KL rows' mean log-ratio as their reference scores were set: two exact computations of log-probs
        # (streamed, and full logits) agree to EXACT of their size
        assert abs(kl - shift) <= EXACT * float(mx.max(mx.abs(batch.fields["reference"][b:])))
        own = ConstantKL(mx.array(kl), kto.beta, 1.0, 1.0).batch(
            batch.inputs[:b], batch.targets[:b], batch.mask[:b], reference=batch.fields["reference"][:b],
            desirable=batch.fields["desirable"])
        const_stats, want = make_engine("autodiff", store, 20.0).loss_and_grad(params, own)
        assert abs(const_stats["loss"].item() - stats["loss"].item()) <= EXACT * stats["loss"].item()
        assert_grads_close(grads, want)
        losses.append(stats["loss"].item())
    assert abs(losses[0] - losses[1]) > 100 * EXACT * losses[0]  # the KL rows did change the loss


ROWS = [{"prompt": f"row {i}: the fox", "completion": "the quick brown fox jumps" + " over the dog" * (i % 3),
         "label": i % 2 == 0} for i in range(8)]


def test_kl_rows_are_trls_rotated_completions(chat_tokenizer):
    """Each example's KL row is its own prompt with the completion of the row before it in its run of batch-size
    rows (TRL's rotation); a chat row encodes as the same prompt/completion row; only the completion counts."""
    from mesp_mlx.objectives.kto import encode_kto
    from mesp_mlx.objectives.preference import encode_pair
    rows = [dict(r, completion=f"answer {i}" + " more" * i) for i, r in enumerate(ROWS[:5])]
    data = encode_kto(chat_tokenizer, [(r, "row") for r in rows], 4096, chunk=2)
    assert data.labels == [r["label"] for r in rows]
    for k, partner in enumerate([1, 0, 3, 2, 4]):
        own, kl, start = encode_pair(chat_tokenizer, {"prompt": rows[k]["prompt"], "chosen": rows[k]["completion"],
                                                      "rejected": rows[partner]["completion"]}, "row")
        assert data.pairs[k] == (own, kl, start)
    chat = {"system": "be brief", "messages": [{"role": "user", "content": "the fox"},
                                               {"role": "assistant", "content": "quick"}], "label": False}
    plain = {"system": "be brief", "prompt": "the fox", "completion": "quick", "label": False}
    got = [encode_kto(chat_tokenizer, [(r, "row"), (ROWS[0], "row")], 4096) for r in (chat, plain)]
    assert got[0].pairs == got[1].pairs and got[0].labels == [False, True]
    batch = KTO().make_batch(got[0], [0, 1])
    assert batch.fields["desirable"].tolist() == [0.0, 1.0] and batch.inputs.shape[0] == 4
    c, _, start = got[0].pairs[0]
    assert batch.mask[0].sum().item() == len(c) - start  # the completion's tokens only


@pytest.fixture(scope="module")
def chat_tokenizer(tiny_gguf):
    from test_data import TEMPLATE
    tok = load_model(str(tiny_gguf)).tokenizer()
    tok.chat_template = TEMPLATE
    return tok


def write_rows(d, rows=ROWS):
    d.mkdir()
    for split in ("train", "valid"):
        (d / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return d


def test_cli_trains_kto_and_reports_it(tmp_path, tiny_gguf, capsys):
    from mesp_mlx.objectives.preference import REFERENCE_FILE
    from mesp_mlx.train import main
    data = write_rows(tmp_path / "data")
    common = ["--model", str(tiny_gguf), "--data", str(data), "--sample-prompt", "", "--rank", "4", "--loss", "kto",
              "--batch-size", "2", "--steps-per-report", "1", "--steps-per-eval", "3", "--learning-rate", "1e-2",
              "--beta", "0.5", "--no-retention", "--adapter-path", str(tmp_path / "a")]
    assert main(common + ["--iters", "3"]) == 0
    out = capsys.readouterr().out
    assert "Rewards chosen" in out and "KL" in out and "warning" not in out
    assert (tmp_path / "a" / REFERENCE_FILE).exists() and "reference log-probabilities of 8 example(s)" in out
    train = [r for r in metrics(tmp_path / "a") if "train_loss" in r]
    assert [r["iter"] for r in train] == [1, 2, 3]
    assert all(f"train_{k}" in train[0] for k in KTO.stats)
    assert all(0 <= r["train_loss"] <= 1 and r["train_kl"] >= 0 for r in train)  # each example's loss is < 1
    assert [r["iter"] for r in metrics(tmp_path / "a") if "val_kl" in r] == [3]
    # a second run (another engine) reads the cached reference scores instead of computing them
    assert main(common + ["--iters", "1", "--method", "mebp"]) == 0
    assert "reference log-probabilities" not in capsys.readouterr().out
    # a train split of one label trains, warned once
    one = write_rows(tmp_path / "one", [dict(r, label=True) for r in ROWS])
    assert main(common[:2] + ["--data", str(one)] + common[4:-1] + [str(tmp_path / "b"), "--iters", "1",
                                                                       "--method", "autodiff"]) == 0
    assert capsys.readouterr().out.count("warning: every train example is desirable") == 1


def test_kto_refusals_are_one_line(tmp_path, tiny_gguf, capsys):
    from mesp_mlx.train import main
    data = write_rows(tmp_path / "data")
    base = ["--model", str(tiny_gguf), "--data", str(data), "--sample-prompt", "", "--adapter-path",
            str(tmp_path / "a"), "--loss", "kto", "--batch-size", "2"]
    refusals = {"--batch-size 1": (["--batch-size", "1"], "--loss kto needs --batch-size 2 or more"),
                "--pack": (["--pack"], "--loss kto reads labelled completions from local jsonl files"),
                "mezo": (["--method", "mezo"], "--loss kto needs exact gradients"),
                "weight": (["--undesirable-weight", "0"], "undesirable_weight must be > 0"),
                "rpo": (["--rpo-alpha", "1"], "are DPO's")}
    for what, (extra, msg) in refusals.items():
        assert main(base + extra) == 2, what
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0], (what, err)
    assert main(base[:-4] + ["--desirable-weight", "2"]) == 2  # SFT has no labels to weigh
    assert "are KTO's" in capsys.readouterr().err
    bad = tmp_path / "bad"
    write_rows(bad, ROWS[:3] + [dict(ROWS[3], label="yes")])
    assert main(base[:2] + ["--data", str(bad)] + base[4:]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("[transformers]")]
    assert len(err) == 1 and "train.jsonl:4:" in err[0] and "JSON boolean" in err[0] and "Traceback" not in err[0]


def test_shipped_kto_data_is_the_tools_unpaired_pairs():
    """mesp_mlx/data/kto is make_kto_data.py's output: each shipped preference pair once, by turns its chosen answer
    (true) and another prompt's plain answer (false); a plain answer is never marked down on its own prompt."""
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "tools"))
    try:
        from make_kto_data import unpair
    finally:
        sys.path.remove(str(root / "tools"))
    for split in ("train", "valid"):
        read = lambda p: [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
        pairs, rows = read(root / "mesp_mlx/data/preference" / f"{split}.jsonl"), read(root / "mesp_mlx/data/kto"
                                                                                    / f"{split}.jsonl")
        assert rows == unpair(pairs)
        assert len({r["prompt"] for r in rows}) == len(rows) and abs(2 * sum(r["label"] for r in rows) - len(rows)) <= 1
        own = {p["prompt"]: p["rejected"] for p in pairs}
        assert not any(r["completion"] == own[r["prompt"]] for r in rows if not r["label"])
