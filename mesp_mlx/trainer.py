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
import os
import signal
import threading
import time
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim

from .blas import blas_status
from .checkpointer import Checkpointer
from .config import OPTIMIZERS, TrainConfig, parse_bytes
from .cursor import DataCursor
from .data import batches, epoch_groups, load_datasets
from .distributed import Group
from .engines import make_engine
from .errors import ConfigError
from .io.adapter_formats import load_adapter_weights
from .io.adapters import RESUME_FILE
from .io.sources import load_model
from .lora import LoRAConfig, from_flat, init_lora, num_params, resolve_keys, to_flat, tree_map
from .model import generate
from .plan import plan_for_budget
from .report import Reporter, make_tracker


def learning_rate_schedule(lr, kind, warmup, steps):
    """A constant or cosine-decayed rate, after `warmup` steps rising linearly from 0 (as mlx-lm's warmup does);
    a plain number when it never changes, so a resume may lower it."""
    main = optim.cosine_decay(lr, max(steps - warmup, 1)) if kind == "cosine" else lr
    if warmup <= 0:
        return main
    rest = main if callable(main) else (lambda step: mx.array(lr, mx.float32))
    return optim.join_schedules([optim.linear_schedule(0.0, lr, warmup), rest], [warmup])


class Trainer:
    def __init__(self, config: TrainConfig, log=print):
        c = self.cfg = config
        self.group = Group()
        self.log = log if self.group.rank == 0 else (lambda *a, **k: None)
        self.stop_signal, self.memory_limit = None, None
        self.store = load_model(c.model)
        n = self.store.num_layers
        if c.num_layers > n:
            raise ConfigError(f"num_layers {c.num_layers} is larger than the model's {n} layers")
        try:
            keys = resolve_keys(c.keys, "keys", self.store.args) if c.keys else self.store.args.projections()
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.lora_cfg = LoRAConfig(c.rank, c.scale, keys, c.num_layers, c.lora_dropout)
        self.tokenizer = self.store.tokenizer()
        self.data = load_datasets(self.tokenizer, c.data, c.max_seq_length, c.mask_prompt, c.skip_bad_rows,
                                  c.hf_dataset)
        if c.test and not self.data.get("test"):
            raise ConfigError(f"{c.data}: --test needs a test split (test.jsonl)")
        if len(self.data["train"]) < c.batch_size:
            raise ConfigError(f"{c.data}: {len(self.data['train'])} training example(s), fewer than --batch-size "
                              f"{c.batch_size}")
        self.params = init_lora(self.store.args, self.lora_cfg, c.seed)
        if c.resume_adapter_file:
            expected = {k: tuple(v.shape) for k, v in to_flat(self.params).items()}
            self.params = load_adapter_weights(c.resume_adapter_file, expected, c.scale, store=self.store)
        self.compute = c.compute()
        settings = dict(compute=self.compute, checkpoints=c.checkpoints)
        if c.method == "mezo":
            settings.update(eps=c.mezo_eps, seed=c.seed)
        elif c.lora_dropout:
            settings.update(lora_dropout=c.lora_dropout)
        if c.memory_budget:
            self.memory_limit = parse_bytes(c.memory_budget)
            longest = max(len(ids) - 1 for ids, _ in self.data["train"].examples)
            if c.pack:  # packed rows fill up to max_seq_length
                longest = min(c.max_seq_length, sum(len(ids) - 1 for ids, _ in self.data["train"].examples))
            planned, peak = plan_for_budget(self.store, c.scale, c.batch_size, longest, self.params, c.optimizer,
                                            c.fused_update, self.memory_limit, self.compute)
            self.log(f"[mesp-mlx] memory budget {self.memory_limit / 1e6:.0f} MB: {planned}, predicted peak "
                     f"{peak / 1e6:.0f} MB")
            settings.update(planned)
            self.compute = settings["compute"]
        self.engine = make_engine(c.method, self.store, c.scale, **settings)
        # the update goes into the backward, block by block, whenever that is the same step (no accumulation)
        self.fused = c.fused_update and self.engine.fuses_update and c.grad_accumulation_steps == 1
        per_epoch = math.ceil(len(self.data["train"]) / (c.batch_size * self.group.size))
        self.pack = c.max_seq_length if c.pack else 0
        if self.pack:  # batches of packed rows: as many as the first epoch packs into
            per_epoch = len(epoch_groups(self.data["train"], c.batch_size * self.group.size, c.seed, 0, self.pack))
        self.steps = c.iters if c.epochs <= 0 else math.ceil(c.epochs * per_epoch / c.grad_accumulation_steps)
        self.lr = learning_rate_schedule(c.learning_rate, c.lr_schedule, c.warmup, self.steps)
        self.opt = OPTIMIZERS[c.optimizer](learning_rate=self.lr, **c.optimizer_config)
        self.opt.init(to_flat(self.params))
        self._compiled_update = None  # (state tree, its compiled update): see apply_gradients
        self.step_no = 0
        self.cursor = DataCursor(self.data["train"], c.batch_size, c.seed, self.group.rank, self.group.size,
                                 self.pack)

    def current_lr(self):
        return float(self.lr(mx.array(self.step_no)) if callable(self.lr) else self.lr)

    def evaluate(self, split="valid", max_batches=None):
        """Mean loss per target token over a split's first batches (all with -1), or None without the split."""
        data = self.data.get(split)
        if not data:
            return None
        max_batches = self.cfg.val_batches if max_batches is None else max_batches
        total, count = 0.0, 0.0
        for k, batch in enumerate(batches(data, self.cfg.batch_size, 0, 0, self.pack)):
            if 0 <= max_batches <= k:
                break
            ntok = batch[2].sum().item()
            total += self.engine.loss(self.params, batch).item() * ntok
            count += ntok
        return total / max(count, 1)

    def report_split(self, split, max_batches):
        t0 = time.perf_counter()
        loss = self.evaluate(split, max_batches)
        name = {"valid": "Val", "test": "Test"}[split]
        if loss is None:
            raise ConfigError(f"{self.cfg.data}: there is no {split} split to evaluate ({split}.jsonl)")
        self.log(f"{name} loss {loss:.3f}, {name} ppl {math.exp(min(loss, 50)):.3f}, "
                 f"took {time.perf_counter() - t0:.3f}s")
        return loss

    def test(self):
        """--test: loss and perplexity on the test split (mlx-lm's report line)."""
        if self.cfg.test:
            return self.report_split("test", self.cfg.test_batches)

    def sample(self, with_adapter):
        return generate(self.store, self.tokenizer, self.cfg.sample_prompt, self.cfg.sample_tokens,
                        self.params if with_adapter else None, self.cfg.scale, chat=self.data["train"].chat,
                        compute=self.compute)

    def update_block(self, i, grads, step0):
        """The optimizer's update of block i: every block sees the same step count and learning rate, so updating
        block by block is the same arithmetic as one update of the whole tree."""
        self.opt.state["step"] = step0
        flat = self.apply_gradients()(to_flat({i: grads}), to_flat({i: self.params[i]}))
        mx.eval(flat, self.opt.state)
        self.params[i] = from_flat(flat)[i]

    def apply_gradients(self):
        """The optimizer's apply_gradients, compiled with its state as implicit inputs and outputs (mlx-lm's
        pattern) where the engine compiles its blocks: an Adam update of one block is ~15 kernels instead of ~170.
        Bound to the current state tree, so a resumed run (which replaces it) compiles afresh."""
        if not self.compute.compiled:
            return self.opt.apply_gradients
        cached = self._compiled_update
        if cached is None or cached[0] is not self.opt.state:
            cached = self._compiled_update = (self.opt.state, mx.compile(
                self.opt.apply_gradients, inputs=self.opt.state, outputs=self.opt.state))
        return cached[1]

    def dropout_seed(self, micro):
        """The LoRA dropout masks of this step's micro-batch: a function of the run's seed and the step, so a resumed
        run draws the masks the uninterrupted one would."""
        return (self.cfg.seed * 1_000_003 + self.step_no) * 64 + micro

    def step(self):
        """One optimizer step (with gradient accumulation); returns (loss, tokens of the whole group)."""
        if self.fused or self.cfg.grad_accumulation_steps == 1 and not self.engine.fuses_update:
            batch = self.cursor.next_batch()
            n, total = self.group.tokens(batch)
            step0 = self.opt.state["step"]
            loss = self.engine.train_step(self.params, batch, lambda i, g: self.update_block(i, g, step0),
                                          lambda tree: self.group.mean(tree, n, total), self.dropout_seed(0))
            self.opt.state["step"] = step0 + 1
            return self.group.mean(loss, n, total).item(), total.item()
        acc, loss_sum, tokens = None, 0.0, 0.0
        for micro in range(self.cfg.grad_accumulation_steps):
            batch = self.cursor.next_batch()
            n, total = self.group.tokens(batch)
            grads = {}

            def collect(i, g):
                grads[i] = self.group.mean(g, n, total)
                mx.eval(grads[i])

            loss, _ = self.engine.loss_and_grad(self.params, batch, on_block=collect, seed=self.dropout_seed(micro))
            acc = grads if acc is None else tree_map(lambda a, b: a + b, acc, grads)
            loss_sum += self.group.mean(loss, n, total).item()
            tokens += total.item()
        if self.cfg.grad_accumulation_steps > 1:
            acc = tree_map(lambda a: a / self.cfg.grad_accumulation_steps, acc)
        flat = self.opt.apply_gradients(to_flat(acc), to_flat(self.params))
        mx.eval(flat, self.opt.state)
        self.params = from_flat(flat)
        return loss_sum / self.cfg.grad_accumulation_steps, tokens

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

    def _catch_signals(self):
        """Ctrl-C / SIGTERM: finish the step, save, stop. A second one stops at once (the last checkpoint stays)."""
        self.stop_signal = None
        if threading.current_thread() is not threading.main_thread():
            return {}

        def handler(signum, frame):
            if self.stop_signal is not None:
                raise KeyboardInterrupt
            self.stop_signal = signum
            self.log(f"\n[mesp-mlx] {signal.Signals(signum).name}: stopping after this step and saving "
                     "(again to stop now)")

        return {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}

    def run(self):
        c = self.cfg
        self.log(f"[mesp-mlx] {blas_status()}; device {mx.default_device()}")
        out = Path(c.adapter_path)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"{out}: cannot create the adapter directory ({e.strerror})") from None
        if not os.access(out, os.W_OK):
            raise ConfigError(f"{out}: adapter directory is not writable")
        first = self.group.rank == 0
        checkpointer, reporter = Checkpointer(out, c, self.group), Reporter(out, self.log, first)
        if c.resume:
            self.resume(checkpointer, reporter)
        elif (out / RESUME_FILE).exists():
            self.log(f"[mesp-mlx] note: {out} holds a checkpoint of an earlier run; add --resume to continue it")
        self.log(f"[mesp-mlx] model {self.store.path} ({self.store.args.model_type}, {self.store.num_layers} "
                 f"layers); method {c.method}{' (update fused into backward)' if self.fused else ''}; "
                 f"trainable {num_params(self.params) / 1e6:.3f}M params; {len(self.data['train'])} train examples")
        skipped = sum(d.skipped for d in self.data.values())
        if skipped:
            self.log(f"[mesp-mlx] warning: skipped {skipped} bad data row(s) (--skip-bad-rows)")
        if self.data["train"].truncated:
            self.log(f"[mesp-mlx] warning: {self.data['train'].truncated} examples truncated to {c.max_seq_length}")
        if not c.train:
            if not c.test:
                self.report_split("valid", c.val_batches)
            self.test()
            return self.params
        if c.sample_prompt and self.step_no == 0:
            self.log(f"Before: {c.sample_prompt!r} -> {self.sample(False)!r}")
        if first and c.report_to != "none":  # after the resume: a refused resume leaves no tracker run behind
            reporter.tracker = make_tracker(c.report_to, c.project_name, dataclasses.asdict(c), out)
        old_handlers = self._catch_signals()
        old_limit = mx.set_memory_limit(self.memory_limit) if self.memory_limit else None
        try:
            self.train_loop(checkpointer, reporter)
        finally:
            for sig, h in old_handlers.items():
                signal.signal(sig, h)
            if old_limit is not None:
                mx.set_memory_limit(old_limit)
        if self.stop_signal is not None:
            self.log(f"[mesp-mlx] stopped at step {self.step_no} of {self.steps}; checkpoint in {checkpointer.path}."
                     f" Continue with the same command and --resume")
            return self.params
        self.test()
        if c.sample_prompt:
            self.log(f"After:  {c.sample_prompt!r} -> {self.sample(True)!r}")
        self.log(f"Use it with mlx-lm:\n  mlx_lm.generate --model {self.store.path} --adapter-path {out} "
                 f"--prompt {json.dumps(c.sample_prompt or 'Hello')}\n"
                 f"Export it (GGUF LoRA for llama.cpp / Ollama / LM Studio, PEFT, or merged):\n"
                 f"  python -m mesp_mlx.export --adapter-path {out} --format gguf|peft|fused")
        return self.params

    def train_loop(self, checkpointer, reporter):
        c = self.cfg
        mx.reset_peak_memory()
        with reporter:
            reporter.start(self.steps, self.step_no)
            while self.step_no < self.steps:
                ts, lr = time.perf_counter(), self.current_lr()  # the rate this step applies
                loss, tokens = self.step()
                step = self.step_no = self.step_no + 1
                if not math.isfinite(loss):
                    raise FloatingPointError(
                        f"loss became {loss} at step {step}; the last good checkpoint is in {checkpointer.out}. "
                        f"Continue from it with --resume and a lower --learning-rate (now {c.learning_rate:g})")
                reporter.step(step, loss, tokens, time.perf_counter() - ts, lr,
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
