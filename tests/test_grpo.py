"""GRPO (issue 35): the loss against TRL's formula written out in numpy fp64, every engine's gradients against
autodiff of the same loss on fixed samples (fp32 and fp64), the rollout (rows, masks, rewards, advantages,
reproducible draws), the reward functions, and the CLI under mesp and autodiff with its refusals."""
import json

import mlx.core as mx
import numpy as np
import pytest

from helpers import EXACT, assert_grads_close, rel_err
from mesp_mlx.engines import make_engine
from mesp_mlx.errors import ConfigError, DataError
from mesp_mlx.io.sources import load_model
from mesp_mlx.lora import LoRAConfig, init_lora, tree_map
from mesp_mlx.objectives import GRPO, Rollout
from mesp_mlx.objectives.rewards import final_answer, reward_functions, same_answer, score
from mesp_mlx.ops.grpo import advantages
from mesp_mlx.ops.linear import Compute
from mesp_mlx.sampler import Generator

EXACT_FN = reward_functions(["exact"])


def objective(loss_type="grpo", beta=0.0, g=3, **kw):
    return GRPO(EXACT_FN, group_size=g, max_completion_length=9, loss_type=loss_type, beta=beta, **kw)


def grpo_batch(vocab, obj, seed=0, dtype=mx.float32):
    """2 prompts x 3 answers as 6 rows of 16 targets: 5 prompt tokens masked, answers of different lengths,
    made-up rewards (any numbers: the advantages are constants of the loss) and reference log-probabilities."""
    mx.random.seed(seed)
    ids = mx.random.randint(0, vocab, (6, 17))
    mask = mx.ones((6, 16))
    mask[:, :4] = 0
    for r, end in enumerate((16, 12, 9, 14, 7, 16)):
        mask[r, end:] = 0
    rewards = mx.array([1.0, 0.0, 0.5, 2.0, 2.0, -1.0])
    fields = dict(advantages=advantages(rewards, 3, True).astype(dtype), reward=mx.mean(rewards),
                  reward_std=mx.array(0.0), reward_exact=mx.array(0.0), completion_length=mx.mean(mx.sum(mask, 1)),
                  sample_seconds=mx.array(1.0), sample_peak_gb=mx.array(0.1))
    if obj.beta:
        fields["reference"] = (-3.0 + 0.5 * mx.random.normal((6, 16))).astype(dtype)
    return obj.batch(ids[:, :-1], ids[:, 1:], mask, **fields)


def trl_grpo(logp, mask, rewards, g, loss_type, beta, ref, max_len, scale=True):
    """TRL's GRPOTrainer loss with one pass per batch (old log-probs = the current ones, detached), in numpy fp64."""
    r = rewards.reshape(-1, g)
    mean, std = r.mean(1, keepdims=True), r.std(1, ddof=1, keepdims=True)
    adv = ((r - mean) / (std + 1e-4) if scale else r - mean).reshape(-1, 1)
    coef = np.exp(logp - logp)  # 1
    per_token = -np.minimum(coef * adv, np.clip(coef, 0.8, 1.2) * adv)
    if beta:
        per_token = per_token + beta * (np.exp(ref - logp) - (ref - logp) - 1)
    if loss_type == "grpo":
        return ((per_token * mask).sum(1) / mask.sum(1)).mean()
    if loss_type == "dapo":
        return (per_token * mask).sum() / mask.sum()
    return (per_token * mask).sum() / (mask.shape[0] * max_len)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_loss_equals_trls_formula(loss_type, beta):
    obj = objective(loss_type, beta)
    batch = grpo_batch(50, obj)
    nll = 1.0 + mx.random.uniform(shape=(6, 16), key=mx.random.key(5))
    stats = obj.loss_stats(nll, batch)
    f64 = lambda a: np.array(a.astype(mx.float32).tolist(), np.float64)
    rewards = np.array([1.0, 0.0, 0.5, 2.0, 2.0, -1.0])
    want = trl_grpo(-f64(nll), f64(batch.mask), rewards, 3, loss_type, beta,
                    f64(batch.fields["reference"]) if beta else None, 9, scale=loss_type != "dr_grpo")
    if loss_type == "dr_grpo":  # no std scaling: the batch's advantages are made scaled, rebuild them unscaled
        batch = obj.batch(batch.inputs, batch.targets, batch.mask,
                          **dict(batch.fields, advantages=advantages(mx.array(rewards, mx.float32), 3, False)))
        stats = obj.loss_stats(nll, batch)
    assert abs(stats["loss"].item() - want) <= EXACT * max(abs(want), 1e-3)
    assert stats["clip_ratio"].item() == 0.0  # one pass per batch: the ratio is 1, nothing is clipped
    assert list(stats) == list(obj.stats) or set(stats) == set(obj.stats)
    if beta:
        m, logp, ref = f64(batch.mask), -f64(nll), f64(batch.fields["reference"])
        kl = ((np.exp(ref - logp) - (ref - logp) - 1) * m).sum() / m.sum()
        assert abs(stats["kl"].item() - kl) <= EXACT * kl


def test_advantages_are_normalised_within_each_group():
    r = mx.array([1.0, 0.0, 0.5, 3.0, 3.0, 3.0])
    a = np.array(advantages(r, 3).tolist())
    assert np.allclose(a[3:], 0)  # a group of equal rewards carries no signal
    assert abs(a[:3].sum()) < 1e-6 and abs(np.std(a[:3], ddof=1) - 1 / (1 + 1e-4 / 0.5)) < 1e-5
    assert np.allclose(np.array(advantages(r, 3, False).tolist()), [0.5, -0.5, 0, 0, 0, 0])


def perturbed(store, dtype=mx.float32, seed=1):
    params = init_lora(store.args, LoRAConfig(rank=4), seed)
    return tree_map(lambda t: (t + 0.02 * mx.random.normal(t.shape, key=mx.random.key(seed + t.size))).astype(dtype),
                    params)


@pytest.mark.parametrize("loss_type,beta", [("grpo", 0.0), ("dapo", 0.04), ("dr_grpo", 0.0)])
@pytest.mark.parametrize("method", ["mesp", "mebp"])
def test_gradients_equal_autodiff(tiny_dir, method, loss_type, beta):
    store = load_model(str(tiny_dir))
    params, obj = perturbed(store), objective(loss_type, beta)
    batch = grpo_batch(store.args.vocab_size, obj)
    ref_stats, ref = make_engine("autodiff", store, 20.0).loss_and_grad(params, batch)
    compute = Compute(attn_chunk=5, vocab_chunk=64, token_chunk=7)
    stats, grads = make_engine(method, store, 20.0, compute=compute).loss_and_grad(params, batch)
    assert set(stats) == set(ref_stats) == set(obj.stats)
    for k, v in ref_stats.items():
        assert abs(stats[k].item() - v.item()) <= EXACT * max(abs(v.item()), 1.0), k
    assert_grads_close(grads, ref)


def test_gradients_exact_in_fp64(tmp_path):
    """fp64 on the CPU, as the preference losses' test: agreement to the fp32-precision exp's few 1e-7."""
    from conftest import write_tiny
    store = load_model(str(write_tiny(tmp_path / "m", "qwen2")), quantize=None)
    with mx.stream(mx.cpu):
        params, obj = perturbed(store, mx.float64), objective("grpo", 0.04)
        batch = grpo_batch(store.args.vocab_size, obj, dtype=mx.float64)
        ref_stats, ref = make_engine("autodiff", store, 20.0, compute=Compute(dtype=mx.float64)).loss_and_grad(
            params, batch)
        compute = Compute(dtype=mx.float64, attn_chunk=4, mlp_chunk=6, vocab_chunk=64, token_chunk=7)
        for method in ("mesp", "mebp"):
            stats, got = make_engine(method, store, 20.0, compute=compute).loss_and_grad(params, batch)
            worst = max(rel_err(got[i][p][k], ref[i][p][k]) for i in ref for p in ref[i] for k in (0, 1))
            assert worst < 1e-6, (method, worst)


def test_final_answers_and_their_comparison():
    assert final_answer("so the total is 12.\n#### 1,000") == "1,000" and same_answer("1,000", "1000")
    assert final_answer("it is \\boxed{42} I think") == "42" and same_answer("42.0", 42)
    assert final_answer("7 plus 5 makes 12.") == "12" and final_answer("no digits") is None
    assert same_answer(" Paris. ", "paris") and not same_answer("12", "13") and not same_answer(None, "1")


def test_reward_errors_name_the_row_and_the_function(tmp_path):
    f = tmp_path / "my_rewards.py"
    f.write_text("def length(prompt, completion, row):\n    return len(completion) / 10\n"
                 "def broken(prompt, completion, row):\n    return row['missing']\n"
                 "def text(prompt, completion, row):\n    return 'high'\n")
    fns = reward_functions([f"{f}:length", "exact"])
    assert score(fns, "q", "the answer is 4", {"answer": "4"}, "t.jsonl:3") == [1.5, 1.0]
    with pytest.raises(DataError, match=r"t.jsonl:3.*'broken' raised KeyError"):
        score(reward_functions([f"{f}:broken"]), "q", "a", {}, "t.jsonl:3")
    with pytest.raises(DataError, match=r"t.jsonl:3.*'text' returned 'high', expected a finite number"):
        score(reward_functions([f"{f}:text"]), "q", "a", {}, "t.jsonl:3")
    with pytest.raises(DataError, match="t.jsonl:9.*'answer' field"):
        score(EXACT_FN, "q", "a", {}, "t.jsonl:9")
    for bad in (f"{f}:nothing", "no_such_module_here:fn", "exactly"):
        with pytest.raises(ConfigError):
            reward_functions([bad])


def test_rollout_rows_rewards_and_reproducible_draws(tiny_gguf):
    """prepare() samples G answers per prompt from the adapter: each row is the prompt and an answer (its stop token
    kept, as TRL counts it), only the answer's tokens count, and the advantages are its group's; the same key
    draws the same answers."""
    store = load_model(str(tiny_gguf))
    tok = store.tokenizer()
    obj = GRPO(reward_functions(["format"], r"\d"), group_size=3, max_completion_length=6)
    prompts = [([5, 17, 42, 99], "q1", {"answer": "1"}, "t:1"), ([8, 3], "q2", {"answer": "2"}, "t:2")]
    stops = (int(tok.eos_token_id),)
    rollout = lambda seed: Rollout(Generator(store), tok, stops, {}, 20.0, mx.random.key(seed), None)
    batch = obj.prepare(obj.batch(None, None, None, prompts=prompts), rollout(0))
    again = obj.prepare(obj.batch(None, None, None, prompts=prompts), rollout(0))
    assert mx.array_equal(batch.inputs, again.inputs) and mx.array_equal(batch.mask, again.mask)
    assert batch.inputs.shape[0] == 6 and obj.prepare(batch, rollout(1)) is batch
    replies = Generator(store).generate([p[0] for p in prompts for _ in range(3)], None, 20.0, obj.sampling, stops,
                                        key=mx.random.key(0))
    rewards = []
    for r, reply in enumerate(replies):
        ids = prompts[r // 3][0]
        answer = reply.tokens + ([reply.stop] if reply.stop is not None else [])
        row = np.array(batch.mask[r].tolist())
        assert row.sum() == len(answer) and row[:len(ids) - 1].sum() == 0
        assert batch.targets[r, len(ids) - 1:len(ids) - 1 + len(answer)].tolist() == answer
        rewards.append(1.0 if any(c.isdigit() for c in tok.decode(reply.tokens)) else 0.0)
    assert np.allclose(np.array(batch.fields["advantages"].tolist()),
                       np.array(advantages(mx.array(rewards), 3).tolist()))
    assert abs(batch.fields["reward"].item() - np.mean(rewards)) < 1e-6


def write_prompts(d, n=6, extra=None):
    d.mkdir()
    rows = [{"prompt": f"what is {k} plus {k}", "answer": str(2 * k)} for k in range(n)] + (extra or [])
    for split in ("train", "valid"):
        (d / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return d


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_cli_trains_and_reports_under_mesp_and_autodiff(tmp_path, tiny_gguf, capsys):
    """The same run under mesp and autodiff: the same samples (same seed, same adapter at step 1) and the same
    loss; the reward stats in the progress line and metrics.jsonl; a user's reward function by file."""
    from mesp_mlx.train import main
    data = write_prompts(tmp_path / "data")
    f = tmp_path / "rw.py"
    f.write_text("def digits(prompt, completion, row):\n    return sum(c.isdigit() for c in completion) / 4\n")
    common = ["--model", str(tiny_gguf), "--data", str(data), "--sample-prompt", "", "--rank", "4", "--loss", "grpo",
              "--batch-size", "2", "--group-size", "3", "--max-completion-length", "5", "--max-seq-length", "64",
              "--reward-functions", "exact", f"{f}:digits", "--steps-per-report", "1", "--steps-per-eval", "2",
              "--val-batches", "1", "--learning-rate", "1e-2", "--iters", "2", "--no-retention", "--optimizer", "sgd"]
    runs = {}
    for method in ("mesp", "autodiff"):
        assert main(common + ["--method", method, "--adapter-path", str(tmp_path / method)]) == 0
        runs[method] = [r for r in metrics(tmp_path / method) if "train_loss" in r]
    out = capsys.readouterr().out
    assert "Reward" in out and "digits" in out and "Clip ratio" in out and "sampled in" in out
    first, ref = runs["mesp"][0], runs["autodiff"][0]
    for k in ("train_reward", "train_reward_digits", "train_reward_exact", "train_completion_length"):
        assert first[k] == ref[k], k  # the same draws
    assert abs(first["train_loss"] - ref["train_loss"]) <= EXACT * max(abs(ref["train_loss"]), 1.0)
    assert [r["iter"] for r in metrics(tmp_path / "mesp") if "val_reward" in r] == [2]


def test_refusals_are_one_line(tmp_path, tiny_gguf, capsys):
    from mesp_mlx.train import main
    data = write_prompts(tmp_path / "data")
    base = ["--model", str(tiny_gguf), "--data", str(data), "--loss", "grpo", "--iters", "1", "--adapter-path",
            str(tmp_path / "a"), "--max-seq-length", "64", "--max-completion-length", "8"]
    for extra, words in ((["--temperature", "0"], "temperature must be > 0"),
                         (["--group-size", "1"], "group_size must be >= 2"),
                         (["--method", "mezo"], "exact gradients"),
                         (["--reward-functions", "nope"], "reward function 'nope'"),
                         (["--reference-adapter-path", str(tmp_path)], "needs --beta > 0")):
        assert main(base + extra) == 2, extra
        err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("[transformers]")]
        assert len(err) == 1 and words in err[0], (extra, err)
    long = write_prompts(tmp_path / "long", 2, [{"prompt": "word " * 80, "answer": "1"}])
    assert main(base[:2] + ["--data", str(long)] + base[4:]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("[transformers]")]
    assert len(err) == 1 and "train.jsonl:3:" in err[0] and "do not fit --max-seq-length 64" in err[0]


def test_memory_budget_covers_the_sampling(tmp_path, tiny_gguf):
    """Under --memory-budget the planner sees G rows per prompt, each as long as the prompt and the longest answer,
    and the sampler's weights may take half of MLX's share: the run's MLX peak, sampling included, stays within
    the share (as for DPO), and the weights are streamed when half the share cannot hold them."""
    from mesp_mlx.config import config_from_args
    from mesp_mlx.plan import GROWTH
    from mesp_mlx.resident import resident_bytes
    from mesp_mlx.sampler import weight_holding
    from mesp_mlx.train import main
    from mesp_mlx.trainer import Trainer
    from mesp_mlx.plots import chart_library
    data = write_prompts(tmp_path / "data")
    load_model(str(tiny_gguf)).tokenizer(), chart_library()  # what the run holds before its plan, loaded once
    budget = int(resident_bytes() * (1 + GROWTH)) + 50_000_000  # the process's part, then MLX's 50 MB
    args = ["--model", str(tiny_gguf), "--data", str(data), "--sample-prompt", "", "--rank", "4", "--iters", "2",
            "--loss", "grpo", "--batch-size", "2", "--group-size", "3", "--max-completion-length", "6",
            "--max-seq-length", "64", "--no-retention", "--memory-budget", f"{budget}B"]
    assert main(args + ["--adapter-path", str(tmp_path / "a")]) == 0
    recs = metrics(tmp_path / "a")
    assert max(r["peak_memory_gb"] for r in recs if "peak_memory_gb" in r) * 1e9 <= 50e6
    assert all(0 < r["train_sample_peak_gb"] * 1e9 <= 50e6 for r in recs if "train_loss" in r)
    trainer = Trainer(config_from_args(args + ["--adapter-path", str(tmp_path / "b")]))
    share = trainer.memory_limit[0]
    assert trainer.generator().holding == weight_holding(trainer.store, trainer.compute, share // 2)
    assert weight_holding(trainer.store, trainer.compute, 0) == "streamed"
