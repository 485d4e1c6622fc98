"""The training loop: `Trainer(config)` builds the run (model, data, LoRA, engine, optimizer) and `run()` trains it.
Everything `python -m mesp_mlx.train` does is `Trainer(config).run()`.

The trainer never asks which engine runs: it hands the engine a per-block update (the optimizer, applied as each
block's gradients exist when the engine fuses it into its backward) and the group's mean, and reads the engine's
resumable state through `Engine.state()`. Its parts each have one job: `DataCursor` (which batch is next),
`Group` (data-parallel means), `Checkpointer` (adapters and exact resume), `Reporter` (progress, metrics, chart).
"""
import dataclasses
import json
import math
import signal
import threading
import time

import mlx.core as mx

from .blas import blas_status
from .checkpointer import Checkpointer
from .config import TrainConfig
from .cursor import DataCursor
from .data import epoch_groups
from .distributed import Group
from .engines import make_engine
from .errors import ConfigError
from .io.formats import FORMATS, load_adapter_weights
from .io.adapters import RESUME_FILE, hold_folder
from .io.sources import load_model
from .lora import LoRAConfig, from_flat, init_lora, layer_keys, num_params, resolve_keys, to_flat, tree_map
from .model import generate, token_logps
from .models import stop_ids
from .objectives import Rollout, make_objective
from .objectives.preference import attach_reference
from .ops.keys import purpose_key
from .optimizer import OPTIMIZERS, OptimizerUpdate, learning_rate_schedule, make_optimizer
from .plan import mlx_limits, plan_run
from .report import Reporter, make_tracker
from .retention import RetentionCheck
from .sampler import Generator


# Tokens per pass over the weights below which a run says that its steps are short. Each micro-batch multiplies
# every frozen weight a fixed number of times (MeSP: forward, recompute, backward), whatever its length, and on the
# CPU each of those passes also dequantizes the weights: measured on SmolLM2-135M (BENCHMARKS.md, packing), a step
# costs ~0.86 s plus ~7.6 ms per token, so the passes' fixed part equals ~113 tokens' work, and below ~128 tokens
# reading the weights costs more than the tokens do (on Qwen2.5-1.5B a 26-token row cost about what a 256-token row
# does, issue 32). 128 is also half of the default --max-seq-length: first-fit packing leaves at most one packed row
# half empty, so a packed run at the default length is above it whenever the data holds that many tokens.
LOW_TOKENS_PER_PASS = 128


def pass_fill(dataset, objective, batch_size, world, seed, pack):
    """(real tokens, positions with padding) per micro-batch of one process, the means over the first epoch's
    batches as the cursor groups them (packed rows: the sum of their examples' rows)."""
    groups = epoch_groups(dataset, batch_size * world, seed, 0, pack)
    real = padded = 0
    for group in groups:
        rows = [sum(objective.example_rows(dataset, i)[0] for i in item) for item in group] if pack else \
            [n for i in group for n in objective.example_rows(dataset, i)]
        real += sum(rows)
        padded += len(rows) * max(rows)
    n = max(len(groups), 1) * world
    return real / n, padded / n


def catch_signals(trainer):
    """Ctrl-C / SIGTERM: finish the step, save, stop. A second one stops at once (the last checkpoint stays).
    -> the handlers replaced, to put back."""
    trainer.stop_signal = None
    if threading.current_thread() is not threading.main_thread():
        return {}

    def handler(signum, frame):
        if trainer.stop_signal is not None:
            raise KeyboardInterrupt
        trainer.stop_signal = signum
        trainer.log(f"\n[mesp-mlx] {signal.Signals(signum).name}: stopping after this step and saving "
                    "(again to stop now)")

    return {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}


def describe_store(store):
    """The model line of a run's log: what is trained on, at how many bits per weight."""
    info = store.info
    return (f"{store.path} ({store.args.model_type}, {store.num_layers} layers; {store.bits_per_weight():.2f} bits "
            "per weight as stored"
            + (f", {info['source_bits_per_weight']:.2f} in the source" if info.get("source_bits_per_weight") else "")
            + (f", re-quantized: weights {info['requantized_rel_l2']:.4f} off the file's"
               if "requantized_rel_l2" in info else "") + ")")


def usage_hint(store, out, prompt):
    """What to do with the adapter: mlx-lm's command where mlx-lm reads the store, and the export command."""
    formats = "|".join(f for f in FORMATS if f != "mlx-lm")
    use = (f"Use it with mlx-lm:\n  mlx_lm.generate --model {store.path} --adapter-path {out} "
           f"--prompt {json.dumps(prompt or 'Hello')}\n" if store.mlx_lm_readable else
           "The base keeps GGML blocks that mlx-lm cannot read (--requantize makes a store it reads); run the "
           "adapter in llama.cpp on the very GGUF it was trained on.\n")
    return (f"{use}Export it (GGUF LoRA for llama.cpp / Ollama / LM Studio, PEFT, or merged):\n"
            f"  python -m mesp_mlx.export --adapter-path {out} --format {formats}")


def load_reference(c, store, params):
    """The --reference-adapter-path adapter's weights, checked against the run's adapter; None without one."""
    if not c.reference_adapter_path:
        return None
    expected = {k: tuple(v.shape) for k, v in to_flat(params).items()}
    return load_adapter_weights(c.reference_adapter_path, expected, c.scale, store=store)


def score_reference(c, store, params, data, compute, out, log):
    """The reference model's scores of every row, for an objective that needs them: read from the cache beside the
    adapter, the rest computed with a forward only (the base with the adapter off, or with
    --reference-adapter-path)."""
    ref = load_reference(c, store, params)
    # a forward keeps no checkpoints: more rows per pass of the weights, unless a memory budget sized the batch
    pairs = c.batch_size if c.memory_budget else max(c.batch_size, 8)
    attach_reference(data.values(), store, compute, out, ref, c.scale, pairs, log)


def as_floats(stats):
    return {k: v.item() for k, v in stats.items()}


class Trainer:
    def __init__(self, config: TrainConfig, log=print):
        c = self.cfg = config
        if c.device == "gpu" and not mx.is_available(mx.gpu):
            raise ConfigError("--device gpu: this MLX has no GPU backend (on Linux, `pip install mlx[cuda]`; on a "
                              "Mac, mlx-metal comes with mlx); use --device cpu")
        mx.set_default_device(mx.gpu if c.device == "gpu" else mx.cpu)  # the run's device, for all it computes
        self.group = Group()
        self.log = log if self.group.rank == 0 else (lambda *a, **k: None)
        self.stop_signal, self.memory_limit = None, None
        self.store = load_model(c.model, c.quantization(), c.requantize)
        n = self.store.num_layers
        if c.num_layers > n:
            raise ConfigError(f"num_layers {c.num_layers} is larger than the model's {n} layers")
        try:
            keys = resolve_keys(c.keys, "keys", self.store.args) if c.keys else self.store.args.projections()
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.lora_cfg = LoRAConfig(c.rank, c.scale, keys, c.num_layers, c.lora_dropout)
        if not any(layer_keys(self.store.args, keys, i) for i in self.lora_cfg.layers(n)):  # Qwen3.5's mixed blocks
            raise ConfigError(f"keys {', '.join(keys)}: none of the last {len(self.lora_cfg.layers(n))} block(s) has "
                              "them; adapt more layers (--num-layers) or other keys")
        self.tokenizer = self.store.tokenizer()
        self.objective = make_objective(c)
        self.data = self.objective.load_data(self.tokenizer, c)
        if c.test and not self.data.get("test"):
            raise ConfigError(f"{c.data}: --test needs a test split (test.jsonl)")
        if len(self.data["train"]) < c.batch_size:
            raise ConfigError(f"{c.data}: {len(self.data['train'])} training example(s), fewer than --batch-size "
                              f"{c.batch_size}")
        self.params = init_lora(self.store.args, self.lora_cfg, c.seed)
        if c.resume_adapter_file:
            expected = {k: tuple(v.shape) for k, v in to_flat(self.params).items()}
            self.params = load_adapter_weights(c.resume_adapter_file, expected, c.scale, store=self.store)
        # the update goes into the backward, block by block, whenever that is the same step (no accumulation) and
        # the engine has a backward to put it in
        fused = c.fused_update and c.grad_accumulation_steps == 1
        settings = dict(compute=c.compute(), checkpoints=c.checkpoints)
        if c.memory_budget:
            settings, self.memory_limit = plan_run(c, self.store, self.params, self.data["train"].examples,
                                                   self.objective.rows_per_example, fused, self.log)
        self.compute = settings["compute"]
        self.engine = make_engine(c.method, self.store, c.scale, config=c, **settings)
        self.fused = fused and self.engine.fuses_update
        per_epoch = math.ceil(len(self.data["train"]) / (c.batch_size * self.group.size))
        self.pack = c.max_seq_length if c.pack else 0
        if self.pack:  # batches of packed rows: as many as the first epoch packs into
            per_epoch = len(epoch_groups(self.data["train"], c.batch_size * self.group.size, c.seed, 0, self.pack))
        self.steps = c.iters if c.epochs <= 0 else math.ceil(c.epochs * per_epoch / c.grad_accumulation_steps)
        self.lr = learning_rate_schedule(c.learning_rate, c.lr_schedule, c.warmup, self.steps)
        self.opt = make_optimizer(c.optimizer, self.lr, **c.optimizer_config)
        self.opt.init(to_flat(self.params))
        self.updates = OptimizerUpdate(self.opt, OPTIMIZERS[c.optimizer].elementwise)
        self.step_no = 0
        self.sampler, self.reference_params = None, None  # made when first needed
        self.cursor = DataCursor(self.data["train"], self.objective.make_batch, c.batch_size, c.seed,
                                 self.group.rank, self.group.size, self.pack)

    def current_lr(self):
        return float(self.lr(mx.array(self.step_no)) if callable(self.lr) else self.lr)

    def evaluate(self, split="valid", max_batches=None):
        """The objective's stats ({"loss", ...}) over a split's first batches (all with -1), each batch weighed as
        the objective says (per target token, or per example); None without the split."""
        data = self.data.get(split)
        if not data:
            return None
        max_batches = self.cfg.val_batches if max_batches is None else max_batches
        total, count = {}, 0.0
        for k, group in enumerate(epoch_groups(data, self.cfg.batch_size, 0, 0, self.pack)):
            if 0 <= max_batches <= k:
                break
            batch = self.objective.prepare(self.objective.make_batch(data, group, bool(self.pack)),
                                           self.rollout("eval", k))
            weight = self.objective.weight(batch).item()
            for key, v in self.engine.loss(self.params, batch).items():
                total[key] = total.get(key, 0.0) + v.item() * weight
            count += weight
        return {key: v / max(count, 1) for key, v in total.items()}

    def report_split(self, split, max_batches):
        t0 = time.perf_counter()
        stats = self.evaluate(split, max_batches)
        name = {"valid": "Val", "test": "Test"}[split]
        if stats is None:
            raise ConfigError(f"{self.cfg.data}: there is no {split} split to evaluate ({split}.jsonl)")
        words = self.objective.describe(stats, name)
        self.log(f"{name} loss {stats['loss']:.3f}, {words + ', ' if words else ''}"
                 f"took {time.perf_counter() - t0:.3f}s")
        return stats

    def test(self):
        """--test: loss and perplexity on the test split (mlx-lm's report line)."""
        if self.cfg.test:
            return self.report_split("test", self.cfg.test_batches)

    def generator(self):
        """The run's sampler (made once): its weights may hold half of MLX's share of a memory budget (generation
        runs between training steps, never during one), else a quarter of the machine's memory."""
        if self.sampler is None:
            memory = self.memory_limit[0] // 2 if self.memory_limit else None
            self.sampler = Generator(self.store, self.compute, memory)
        return self.sampler

    def rollout(self, purpose, *indices):
        """The model being trained as an objective that samples its batches sees it (objectives.Rollout); its draws
        come from the run's seed, the purpose and the indices (a resumed run draws what the uninterrupted one
        would)."""
        c = self.cfg
        return Rollout(self.generator(), self.tokenizer, tuple(stop_ids(self.tokenizer, self.store.args.model_type)),
                       self.params, c.scale, purpose_key(c.seed, purpose, *indices, self.group.rank),
                       self.reference_logps)

    def reference_logps(self, inputs, targets):
        """Per-token log-probabilities under the reference model: the base, or with --reference-adapter-path."""
        if self.reference_params is None:
            self.reference_params = load_reference(self.cfg, self.store, self.params) or {}
        return token_logps(self.store, inputs, targets, self.reference_params or None, self.cfg.scale, self.compute)

    def sample(self, with_adapter):
        return generate(self.generator(), self.tokenizer, self.cfg.sample_prompt, self.cfg.sample_tokens,
                        self.params if with_adapter else None, self.cfg.scale, chat=self.data["train"].chat)

    def update_block(self, i, grads, step0):
        """The optimizer's update of block i in the step that began at count step0: the first block advances the
        count and the learning rate, every block applies the same ones, so updating block by block is the same
        arithmetic as one update of the whole tree. Returns the new parameters and optimizer state unevaluated: the
        engine evaluates them with the block's backward, in one host sync."""
        first = self.opt.state["step"] is step0  # no block of this step has advanced it yet
        flat = self.updates(self.compute.compiled, first)(to_flat({i: grads}), to_flat({i: self.params[i]}))
        self.params[i] = from_flat(flat)[i]
        return flat, self.opt.state

    def dropout_key(self, micro):
        """The LoRA dropout masks of this step's micro-batch: the run's seed folded with the step, the micro-batch and
        the process (each process's rows draw their own masks), so a resumed run draws the masks the uninterrupted
        one would."""
        return purpose_key(self.cfg.seed, "dropout", self.step_no, micro, self.group.rank)

    def step(self):
        """One optimizer step (with gradient accumulation); returns (the objective's stats as floats, target
        tokens of the whole group)."""
        if self.fused or self.cfg.grad_accumulation_steps == 1 and not self.engine.fuses_update:
            batch = self.objective.prepare(self.cursor.next_batch(), self.rollout("sample", self.step_no, 0))
            n, total, tokens = self.group.totals(self.objective.weight(batch), mx.sum(batch.mask))
            step0 = self.opt.state["step"]
            stats = self.engine.train_step(self.params, batch, lambda i, g: self.update_block(i, g, step0),
                                           lambda tree: self.group.mean(tree, n, total), self.dropout_key(0))
            if self.opt.state["step"] is step0:  # no block was updated
                self.opt.state["step"] = step0 + 1
            return as_floats(self.group.mean(stats, n, total)), tokens.item()
        acc, sums, tokens = None, {}, 0.0
        for micro in range(self.cfg.grad_accumulation_steps):
            batch = self.objective.prepare(self.cursor.next_batch(), self.rollout("sample", self.step_no, micro))
            n, total, group_tokens = self.group.totals(self.objective.weight(batch), mx.sum(batch.mask))
            grads = {}

            def collect(i, g):
                grads[i] = self.group.mean(g, n, total)
                return grads[i]

            stats, _ = self.engine.loss_and_grad(self.params, batch, on_block=collect, seed=self.dropout_key(micro))
            acc = grads if acc is None else tree_map(lambda a, b: a + b, acc, grads)
            for key, v in as_floats(self.group.mean(stats, n, total)).items():
                sums[key] = sums.get(key, 0.0) + v / self.cfg.grad_accumulation_steps
            tokens += group_tokens.item()
        if self.cfg.grad_accumulation_steps > 1:
            acc = tree_map(lambda a: a / self.cfg.grad_accumulation_steps, acc)
        flat = self.opt.apply_gradients(to_flat(acc), to_flat(self.params))
        mx.eval(flat, self.opt.state)
        self.params = from_flat(flat)
        return sums, tokens

    def save(self, checkpointer, numbered):
        checkpointer.save(self.params, self.lora_cfg, self.store.path, self.opt.state, self.step_no,
                          self.cursor.position, self.engine.state(), numbered)

    def resume(self, checkpointer, reporter):
        got = checkpointer.load(self.params, self.opt.state, self.engine.state())
        if not got:
            self.log(f"[mesp-mlx] no checkpoint in {checkpointer.out}; starting at step 0")
            return
        self.params, self.opt.state, state = got
        self.opt.init(to_flat(self.params))
        if not callable(self.lr):
            self.opt.learning_rate = self.lr  # a resume may lower the learning rate (after a NaN, say)
        self.step_no = state["step"]
        self.cursor.seek(state["position"])
        self.engine.load_state(state["engine"])
        reporter.forget_after(self.step_no)
        self.log(f"[mesp-mlx] resumed from {checkpointer.path} at step {self.step_no}")

    def run(self):
        """Trains (or evaluates) holding the adapter folder: a second run into it is refused while this one lives."""
        with hold_folder(self.cfg.adapter_path, lock=self.group.rank == 0) as out, mlx_limits(self.memory_limit):
            return self._run(out)

    def _run(self, out):
        c = self.cfg
        self.log(f"[mesp-mlx] {blas_status()}; device {mx.default_device()}")
        if self.objective.needs_reference:
            score_reference(c, self.store, self.params, self.data, self.compute, out, self.log)
        first = self.group.rank == 0
        checkpointer, reporter = Checkpointer(out, c, self.group), Reporter(out, self.objective, self.log, first)
        if c.resume:
            self.resume(checkpointer, reporter)
        elif (out / RESUME_FILE).exists():
            self.log(f"[mesp-mlx] note: {out} holds a checkpoint of an earlier run; add --resume to continue it")
        self.log(f"[mesp-mlx] model {describe_store(self.store)}; method {c.method}"
                 f"{' (update fused into backward)' if self.fused else ''}; trainable "
                 f"{num_params(self.params) / 1e6:.3f}M params; {len(self.data['train'])} train examples")
        skipped = sum(d.skipped for d in self.data.values())
        if skipped:
            self.log(f"[mesp-mlx] warning: skipped {skipped} bad data row(s) (--skip-bad-rows)")
        for warning in self.data["train"].warnings:
            self.log(f"[mesp-mlx] warning: {warning}")
        if self.data["train"].truncated:
            self.log(f"[mesp-mlx] warning: {self.data['train'].truncated} examples truncated to {c.max_seq_length}")
        if not c.train:
            if not c.test:
                self.report_split("valid", c.val_batches)
            self.test()
            return self.params
        fill = self.weight_pass_note()
        retention = None
        if c.retention:  # the set is checked before any training, then the base scored
            retention = RetentionCheck(self.generator(), self.tokenizer, self.engine, c)
            self.log(f"[mesp-mlx] {retention.before()}")
        if c.sample_prompt and self.step_no == 0:
            self.log(f"Before: {c.sample_prompt!r} -> {self.sample(False)!r}")
        if first and c.report_to != "none":  # after the resume: a refused resume leaves no tracker run behind
            reporter.tracker = make_tracker(c.report_to, c.project_name, dataclasses.asdict(c), out)
        reporter.append({"iter": self.step_no, **fill})
        old_handlers = catch_signals(self)
        try:
            self.train_loop(checkpointer, reporter)
        finally:
            for sig, h in old_handlers.items():
                signal.signal(sig, h)
        if self.stop_signal is not None:
            self.log(f"[mesp-mlx] stopped at step {self.step_no} of {self.steps}; checkpoint in {checkpointer.path}."
                     f" Continue with the same command and --resume")
            return self.params
        self.test()
        if c.sample_prompt:
            self.log(f"After:  {c.sample_prompt!r} -> {self.sample(True)!r}")
        if retention:
            line, record = retention.after(self.params)
            self.log(f"[mesp-mlx] {line}")
            reporter.append({"iter": self.step_no, **record})
        self.log(usage_hint(self.store, out, c.sample_prompt))
        return self.params

    def weight_pass_note(self):
        """How full a pass over the weights is: logs a note when its real tokens are few (LOW_TOKENS_PER_PASS) and
        returns the figures for metrics.jsonl."""
        c = self.cfg
        real, padded = pass_fill(self.data["train"], self.objective, c.batch_size, self.group.size, c.seed,
                                 self.pack)
        passes = self.engine.weight_passes
        fill = {"tokens_per_pass": round(real, 1), "positions_per_pass": round(padded, 1),
                "weight_passes_per_step": passes * c.grad_accumulation_steps,
                "low_tokens_per_pass": real < LOW_TOKENS_PER_PASS}
        if not fill["low_tokens_per_pass"]:
            return fill
        if self.pack:
            remedy = f"a larger --batch-size (now {c.batch_size}) or a longer --max-seq-length (now {c.max_seq_length})"
        elif self.objective.packs:
            remedy = (f"--pack (short rows share rows of --max-seq-length {c.max_seq_length}) or a larger "
                      f"--batch-size (now {c.batch_size})")
        else:
            remedy = f"a larger --batch-size (now {c.batch_size}; --loss {c.loss} does not pack)"
        accum = (f"; --grad-accumulation-steps repeats the passes ({passes * c.grad_accumulation_steps} a step), it "
                 "does not fill them" if c.grad_accumulation_steps > 1 else "")
        self.log(f"[mesp-mlx] note: {real:.0f} tokens per pass over the weights (batch {c.batch_size}"
                 f"{', packed' if self.pack else ''}; mean of the first epoch): {c.method} multiplies every frozen "
                 f"weight {passes} times a batch whatever its length, and below {LOW_TOKENS_PER_PASS} tokens reading "
                 f"the weights costs more than the tokens do; fill the batches with {remedy}{accum}")
        return fill

    def train_loop(self, checkpointer, reporter):
        c = self.cfg
        mx.reset_peak_memory()
        with reporter:
            reporter.start(self.steps, self.step_no)
            while self.step_no < self.steps:
                ts, lr = time.perf_counter(), self.current_lr()  # the rate this step applies
                stats, tokens = self.step()
                loss = stats["loss"]
                step = self.step_no = self.step_no + 1
                if not math.isfinite(loss):
                    raise FloatingPointError(
                        f"loss became {loss} at step {step}; the last good checkpoint is in {checkpointer.out}. "
                        f"Continue from it with --resume and a lower --learning-rate (now {c.learning_rate:g})")
                reporter.step(step, stats, tokens, time.perf_counter() - ts, lr,
                              report=step % c.steps_per_report == 0 or step == self.steps)
                if step % c.steps_per_eval == 0 or step == self.steps:
                    tv = time.perf_counter()
                    val = self.evaluate()
                    if val is not None:
                        reporter.validation(step, val, time.perf_counter() - tv)
                numbered, stop = step % c.save_every == 0, self.stop_requested()
                if numbered or step == self.steps or stop:
                    self.save(checkpointer, numbered)
                    reporter.saved(step)
                if self.stop_signal is not None:
                    break

    def stop_requested(self):
        """Whether to stop after this step: in a group, when any process was signalled, so that all stop on the same
        step (one process leaving alone would leave the others waiting in the next all-reduce)."""
        stop = self.stop_signal is not None
        if self.group.size > 1:
            stop = self.group.sum(mx.array(int(stop))).item() > 0
            if stop and self.stop_signal is None:
                self.stop_signal = signal.SIGTERM
        return stop
