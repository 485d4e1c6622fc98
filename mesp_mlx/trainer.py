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
import mlx.optimizers as optim

from .blas import blas_status
from .checkpointer import Checkpointer
from .config import OPTIMIZERS, TrainConfig
from .cursor import DataCursor
from .data import batches, epoch_groups, load_datasets
from .distributed import Group
from .engines import make_engine
from .errors import ConfigError
from .io.formats import FORMATS, load_adapter_weights
from .io.adapters import RESUME_FILE, hold_folder
from .io.sources import load_model
from .lora import LoRAConfig, from_flat, init_lora, num_params, resolve_keys, to_flat, tree_map
from .model import generate
from .ops.keys import purpose_key
from .ops.preference import Preference
from .plan import mlx_limits, plan_run
from .preference import attach_reference, load_preference_datasets
from .report import Reporter, as_stats, make_tracker, stats_text


def learning_rate_schedule(lr, kind, warmup, steps):
    """A constant or cosine-decayed rate, after `warmup` steps rising linearly from 0 (as mlx-lm's warmup does);
    a plain number when it never changes, so a resume may lower it."""
    main = optim.cosine_decay(lr, max(steps - warmup, 1)) if kind == "cosine" else lr
    if warmup <= 0:
        return main
    rest = main if callable(main) else (lambda step: mx.array(lr, mx.float32))
    return optim.join_schedules([optim.linear_schedule(0.0, lr, warmup), rest], [warmup])


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


def load_run_data(c, tokenizer):
    """The run's splits: text / completion / chat rows for SFT, pairs (a batch holds batch_size chosen rows, then
    their rejected rows) for a preference loss."""
    if c.loss == "sft":
        return load_datasets(tokenizer, c.data, c.max_seq_length, c.mask_prompt, c.skip_bad_rows, c.hf_dataset)
    data = load_preference_datasets(tokenizer, c.data, c.max_seq_length, c.skip_bad_rows)
    for d in data.values():
        d.objective = Preference(c.loss, c.beta, c.dpo_cpo_loss_type)
    return data


class OptimizerUpdate:
    """The optimizer's update of one block of a step, as one element-wise update of the block's parameters laid end
    to end: the block's gradients are concatenated (one kernel) and the optimizer's per-parameter rule runs once on
    the whole vector, compiled where the engine compiles its blocks (one fused kernel instead of one a parameter,
    ~14 a block). The parameters and their optimizer state are handed back as views of the updated vectors, and a
    block whose parameters and state are still those views next step reuses the vectors as they are (no
    concatenation). The step's first block advances the step count and any scheduled learning rate
    (apply_gradients of nothing); every block applies the values set (apply_single, what apply_gradients does per
    parameter after advancing them), so updating block by block is the arithmetic of one update of the whole tree,
    element for element. Parameters of mixed dtypes or with state that is not element-wise fall back to one update a
    parameter. Bound to the current state tree, so a resumed run (which replaces it) compiles afresh."""

    def __init__(self, opt):
        self.opt, self.compiled, self.vectors = opt, None, {}

    def _rule(self, gradient, parameter, state):
        state = dict(state)
        return self.opt.apply_single(gradient, parameter, state), state

    def _fn(self, compiled):
        if not compiled:
            return self._rule
        if self.compiled is None or self.compiled[0] is not self.opt.state:
            self.compiled = (self.opt.state, mx.compile(self._rule, inputs=self.opt.state))
        return self.compiled[1]

    def __call__(self, compiled, first=True):
        def update(gradients, parameters):  # flat trees ({name: array}), as to_flat makes them
            if first:
                self.opt.apply_gradients({}, {})
            return self._update(gradients, parameters, self._fn(compiled))
        return update

    def _update(self, gradients, parameters, fn):
        names = list(gradients)
        states = [self.opt.state[k] for k in names]
        keys = sorted(states[0])
        if len({parameters[k].dtype for k in names}) > 1 or any(
                sorted(s) != keys or any(s[f].shape != parameters[k].shape for f in keys)
                for k, s in zip(names, states)):
            return {k: self._apply_each(fn, gradients[k], parameters[k], self.opt.state[k]) for k in names}
        held = self.vectors.get(tuple(names))
        if held and all(parameters[k] is held[1][k] and all(self.opt.state[k][f] is held[2][k][f] for f in keys)
                        for k in names):
            p, state = held[0]
        else:  # first update, or parameters / state replaced since (a resume)
            p = mx.concatenate([parameters[k].reshape(-1) for k in names])
            state = {f: mx.concatenate([s[f].reshape(-1) for s in states]) for f in keys}
        p, state = fn(mx.concatenate([gradients[k].reshape(-1) for k in names]), p, state)
        out, views, at = {}, {}, 0
        for k in names:
            shape, n = parameters[k].shape, parameters[k].size
            out[k] = p[at:at + n].reshape(shape)
            views[k] = {f: state[f][at:at + n].reshape(shape) for f in keys}
            self.opt.state[k].update(views[k])
            at += n
        self.vectors[tuple(names)] = ((p, state), out, views)
        return out

    def _apply_each(self, fn, gradient, parameter, state):
        new, values = fn(gradient, parameter, state)
        state.update(values)
        return new


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


def dpo_reference(c, store, params, data, compute, out, log):
    """DPO's reference scores of every pair: read from the cache beside the adapter, the rest computed with a
    forward only (the base with the adapter off, or with --reference-adapter-path)."""
    ref = None
    if c.reference_adapter_path:
        expected = {k: tuple(v.shape) for k, v in to_flat(params).items()}
        ref = load_adapter_weights(c.reference_adapter_path, expected, c.scale, store=store)
    # a forward keeps no checkpoints: more rows per pass of the weights, unless a memory budget sized the batch
    pairs = c.batch_size if c.memory_budget else max(c.batch_size, 8)
    attach_reference(data.values(), store, compute, out, ref, c.scale, pairs, log)


class Trainer:
    def __init__(self, config: TrainConfig, log=print):
        c = self.cfg = config
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
        self.tokenizer = self.store.tokenizer()
        self.data = load_run_data(c, self.tokenizer)
        if c.test and not self.data.get("test"):
            raise ConfigError(f"{c.data}: --test needs a test split (test.jsonl)")
        if len(self.data["train"]) < c.batch_size:
            raise ConfigError(f"{c.data}: {len(self.data['train'])} training example(s), fewer than --batch-size "
                              f"{c.batch_size}")
        self.params = init_lora(self.store.args, self.lora_cfg, c.seed)
        if c.resume_adapter_file:
            expected = {k: tuple(v.shape) for k, v in to_flat(self.params).items()}
            self.params = load_adapter_weights(c.resume_adapter_file, expected, c.scale, store=self.store)
        settings = dict(compute=c.compute(), checkpoints=c.checkpoints)
        if c.memory_budget:
            settings, self.memory_limit = plan_run(c, self.store, self.params, self.data["train"].examples, self.log)
        self.compute = settings["compute"]
        self.engine = make_engine(c.method, self.store, c.scale, config=c, **settings)
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
        self.updates = OptimizerUpdate(self.opt)
        self.step_no = 0
        self.cursor = DataCursor(self.data["train"], c.batch_size, c.seed, self.group.rank, self.group.size,
                                 self.pack)

    def current_lr(self):
        return float(self.lr(mx.array(self.step_no)) if callable(self.lr) else self.lr)

    def evaluate(self, split="valid", max_batches=None):
        """Mean loss per target token over a split's first batches (all with -1), or None without the split; for
        preference pairs, the means over pairs of the loss and its stats (a dict)."""
        data = self.data.get(split)
        if not data:
            return None
        max_batches = self.cfg.val_batches if max_batches is None else max_batches
        total, count = {}, 0.0
        for k, batch in enumerate(batches(data, self.cfg.batch_size, 0, 0, self.pack)):
            if 0 <= max_batches <= k:
                break
            weight = batch[0].shape[0] // 2 if len(batch) > 4 else batch[2].sum().item()  # pairs, or tokens
            for key, v in as_stats(self.engine.loss(self.params, batch)).items():
                total[key] = total.get(key, 0.0) + v * weight
            count += weight
        out = {key: v / max(count, 1) for key, v in total.items()}
        return out if len(out) > 1 else out.get("loss", 0.0)

    def report_split(self, split, max_batches):
        t0 = time.perf_counter()
        loss = self.evaluate(split, max_batches)
        name = {"valid": "Val", "test": "Test"}[split]
        if loss is None:
            raise ConfigError(f"{self.cfg.data}: there is no {split} split to evaluate ({split}.jsonl)")
        if isinstance(loss, dict):
            self.log(f"{name} loss {loss['loss']:.3f}, {stats_text(loss)}, took {time.perf_counter() - t0:.3f}s")
            return loss
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
        """One optimizer step (with gradient accumulation); returns (loss, tokens of the whole group). The loss of
        a preference batch is a dict: the loss and its stats (ops.preference.STATS)."""
        if self.fused or self.cfg.grad_accumulation_steps == 1 and not self.engine.fuses_update:
            batch = self.cursor.next_batch()
            n, total = self.group.weights(batch)
            step0 = self.opt.state["step"]
            loss = self.engine.train_step(self.params, batch, lambda i, g: self.update_block(i, g, step0),
                                          lambda tree: self.group.mean(tree, n, total), self.dropout_key(0))
            if self.opt.state["step"] is step0:  # no block was updated
                self.opt.state["step"] = step0 + 1
            loss = as_stats(self.group.mean(loss, n, total))
            return (loss if len(loss) > 1 else loss["loss"]), self.tokens(batch, total)
        acc, loss_sum, tokens = None, {}, 0.0
        for micro in range(self.cfg.grad_accumulation_steps):
            batch = self.cursor.next_batch()
            n, total = self.group.weights(batch)
            grads = {}

            def collect(i, g):
                grads[i] = self.group.mean(g, n, total)
                return grads[i]

            loss, _ = self.engine.loss_and_grad(self.params, batch, on_block=collect, seed=self.dropout_key(micro))
            acc = grads if acc is None else tree_map(lambda a, b: a + b, acc, grads)
            for key, v in as_stats(self.group.mean(loss, n, total)).items():
                loss_sum[key] = loss_sum.get(key, 0.0) + v / self.cfg.grad_accumulation_steps
            tokens += self.tokens(batch, total)
        if self.cfg.grad_accumulation_steps > 1:
            acc = tree_map(lambda a: a / self.cfg.grad_accumulation_steps, acc)
        flat = self.opt.apply_gradients(to_flat(acc), to_flat(self.params))
        mx.eval(flat, self.opt.state)
        self.params = from_flat(flat)
        return (loss_sum if len(loss_sum) > 1 else loss_sum["loss"]), tokens

    def tokens(self, batch, total):
        """The group's target tokens in this batch: `total` itself unless the group weighed it by pairs."""
        return (total if len(batch) < 5 else self.group.tokens(batch)[1]).item()

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
        if c.loss == "dpo":
            dpo_reference(c, self.store, self.params, self.data, self.compute, out, self.log)
        first = self.group.rank == 0
        checkpointer, reporter = Checkpointer(out, c, self.group), Reporter(out, self.log, first)
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
        self.log(usage_hint(self.store, out, c.sample_prompt))
        return self.params

    def train_loop(self, checkpointer, reporter):
        c = self.cfg
        mx.reset_peak_memory()
        with reporter:
            reporter.start(self.steps, self.step_no)
            while self.step_no < self.steps:
                ts, lr = time.perf_counter(), self.current_lr()  # the rate this step applies
                loss, tokens = self.step()
                stats, loss = (loss, loss["loss"]) if isinstance(loss, dict) else (None, loss)
                step = self.step_no = self.step_no + 1
                if not math.isfinite(loss):
                    raise FloatingPointError(
                        f"loss became {loss} at step {step}; the last good checkpoint is in {checkpointer.out}. "
                        f"Continue from it with --resume and a lower --learning-rate (now {c.learning_rate:g})")
                reporter.step(step, loss, tokens, time.perf_counter() - ts, lr,
                              report=step % c.steps_per_report == 0 or step == self.steps, stats=stats)
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
