"""The training loop: data, engine, optimizer, reports in mlx-lm's form, evaluation, adapters, samples.
Everything `python -m mesp_mlx.train` does is `Trainer(config).run()`."""
import json
import math
import os
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim

from .blas import blas_status
from .config import ConfigError, TrainConfig
from .data import batches, load_datasets
from .engines import make_engine
from .io.adapters import load_adapter_weights, save_adapter
from .io.sources import load_model
from .lora import LoRAConfig, from_flat, init_lora, num_params, resolve_keys, to_flat, tree_map
from .model import generate
from .ops.block import PROJECTIONS
from .ops.linear import set_matmul_path


def rss_mb():
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1024 * 1024) if sys.platform == "darwin" else r / 1024


class Trainer:
    def __init__(self, config: TrainConfig, log=print):
        self.cfg, self.log = config, log

    def setup(self):
        c = self.cfg
        set_matmul_path(c.matmul)
        self.store = load_model(c.model)
        n = self.store.num_layers
        if c.num_layers > n:
            raise ConfigError(f"num_layers {c.num_layers} is larger than the model's {n} layers")
        keys = resolve_keys(c.keys, "keys") if c.keys else PROJECTIONS
        self.lora_cfg = LoRAConfig(c.rank, c.scale, keys, c.num_layers)
        self.tokenizer = self.store.tokenizer()
        self.data = load_datasets(self.tokenizer, c.data, c.max_seq_length, c.mask_prompt)
        self.params = init_lora(self.store.args, self.lora_cfg, c.seed)
        if c.resume_adapter_file:
            expected = {k: tuple(v.shape) for k, v in to_flat(self.params).items()}
            self.params = load_adapter_weights(c.resume_adapter_file, expected)
        kw = dict(eps=c.mezo_eps, seed=c.seed) if c.method == "mezo" else {}
        self.engine = make_engine(c.method, self.store, c.scale, **kw)
        steps = c.iters if c.epochs <= 0 else c.epochs * math.ceil(len(self.data["train"]) / c.batch_size)
        self.steps = steps
        lr = c.learning_rate
        if c.lr_schedule == "cosine":
            lr = optim.cosine_decay(c.learning_rate, steps)
        self.opt = {"sgd": optim.SGD, "adam": optim.Adam, "adamw": optim.AdamW}[c.optimizer](learning_rate=lr)

    def batch_stream(self):
        epoch = 0
        while True:
            yield from batches(self.data["train"], self.cfg.batch_size, self.cfg.seed, epoch)
            epoch += 1

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
                        self.cfg.scale)

    def step(self, batch_iter):
        """One optimizer step (with gradient accumulation); returns (loss, tokens)."""
        c = self.cfg
        if c.method == "mezo":
            batch = next(batch_iter)
            lr = self.opt.learning_rate.item()
            loss, self.params = self.engine.step(self.params, batch, lr)
            return loss.item(), batch[2].sum().item()
        acc, loss_sum, tokens = None, 0.0, 0.0
        for _ in range(c.grad_accumulation_steps):
            batch = next(batch_iter)
            loss, g = self.engine.loss_and_grad(self.params, batch)
            acc = g if acc is None else tree_map(lambda a, b: a + b, acc, g)
            loss_sum += loss.item()
            tokens += batch[2].sum().item()
        if c.grad_accumulation_steps > 1:
            acc = tree_map(lambda a: a / c.grad_accumulation_steps, acc)
        flat = self.opt.apply_gradients(to_flat(acc), to_flat(self.params))
        mx.eval(flat, self.opt.state)
        self.params = from_flat(flat)
        return loss_sum / c.grad_accumulation_steps, tokens

    def run(self):
        c = self.cfg
        self.log(f"[mesp-mlx] {blas_status()}; device {mx.default_device()}")
        self.setup()
        out = Path(c.adapter_path)
        out.mkdir(parents=True, exist_ok=True)
        if not os.access(out, os.W_OK):
            raise ConfigError(f"{out}: adapter directory is not writable")
        self.log(f"[mesp-mlx] model {self.store.path} ({self.store.args.model_type}, {self.store.num_layers} "
                 f"layers); method {c.method}; trainable {num_params(self.params) / 1e6:.3f}M params; "
                 f"{len(self.data['train'])} train examples")
        if self.data["train"].truncated:
            self.log(f"[mesp-mlx] warning: {self.data['train'].truncated} examples truncated to {c.max_seq_length}")
        before = self.sample(False) if c.sample_prompt else None
        if before is not None:
            self.log(f"Before: {c.sample_prompt!r} -> {before!r}")
        metrics = open(out / "metrics.jsonl", "a")
        it, window_loss, window_tok, t0 = self.batch_stream(), [], 0.0, time.perf_counter()
        mx.reset_peak_memory()
        for step in range(1, self.steps + 1):
            loss, tokens = self.step(it)
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss became {loss} at step {step}; the last saved adapter is in {out}. "
                                         "Resume with --resume-adapter-file and a lower --learning-rate")
            window_loss.append(loss)
            window_tok += tokens
            if step % c.steps_per_report == 0 or step == self.steps:
                dt = time.perf_counter() - t0
                rec = {"iter": step, "train_loss": sum(window_loss) / len(window_loss),
                       "learning_rate": self.opt.learning_rate.item(), "it_per_sec": len(window_loss) / dt,
                       "tokens_per_sec": window_tok / dt, "peak_memory_gb": mx.get_peak_memory() / 1e9,
                       "active_memory_gb": mx.get_active_memory() / 1e9, "rss_peak_mb": rss_mb()}
                self.log(f"Iter {step}: Train loss {rec['train_loss']:.3f}, Learning Rate "
                         f"{rec['learning_rate']:.3e}, It/sec {rec['it_per_sec']:.3f}, Tokens/sec "
                         f"{rec['tokens_per_sec']:.3f}, Peak mem {rec['peak_memory_gb']:.3f} GB, "
                         f"RSS {rec['rss_peak_mb']:.0f} MB")
                metrics.write(json.dumps(rec) + "\n")
                metrics.flush()
                window_loss, window_tok, t0 = [], 0.0, time.perf_counter()
            if step % c.steps_per_eval == 0 or step == self.steps:
                tv = time.perf_counter()
                val = self.evaluate()
                if val is not None:
                    self.log(f"Iter {step}: Val loss {val:.3f}, Val ppl {math.exp(min(val, 50)):.3f}, "
                             f"Val took {time.perf_counter() - tv:.3f}s")
                    metrics.write(json.dumps({"iter": step, "val_loss": val}) + "\n")
                t0 += time.perf_counter() - tv
            if step % c.save_every == 0:
                save_adapter(out, self.params, self.lora_cfg, self.store.path, step)
                self.log(f"Iter {step}: Saved adapter weights to {out}")
        metrics.close()
        save_adapter(out, self.params, self.lora_cfg, self.store.path)
        self.log(f"Saved final adapter weights to {out / 'adapters.safetensors'}")
        if c.sample_prompt:
            self.log(f"After:  {c.sample_prompt!r} -> {self.sample(True)!r}")
        self.log(f"Use it with mlx-lm:\n  mlx_lm.generate --model {self.store.path} --adapter-path {out} "
                 f"--prompt {json.dumps(c.sample_prompt or 'Hello')}")
        return self.params
