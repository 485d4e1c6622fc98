"""The training loop: data, engine, optimizer, reports in mlx-lm's form, evaluation, adapters, samples,
checkpoints that resume exactly, and a clean stop on Ctrl-C / SIGTERM.
Everything `python -m mesp_mlx.train` does is `Trainer(config).run()`.

Resume state (adapter_path/resume.safetensors, replaced atomically): LoRA parameters, optimizer state (moments,
step counter), the number of batches consumed (the data order is a function of seed and epoch, so this is the data
position), MeZO's seed counter (the only random state a run has), and the settings the numbers depend on.
"""
import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim

from .blas import blas_status
from .config import ConfigError, TrainConfig
from .data import batches, collate, epoch_groups, load_datasets
from .engines import make_engine
from .io.adapters import RESUME_FILE, load_adapter_weights, load_resume, save_adapter, save_resume
from .io import SourceError
from .io.sources import load_model
from .lora import LoRAConfig, from_flat, init_lora, num_params, resolve_keys, to_flat, tree_map
from .model import generate
from .plan import parse_bytes, plan_for_budget
from .report import rss_mb
from .ops.block import PROJECTIONS
from .ops.linear import set_compute_dtype, set_matmul_path

# settings a checkpoint's numbers depend on: resuming with other values would not continue the same run
RESUME_KEYS = ("model", "data", "method", "rank", "scale", "keys", "num_layers", "batch_size", "max_seq_length",
               "mask_prompt", "optimizer", "lr_schedule", "seed", "grad_accumulation_steps", "mezo_eps", "dtype")


class Trainer:
    def __init__(self, config: TrainConfig, log=print):
        self.cfg, self.log = config, log
        self.stop_signal, self.old_memory_limit = None, None

    def setup(self):
        c = self.cfg
        # data-parallel over MLX's own distributed group (mlx.launch); a single process is a group of one
        self.group = mx.distributed.init()
        self.rank, self.world = self.group.rank(), self.group.size()
        if self.rank != 0:
            self.log = lambda *args, **kw: None
        set_matmul_path(c.matmul)
        set_compute_dtype(getattr(mx, c.dtype))
        self.store = load_model(c.model)
        n = self.store.num_layers
        if c.num_layers > n:
            raise ConfigError(f"num_layers {c.num_layers} is larger than the model's {n} layers")
        try:
            keys = resolve_keys(c.keys, "keys") if c.keys else PROJECTIONS
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.lora_cfg = LoRAConfig(c.rank, c.scale, keys, c.num_layers)
        self.tokenizer = self.store.tokenizer()
        self.data = load_datasets(self.tokenizer, c.data, c.max_seq_length, c.mask_prompt, c.skip_bad_rows)
        if len(self.data["train"]) < c.batch_size:
            raise ConfigError(f"{c.data}: {len(self.data['train'])} training example(s), fewer than --batch-size "
                              f"{c.batch_size}")
        self.params = init_lora(self.store.args, self.lora_cfg, c.seed)
        if c.resume_adapter_file:
            expected = {k: tuple(v.shape) for k, v in to_flat(self.params).items()}
            self.params = load_adapter_weights(c.resume_adapter_file, expected)
        kw = dict(eps=c.mezo_eps, seed=c.seed) if c.method == "mezo" else {}
        if c.method != "autodiff":
            kw["checkpoints"] = c.checkpoints
        # the update goes into the backward, block by block, whenever that is the same step (no accumulation)
        self.fused = c.fused_update and c.method in ("mesp", "mebp") and c.grad_accumulation_steps == 1
        if c.memory_budget:
            budget = parse_bytes(c.memory_budget)
            longest = max(len(ids) - 1 for ids, _ in self.data["train"].examples)
            plan, peak = plan_for_budget(self.store, c.scale, c.batch_size, longest, self.params, c.optimizer,
                                         self.fused, budget)
            kw.update(plan)
            self.old_memory_limit = mx.set_memory_limit(budget)
            self.log(f"[mesp-mlx] memory budget {budget / 1e6:.0f} MB: {plan}, predicted peak {peak / 1e6:.0f} MB")
        self.engine = make_engine(c.method, self.store, c.scale, **kw)
        per_epoch = math.ceil(len(self.data["train"]) / c.batch_size)
        self.steps = c.iters if c.epochs <= 0 else math.ceil(c.epochs * per_epoch / c.grad_accumulation_steps)
        self.lr = c.learning_rate
        if c.lr_schedule == "cosine":
            self.lr = optim.cosine_decay(c.learning_rate, self.steps)
        self.opt = {"sgd": optim.SGD, "adam": optim.Adam, "adamw": optim.AdamW}[c.optimizer](learning_rate=self.lr)
        self.opt.init(to_flat(self.params))
        self.step_no, self.position, self._epoch, self._index = 0, 0, None, 0

    def next_batch(self):
        """The batch at the current data position (batches consumed so far), then advance. With W processes the
        batches are those of one process with a W times larger batch, each process taking its slice (groups too
        small to give every process a row are skipped)."""
        group = self._next_group()
        lo, hi = self.rank * len(group) // self.world, (self.rank + 1) * len(group) // self.world
        return collate([self.data["train"].examples[j] for j in group[lo:hi]])

    def _next_group(self):
        if self._epoch is None or self._index >= len(self._groups):
            epoch = 0 if self._epoch is None else self._epoch + 1
            groups = epoch_groups(self.data["train"], self.cfg.batch_size * self.world, self.cfg.seed, epoch)
            self._groups = [g for g in groups if len(g) >= self.world]
            self._epoch, self._index = epoch, 0
        self._index += 1
        self.position += 1
        return self._groups[self._index - 1]

    def seek(self, position):
        """Moves the data stream to `position` batches from the start (resume)."""
        self._epoch, self.position = None, 0
        for _ in range(position):
            self._next_group()

    def tokens(self, batch):
        """(this process's target tokens, the whole group's)."""
        n = batch[2].sum()
        return n, (mx.distributed.all_sum(n, group=self.group) if self.world > 1 else n)

    def reduce(self, tree, n, total):
        """The group's token-weighted mean of per-process means (= the mean over the whole global batch)."""
        if self.world == 1:
            return tree
        if isinstance(tree, dict):
            return {k: self.reduce(v, n, total) for k, v in tree.items()}
        if isinstance(tree, tuple):
            return tuple(self.reduce(v, n, total) for v in tree)
        return mx.distributed.all_sum(tree * n, group=self.group) / total

    def evaluate(self):
        valid = self.data.get("valid")
        if not valid:
            return None
        total, count = 0.0, 0.0
        for k, batch in enumerate(batches(valid, self.cfg.batch_size, 0, 0)):
            if k >= self.cfg.val_batches:
                break
            ntok = batch[2].sum().item()
            total += self.engine.loss(self.params, batch).item() * ntok
            count += ntok
        return total / max(count, 1)

    def sample(self, with_adapter):
        lora = self.params if with_adapter else None
        return generate(self.store, self.tokenizer, self.cfg.sample_prompt, self.cfg.sample_tokens, lora,
                        self.cfg.scale, chat=self.data["train"].chat)

    def step(self):
        """One optimizer step (with gradient accumulation); returns (loss, tokens of the whole group)."""
        c = self.cfg
        if c.method == "mezo":
            batch = self.next_batch()
            n, total = self.tokens(batch)
            # the group shares seeds and combines the scalar projections: a few bytes a step
            self.engine.combine = lambda v: self.reduce(mx.array(v), n, total).item()
            loss, self.params = self.engine.step(self.params, batch, self.current_lr())
            return self.reduce(loss, n, total).item(), total.item()
        if self.fused:
            return self.fused_step(self.next_batch())
        acc, loss_sum, tokens = None, 0.0, 0.0
        for _ in range(c.grad_accumulation_steps):
            batch = self.next_batch()
            n, total = self.tokens(batch)
            loss, g = self.gradients(batch, lambda i, gi: self.reduce(gi, n, total))
            acc = g if acc is None else tree_map(lambda a, b: a + b, acc, g)
            loss_sum += self.reduce(loss, n, total).item()
            tokens += total.item()
        if c.grad_accumulation_steps > 1:
            acc = tree_map(lambda a: a / c.grad_accumulation_steps, acc)
        flat = self.opt.apply_gradients(to_flat(acc), to_flat(self.params))
        mx.eval(flat, self.opt.state)
        self.params = from_flat(flat)
        return loss_sum / c.grad_accumulation_steps, tokens

    def gradients(self, batch, per_block):
        """(loss, grads) with per_block(i, grads_i) applied to each block's gradients as the backward makes them
        (the all-reduce of data-parallel runs)."""
        if self.cfg.method == "autodiff":  # one graph: its gradients all exist at the end
            loss, g = self.engine.loss_and_grad(self.params, batch)
            return loss, {i: per_block(i, gi) for i, gi in g.items()}
        grads = {}

        def on_block(i, gi):
            grads[i] = per_block(i, gi)
            mx.eval(grads[i])

        loss, _ = self.engine.loss_and_grad(self.params, batch, on_block=on_block)
        return loss, grads

    def fused_step(self, batch):
        """The optimizer update of each block applied as soon as its (all-reduced) gradients exist, which are then
        dropped: the same arithmetic as the unfused step (every block sees the same step count and learning
        rate)."""
        step0 = self.opt.state["step"]
        n, total = self.tokens(batch)

        def on_block(i, grads):
            self.opt.state["step"] = step0
            grads = self.reduce(grads, n, total)
            flat = self.opt.apply_gradients(to_flat({i: grads}), to_flat({i: self.params[i]}))
            mx.eval(flat, self.opt.state)
            self.params[i] = from_flat(flat)[i]

        loss, _ = self.engine.loss_and_grad(self.params, batch, on_block=on_block)
        return self.reduce(loss, n, total).item(), total.item()

    def save(self, out, numbered):
        """Latest (and numbered) adapter, mlx-lm's files, and the resume checkpoint, each replaced atomically; only
        the first process of a group writes."""
        if self.rank != 0:
            return
        save_adapter(out, self.params, self.lora_cfg, self.store.path, self.step_no if numbered else None)
        state = {"step": self.step_no, "position": self.position, "mezo_calls": getattr(self.engine, "calls", 0),
                 "config": {k: getattr(self.cfg, k) for k in RESUME_KEYS}}
        save_resume(out, self.params, self.opt.state, state)

    def resume(self, out):
        """Continue from out/resume.safetensors. In a group the first process reads it and sends it to the others
        (their own disks need not hold it)."""
        got, error = (self._read_resume(out), None) if self.rank == 0 else (None, None)
        if self.rank == 0 and isinstance(got, Exception):
            got, error = None, got
        if self.world > 1:  # every process learns whether there is a checkpoint, or an error, before any sends
            flag = 2 if error else (1 if got else 0)
            flag = int(mx.distributed.all_sum(mx.array(flag if self.rank == 0 else 0), group=self.group).item())
            if flag == 2:
                raise error or ConfigError(f"the first process could not resume from {out / RESUME_FILE}")
            if flag == 1 and self.rank != 0:
                got = (self.params, dict(self.opt.state), {"step": 0, "position": 0, "mezo_calls": 0})
        elif error:
            raise error
        if not got:
            self.log(f"[mesp-mlx] no checkpoint in {out}; starting at step 0")
            return
        params, opt_state, state = got
        if self.world > 1:
            send = lambda t: mx.distributed.all_sum(t if self.rank == 0 else mx.zeros_like(t), group=self.group)
            flat = to_flat(params)
            params = from_flat({k: send(flat[k]) for k in sorted(flat)})  # the same order in every process
            opt_state = {k: ({s: send(opt_state[k][s]) for s in sorted(opt_state[k])} if isinstance(opt_state[k], dict)
                             else send(opt_state[k].astype(mx.int64)).astype(opt_state[k].dtype))
                         for k in sorted(opt_state)}
            nums = send(mx.array([state["step"], state["position"], state["mezo_calls"]]))
            state = dict(zip(("step", "position", "mezo_calls"), (int(x) for x in nums.tolist())))
        self.params = params
        self.opt.state = opt_state
        self.opt.init(to_flat(self.params))
        if not callable(self.lr):
            self.opt.learning_rate = self.lr  # a resume may lower the learning rate (after a NaN, say)
        self.step_no = state["step"]
        self.seek(state["position"])
        if hasattr(self.engine, "calls"):
            self.engine.calls = state["mezo_calls"]
        metrics = out / "metrics.jsonl"
        if self.rank == 0 and metrics.exists():  # drop what the stopped run logged after its checkpoint
            keep = [ln for ln in metrics.read_text().splitlines() if ln and json.loads(ln)["iter"] <= self.step_no]
            metrics.write_text("".join(ln + "\n" for ln in keep))
        self.log(f"[mesp-mlx] resumed from {out / RESUME_FILE} at step {self.step_no}")

    def _read_resume(self, out):
        """-> (params, optimizer state, state), None without a checkpoint, or the error to raise."""
        try:
            got = load_resume(out)
        except SourceError as e:
            return e
        if got is None:
            return None
        params, opt_state, state = got
        where = out / RESUME_FILE
        now = {k: getattr(self.cfg, k) for k in RESUME_KEYS}
        changed = [f"{k} {v!r} (now {now[k]!r})" for k, v in state["config"].items() if now.get(k) != v]
        if changed:
            return ConfigError(f"{where} was written by a run with other settings: {'; '.join(changed)}")
        expected = {k: tuple(v.shape) for k, v in to_flat(self.params).items()}
        if {k: tuple(v.shape) for k, v in to_flat(params).items()} != expected:
            return ConfigError(f"{where}: its LoRA tensors do not fit this model")
        return got

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
        self.setup()
        out = Path(c.adapter_path)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"{out}: cannot create the adapter directory ({e.strerror})") from None
        if not os.access(out, os.W_OK):
            raise ConfigError(f"{out}: adapter directory is not writable")
        if c.resume:
            self.resume(out)
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
        if c.method == "mezo" and c.optimizer != "sgd":
            self.log("[mesp-mlx] note: mezo updates with plain SGD on its SPSA estimate; --optimizer is not used")
        if c.sample_prompt and self.step_no == 0:
            self.log(f"Before: {c.sample_prompt!r} -> {self.sample(False)!r}")
        old_handlers = self._catch_signals()
        try:
            self.train_loop(out)
        finally:
            for sig, h in old_handlers.items():
                signal.signal(sig, h)
            if self.old_memory_limit is not None:
                mx.set_memory_limit(self.old_memory_limit)
        if self.stop_signal is not None:
            self.log(f"[mesp-mlx] stopped at step {self.step_no} of {self.steps}; checkpoint in {out / RESUME_FILE}."
                     f" Continue with the same command and --resume")
            return self.params
        if c.sample_prompt:
            self.log(f"After:  {c.sample_prompt!r} -> {self.sample(True)!r}")
        self.log(f"Use it with mlx-lm:\n  mlx_lm.generate --model {self.store.path} --adapter-path {out} "
                 f"--prompt {json.dumps(c.sample_prompt or 'Hello')}")
        return self.params

    def train_loop(self, out):
        from tqdm import tqdm

        from .plots import plot_metrics
        c = self.cfg
        window_loss, window_tok, t0 = [], 0.0, time.perf_counter()
        started = t0
        mx.reset_peak_memory()
        bar = tqdm(total=self.steps, initial=self.step_no, disable=None, file=sys.stderr, unit="step",
                   dynamic_ncols=True, leave=False)
        log = self.log if bar.disable else bar.write  # report lines above the bar, not through it
        with open(out / "metrics.jsonl" if self.rank == 0 else os.devnull, "a") as metrics:
            while self.step_no < self.steps:
                ts = time.perf_counter()
                loss, tokens = self.step()
                step = self.step_no = self.step_no + 1
                if not math.isfinite(loss):
                    raise FloatingPointError(
                        f"loss became {loss} at step {step}; the last good checkpoint is in {out}. Continue from it "
                        f"with --resume and a lower --learning-rate (now {c.learning_rate:g})")
                window_loss.append(loss)
                window_tok += tokens
                bar.update(1)
                bar.set_postfix_str(f"loss {loss:.3f}, lr {self.current_lr():.2e}, "
                                    f"{tokens / (time.perf_counter() - ts):.0f} tok/s, "
                                    f"peak {mx.get_peak_memory() / 1e9:.3f} GB, RSS {rss_mb():.0f} MB")
                if step % c.steps_per_report == 0 or step == self.steps:
                    dt = time.perf_counter() - t0
                    rec = {"iter": step, "train_loss": sum(window_loss) / len(window_loss),
                           "learning_rate": self.current_lr(), "it_per_sec": len(window_loss) / dt,
                           "tokens_per_sec": window_tok / dt, "peak_memory_gb": mx.get_peak_memory() / 1e9,
                           "active_memory_gb": mx.get_active_memory() / 1e9, "rss_peak_mb": rss_mb(),
                           "elapsed_s": time.perf_counter() - started}
                    log(f"Iter {step}: Train loss {rec['train_loss']:.3f}, Learning Rate {rec['learning_rate']:.3e}, "
                        f"It/sec {rec['it_per_sec']:.3f}, Tokens/sec {rec['tokens_per_sec']:.3f}, "
                        f"Peak mem {rec['peak_memory_gb']:.3f} GB, RSS {rec['rss_peak_mb']:.0f} MB")
                    metrics.write(json.dumps(rec) + "\n")
                    metrics.flush()
                    window_loss, window_tok, t0 = [], 0.0, time.perf_counter()
                if step % c.steps_per_eval == 0 or step == self.steps:
                    tv = time.perf_counter()
                    val = self.evaluate()
                    if val is not None:
                        log(f"Iter {step}: Val loss {val:.3f}, Val ppl {math.exp(min(val, 50)):.3f}, "
                            f"Val took {time.perf_counter() - tv:.3f}s")
                        metrics.write(json.dumps({"iter": step, "val_loss": val,
                                                  "elapsed_s": time.perf_counter() - started}) + "\n")
                        metrics.flush()
                    t0 += time.perf_counter() - tv
                numbered = step % c.save_every == 0
                if numbered or step == self.steps or self.stop_signal is not None:
                    self.save(out, numbered)
                    log(f"Iter {step}: Saved adapter weights to {out}")
                if self.stop_signal is not None:
                    break
        bar.close()
        png = plot_metrics(out / "metrics.jsonl", out / "training.png") if self.rank == 0 else None
        if png:
            self.log(f"[mesp-mlx] loss and memory chart: {png}")

    def current_lr(self):
        return float(self.lr(mx.array(self.step_no)) if callable(self.lr) else self.lr)
