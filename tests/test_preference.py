"""Preference losses (DPO, ORPO): every engine's gradients against autodiff of the loss written plainly (one graph,
full logits), in fp32 and fp64, and the loss against the formulas as mlx-lm-lora writes them."""
import mlx.core as mx
import pytest

from helpers import EXACT, REL_TOL, assert_grads_close, rel_err
from mesp_mlx.engines import make_engine
from mesp_mlx.io.sources import load_model
from mesp_mlx.lora import LoRAConfig, init_lora, tree_map
from mesp_mlx.ops.linear import Compute
from mesp_mlx.objectives import DPO, ORPO

PREFS = {"dpo": DPO(0.1, "sigmoid"), "ipo": DPO(0.5, "ipo"), "orpo": ORPO(0.25), "dpo+rpo": DPO(0.1, "sigmoid", 1.0)}


def pair_batch(vocab, objective, seed=0, dtype=mx.float32):
    """2 pairs as 4 rows of 16 targets: a shared 5-token prompt masked, answers of different lengths, right-padded;
    DPO gets made-up reference scores (any numbers: the reference is a constant of the loss)."""
    mx.random.seed(seed)
    ids = mx.random.randint(0, vocab, (4, 17))
    ids[2:, :5] = ids[:2, :5]
    mask = mx.ones((4, 16))
    mask[:, :4] = 0
    mask[1, 12:] = 0
    mask[2, 9:] = 0
    fields = {"reference": mx.array([-30.0, -25.0, -28.0, -31.0], dtype)} if objective.needs_reference else {}
    return objective.batch(ids[:, :-1], ids[:, 1:], mask, **fields)


def perturbed(store, dtype=mx.float32, seed=1):
    params = init_lora(store.args, LoRAConfig(rank=4), seed)
    return tree_map(lambda t: (t + 0.02 * mx.random.normal(t.shape, key=mx.random.key(seed + t.size))).astype(dtype),
                    params)


@pytest.mark.parametrize("kind", sorted(PREFS))
@pytest.mark.parametrize("method", ["mesp", "mebp"])
def test_preference_gradients_equal_autodiff(tiny_dir, method, kind):
    store = load_model(str(tiny_dir))
    params = perturbed(store)
    batch = pair_batch(store.args.vocab_size, PREFS[kind])
    ref_stats, ref = make_engine("autodiff", store, 20.0).loss_and_grad(params, batch)
    compute = Compute(attn_chunk=5, vocab_chunk=64, token_chunk=7)
    stats, grads = make_engine(method, store, 20.0, compute=compute).loss_and_grad(params, batch)
    assert list(stats) == list(ref_stats) == list(PREFS[kind].stats)  # the names the objective declares
    for k, v in ref_stats.items():
        assert abs(stats[k].item() - v.item()) <= EXACT * max(abs(v.item()), 1.0), k
    assert_grads_close(grads, ref)
    # the forward alone (evaluation) gives the same stats
    evaluated = make_engine(method, store, 20.0, compute=compute).loss(params, batch)
    assert abs(evaluated["loss"].item() - ref_stats["loss"].item()) <= EXACT * abs(ref_stats["loss"].item())


@pytest.mark.parametrize("kind", ["dpo", "orpo", "dpo+rpo"])
def test_preference_gradients_exact_in_fp64(tmp_path, kind):
    """fp64 on the CPU: as in test_families.test_fp64_gradients_exact, MLX's fp32-precision exp bounds the
    agreement at a few 1e-7; a wrong per-row scalar (sign, beta, a missing mask) is off by far more."""
    from conftest import write_tiny
    store = load_model(str(write_tiny(tmp_path / "m", "qwen2")), quantize=None)
    with mx.stream(mx.cpu):
        params = perturbed(store, mx.float64)
        batch = pair_batch(store.args.vocab_size, PREFS[kind], dtype=mx.float64)
        compute = Compute(dtype=mx.float64, attn_chunk=4, mlp_chunk=6, vocab_chunk=64, token_chunk=7)
        ref_stats, ref = make_engine("autodiff", store, 20.0, compute=Compute(dtype=mx.float64)).loss_and_grad(
            params, batch)
        for method in ("mesp", "mebp"):
            stats, got = make_engine(method, store, 20.0, compute=compute).loss_and_grad(params, batch)
            worst = max(rel_err(got[i][p][k], ref[i][p][k]) for i in ref for p in ref[i] for k in (0, 1))
            assert worst < 1e-6, (method, worst)
            # the same fp32-precision exp: ~2e-9 measured, where a wrong term moves the loss by 1e-3 or more
            assert abs(stats["loss"].item() - ref_stats["loss"].item()) <= 1e-7 * abs(ref_stats["loss"].item())


# mlx-lm-lora is the reference for the data encoding and the loss formulas; not a dependency of the package, `make`
# installs it (without its trainer's dependencies) for these tests; elsewhere they skip, saying so.
PAIR_ROWS = {
    "strings": {"prompt": "the fox", "chosen": "quick brown", "rejected": "the lazy dog"},
    "strings, system": {"system": "be brief", "prompt": "def main():", "chosen": " return 0", "rejected": "fox"},
    "message lists, system": {"system": "be brief", "prompt": "the fox",
                              "chosen": [{"role": "assistant", "content": "quick"}],
                              "rejected": [{"role": "assistant", "content": "the lazy dog jumps"}]},
}


@pytest.fixture(scope="module")
def chat_tokenizer(tiny_gguf):
    from test_data import TEMPLATE
    tok = load_model(str(tiny_gguf)).tokenizer()
    tok.chat_template = TEMPLATE
    return tok


@pytest.mark.parametrize("kind", sorted(PAIR_ROWS))
def test_same_tokens_and_mask_as_mlx_lm_lora(chat_tokenizer, kind):
    datasets = pytest.importorskip("mlx_lm_lora.trainer.datasets")
    from mlx_lm_lora.trainer.dpo_trainer import iterate_dpo_batches
    from mesp_mlx.objectives.preference import encode_pairs
    row = PAIR_ROWS[kind]
    ours = encode_pairs(chat_tokenizer, [(row, "row")], 4096)
    from mlx_lm.tokenizer_utils import TokenizerWrapper
    wrapped = TokenizerWrapper(chat_tokenizer)  # what mlx-lm-lora's loader hands its datasets
    theirs = (datasets.ORPODataset([row], wrapped, system_key="system") if isinstance(row["chosen"], list)
              else datasets.DPODataset([row], wrapped))
    c, r, start = ours.pairs[0]
    assert c == list(theirs[0]["chosen"]) and r == list(theirs[0]["rejected"])
    assert start == theirs[0]["chosen_prompt_length"] == theirs[0]["rejected_prompt_length"]
    batch = DPO().make_batch(ours, [0])
    targets, mask = batch.targets, batch.mask
    chosen, rejected, cmask, rmask = next(iterate_dpo_batches(theirs, 1, 4096))
    for k, (ids, their_ids, their_mask) in enumerate([(c, chosen, cmask), (r, rejected, rmask)]):
        n = len(ids) - 1  # their target mask is mask[:, 1:]; both stop at the row's last real token
        assert targets[k, :n].tolist() == their_ids[0, 1:n + 1].tolist()
        assert mask[k, :n].tolist() == their_mask[0, 1:n + 1].tolist() and mask[k, n:].sum().item() == 0


@pytest.mark.parametrize("kind", sorted(PREFS))
def test_loss_equals_mlx_lm_lora(kind):
    """The same per-token log-probabilities through our loss and through mlx-lm-lora's loss functions."""
    pytest.importorskip("mlx_lm_lora")
    from mlx_lm_lora.trainer.dpo_trainer import compute_score, dpo_loss
    from mlx_lm_lora.trainer.orpo_trainer import orpo_loss
    pref = PREFS[kind]
    batch = pair_batch(50, pref)
    mask = batch.mask
    nll = mx.random.uniform(0.05, 3.0, mask.shape, key=mx.random.key(7))
    ours = pref.loss_stats(nll, batch)
    # theirs takes token masks over the ids, whose [:, 1:] is our target mask
    their_mask = mx.concatenate([mx.zeros((4, 1)), mask], axis=1)
    scores = -nll * mask
    if pref.name == "dpo":
        s = compute_score(scores, their_mask, pref.variant)
        ref = batch.fields["reference"]
        if pref.variant == "ipo":
            ref = ref / mask.sum(-1)
        loss, reward, _, metrics = dpo_loss(s[:2], s[2:], ref[:2], ref[2:], their_mask[:2], their_mask[2:], pref.beta,
                                            0.0, pref.variant)
        # TRL's rpo_alpha: the chosen rows' cross-entropy, a mean over their target tokens, added with that weight
        loss = loss + pref.rpo_alpha * mx.sum(nll[:2] * mask[:2]) / mx.sum(mask[:2])
    else:
        mean = scores.sum(-1) / mask.sum(-1)
        loss, reward, _, metrics = orpo_loss(mean[:2], 0.0, mean[2:], 0.0, their_mask[:2], their_mask[2:],
                                             mx.ones((2,)), pref.beta)
        assert abs(ours["accuracy"].item() - metrics["accuracies"].item()) == 0
    assert abs(ours["loss"].item() - loss.item()) <= EXACT * abs(loss.item())
    assert abs(ours["rewards_chosen"].item() - reward[0].item()) <= EXACT * max(abs(reward[0].item()), 1e-3)
    assert abs(ours["rewards_rejected"].item() - reward[1].item()) <= EXACT * max(abs(reward[1].item()), 1e-3)
    assert abs(ours["reward_margin"].item() - metrics["margins"].item()) <= EXACT * max(abs(metrics["margins"].item()),
                                                                                          1e-3)


PAIRS = [{"prompt": f"row {i}: the fox", "chosen": "the quick brown fox jumps" + " over the dog" * (i % 3),
          "rejected": "lazy dog" + " the lazy dog" * (i % 2)} for i in range(8)]


def write_pairs(d, rows=PAIRS):
    import json
    d.mkdir()
    for split in ("train", "valid"):
        (d / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return d


def metrics(out):
    import json
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("loss", ["dpo", "orpo"])
def test_cli_trains_a_preference_and_reports_it(tmp_path, tiny_gguf, loss, capsys):
    from mesp_mlx.objectives.preference import REFERENCE_FILE
    from mesp_mlx.train import main
    data = write_pairs(tmp_path / "data")
    common = ["--model", str(tiny_gguf), "--data", str(data), "--sample-prompt", "", "--rank", "4", "--loss", loss,
              "--batch-size", "2", "--steps-per-report", "1", "--steps-per-eval", "3", "--learning-rate", "1e-2",
              "--beta", "0.5"]
    assert main(common + ["--iters", "6", "--adapter-path", str(tmp_path / "a")]) == 0
    out = capsys.readouterr()
    assert "Rewards chosen" in out.out and "Accuracy" in out.out
    recs = metrics(tmp_path / "a")
    train = [r for r in recs if "train_loss" in r]
    assert [r["iter"] for r in train] == list(range(1, 7))
    assert all(k in train[0] for k in ("train_rewards_chosen", "train_rewards_rejected", "train_logps_chosen",
                                       "train_logps_rejected", "train_reward_margin",
                                       "train_accuracy"))
    val = [r for r in recs if "val_reward_margin" in r]
    assert [r["iter"] for r in val] == [3, 6]
    if loss == "dpo":  # the reference scores are cached beside the adapter and reused, not recomputed
        assert (tmp_path / "a" / REFERENCE_FILE).exists() and "reference log-probabilities of 8 pair" in out.out
        assert main(common + ["--iters", "2", "--adapter-path", str(tmp_path / "a")]) == 0
        assert "reference log-probabilities" not in capsys.readouterr().out
    # stopped after 2 steps and resumed to 6: the losses and stats of the uninterrupted run
    assert main(common + ["--iters", "2", "--adapter-path", str(tmp_path / "b")]) == 0
    assert main(common + ["--iters", "6", "--adapter-path", str(tmp_path / "b"), "--resume"]) == 0
    resumed = [r for r in metrics(tmp_path / "b") if "train_loss" in r]
    for k in ("train_loss", "train_reward_margin", "train_accuracy"):
        assert max(abs(x[k] - y[k]) for x, y in zip(train, resumed)) <= 1e-6, k


def test_preference_refusals_are_one_line(tmp_path, tiny_gguf, capsys):
    from mesp_mlx.train import main
    data = write_pairs(tmp_path / "data")
    base = ["--model", str(tiny_gguf), "--data", str(data), "--sample-prompt", "",
            "--adapter-path", str(tmp_path / "a")]
    assert main(base + ["--loss", "dpo", "--method", "mezo"]) == 2
    assert "--loss dpo needs exact gradients" in capsys.readouterr().err
    for extra in (["--reference-adapter-path", str(tmp_path)], ["--dpo-cpo-loss-type", "ipo"]):
        assert main(base + ["--loss", "orpo"] + extra) == 2  # DPO's settings would be silently ignored
        assert "are DPO's" in capsys.readouterr().err
    assert main(base + ["--loss", "dpo", "--rpo-alpha", "-1"]) == 2 and "rpo_alpha must be >= 0" in capsys.readouterr().err
    bad = tmp_path / "bad"
    write_pairs(bad, PAIRS[:3] + [{"prompt": "x", "chosen": "y"}])
    assert main(base[:2] + ["--data", str(bad)] + base[4:] + ["--loss", "orpo"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines()
           if not line.startswith("[transformers]")]  # transformers' note when this test imports it first
    assert len(err) == 1 and "train.jsonl:4:" in err[0] and "Traceback" not in err[0]


def test_memory_budget_counts_both_rows_of_a_pair(tmp_path, tiny_gguf):
    """The planner sees 2P rows for P pairs: its predicted peak for a DPO batch is that of an SFT batch twice as
    large, and a DPO run under a budget stays under it."""
    from mesp_mlx.plan import GROWTH, plan_for_budget
    from mesp_mlx.resident import resident_bytes
    from mesp_mlx.train import main
    store = load_model(str(tiny_gguf))
    params = init_lora(store.args, LoRAConfig(rank=4), 0)
    data = write_pairs(tmp_path / "data")
    out = tmp_path / "a"
    budget = int(resident_bytes() * (1 + GROWTH)) + 50_000_000  # the process's part, then MLX's 50 MB
    assert main(["--model", str(tiny_gguf), "--data", str(data), "--sample-prompt", "", "--rank", "4", "--iters", "2",
                 "--loss", "dpo", "--batch-size", "2", "--memory-budget", f"{budget}B", "--adapter-path", str(out)]) == 0
    assert max(r["peak_memory_gb"] for r in metrics(out) if "peak_memory_gb" in r) * 1e9 <= 50e6
    one = plan_for_budget(store, 20.0, 2, 40, params, "adamw", True, 50e6, Compute())[1]
    two = plan_for_budget(store, 20.0, 4, 40, params, "adamw", True, 50e6, Compute())[1]
    assert two > one


def test_two_processes_equal_one_with_twice_the_pairs(tmp_path, tiny_gguf):
    """Data-parallel DPO: two processes with one pair each log the losses and stats of one process with two pairs
    (the group's mean is weighted by pairs, not tokens)."""
    from builders import run_two_processes
    from mesp_mlx.train import main
    data = write_pairs(tmp_path / "pairs")
    common = ["--model", str(tiny_gguf), "--data", str(data), "--sample-prompt", "", "--rank", "4", "--iters", "3",
              "--steps-per-report", "1", "--optimizer", "sgd", "--learning-rate", "1e-2", "--loss", "dpo"]
    run_two_processes(common + ["--batch-size", "1", "--adapter-path", str(tmp_path / "two")])
    assert main(common + ["--batch-size", "2", "--adapter-path", str(tmp_path / "one")]) == 0
    one = [x for x in metrics(tmp_path / "one") if "train_loss" in x]
    two = [x for x in metrics(tmp_path / "two") if "train_loss" in x]
    assert len(two) == 3
    # the same means summed in another order: a whole-model chain's rounding (REL_TOL) of each stat, relative to
    # the stat or, for a margin or reward near 0, to the loss it is a part of
    for k in ("train_loss", "train_reward_margin", "train_rewards_chosen"):
        assert max(abs(x[k] - y[k]) / max(abs(y[k]), abs(y["train_loss"])) for x, y in zip(one, two)) <= REL_TOL, (
            k, one, two)


def test_reference_scores_are_the_plain_log_probabilities(tmp_path, chat_tokenizer, tiny_gguf):
    """The cached reference scores equal each row's summed log-probability from the full logits of the base (or of
    the base with a reference adapter, which gets its own cache entries); a damaged cache is recomputed."""
    from mesp_mlx.model import logits
    from mesp_mlx.objectives.preference import REFERENCE_FILE, attach_reference, encode_pairs
    store = load_model(str(tiny_gguf))
    data = encode_pairs(chat_tokenizer, [(r, "row") for r in PAIRS[:3]], 4096)
    ref_lora = perturbed(store)
    for lora in (None, ref_lora):
        assert attach_reference([data], store, Compute(vocab_chunk=64), tmp_path, lora, 20.0, batch_pairs=2) == 3
        for (c, r, start), got in zip(data.pairs, data.reference):
            for ids, value in ((c, got[0]), (r, got[1])):
                z = logits(store, mx.array([ids[:-1]]), lora, 20.0)[0]
                logp = (z - mx.logsumexp(z, axis=-1, keepdims=True))[mx.arange(len(ids) - 1), mx.array(ids[1:])]
                want = mx.sum(logp[start - 1:]).item()
                assert abs(value - want) <= EXACT * abs(want)
    assert attach_reference([data], store, Compute(vocab_chunk=64), tmp_path, None, 20.0) == 0  # cached
    (tmp_path / REFERENCE_FILE).write_text("{not json")
    assert attach_reference([data], store, Compute(vocab_chunk=64), tmp_path, None, 20.0) == 3


def test_accumulated_and_autodiff_preference_runs(tmp_path, tiny_gguf):
    """The trainer's other path (gradients collected, then one update): accumulated micro-batches of pairs, and the
    autodiff engine, report the loss and its stats."""
    from mesp_mlx.train import main
    data = write_pairs(tmp_path / "data")
    for extra, out in ((["--grad-accumulation-steps", "2"], "acc"), (["--method", "autodiff"], "ad")):
        assert main(["--model", str(tiny_gguf), "--data", str(data), "--sample-prompt", "", "--rank", "4",
                     "--loss", "dpo", "--iters", "2", "--steps-per-report", "1", "--adapter-path",
                     str(tmp_path / out)] + extra) == 0
        train = [r for r in metrics(tmp_path / out) if "train_loss" in r]
        assert len(train) == 2 and all(0 <= r["train_accuracy"] <= 1 and "train_reward_margin" in r for r in train)
