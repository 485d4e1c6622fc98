"""One dataclass for a run: defaults, a YAML recipe, then command-line flags (flags win). Unknown keys and flags
are errors, never ignored. Flag names follow mlx-lm's `lora` where it has the same setting."""
import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import yaml

DEFAULT_DATA = str(Path(__file__).parent / "data" / "persona")


class ConfigError(ValueError):
    pass


@dataclass
class TrainConfig:
    model: str = None  # None: the built-in SmolLM2-135M-Instruct
    data: str = DEFAULT_DATA
    train: bool = True
    method: str = "mesp"
    iters: int = 30
    epochs: int = 0  # > 0: overrides iters
    batch_size: int = 1
    num_layers: int = -1
    max_seq_length: int = 256
    learning_rate: float = 1e-4
    optimizer: str = "adamw"
    lr_schedule: str = "constant"  # constant | cosine
    rank: int = 8
    scale: float = 20.0
    alpha: float = None  # given: scale = alpha / rank
    keys: list = None
    mask_prompt: bool = True
    adapter_path: str = "adapters"
    steps_per_report: int = 5
    steps_per_eval: int = 50
    val_batches: int = 8
    save_every: int = 100
    resume_adapter_file: str = None
    resume: bool = False  # continue from adapter_path/resume.safetensors
    fused_update: bool = True  # apply each block's update inside the backward when that is the same step
    dtype: str = "float32"  # compute dtype: float32 | bfloat16 | float16 (Metal) | float64 (CPU)
    memory_budget: str = None  # e.g. 300MB: plan chunk sizes and checkpoints to fit (mesp), or refuse
    checkpoints: str = "memory"  # memory | disk: where block checkpoints wait for the backward
    skip_bad_rows: bool = False  # skip malformed data rows (with a count) instead of stopping at the first
    seed: int = 0
    grad_accumulation_steps: int = 1
    matmul: str = "auto"
    mezo_eps: float = 1e-2
    sample_prompt: str = "What is the capital of France?"
    sample_tokens: int = 24

    def validate(self):
        from .engines import ENGINES
        checks = [(self.rank > 0, "rank must be > 0"), (self.learning_rate > 0, "learning_rate must be > 0"),
                  (self.batch_size > 0, "batch_size must be > 0"), (self.iters > 0 or self.epochs > 0,
                                                                    "iters must be > 0"),
                  (self.method in ENGINES, f"method must be one of {', '.join(ENGINES)}"),
                  (self.optimizer in ("sgd", "adam", "adamw"), "optimizer must be sgd, adam or adamw"),
                  (self.lr_schedule in ("constant", "cosine"), "lr_schedule must be constant or cosine"),
                  (self.max_seq_length > 1, "max_seq_length must be > 1"),
                  (self.grad_accumulation_steps > 0, "grad_accumulation_steps must be > 0"),
                  (self.matmul in ("auto", "quantized", "dequantize"), "matmul must be auto, quantized or dequantize"),
                  (self.checkpoints in ("memory", "disk"), "checkpoints must be memory or disk"),
                  (self.memory_budget is None or self.method == "mesp",
                   "--memory-budget plans MeSP's step; use it with --method mesp"),
                  (self.dtype in ("float32", "bfloat16", "float16", "float64"),
                   "dtype must be float32, bfloat16, float16 or float64")]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)
        if self.alpha is not None:
            self.scale = self.alpha / self.rank
        if self.memory_budget is not None:
            from .plan import parse_bytes
            parse_bytes(self.memory_budget)
        return self


def load_recipe(path):
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read recipe ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe is a mapping of settings")
    data = {k.replace("-", "_"): v for k, v in data.items()}
    if "lora_parameters" in data:  # mlx-lm's nesting
        lp = data.pop("lora_parameters")
        data.update({k: lp[k] for k in ("rank", "scale", "keys") if k in lp})
    for key in ("data", "model", "resume_adapter_file"):  # paths in a recipe are relative to the recipe
        v = data.get(key)
        if isinstance(v, str) and ":" not in v and not Path(v).is_absolute() and (Path(path).parent / v).exists():
            data[key] = str((Path(path).parent / v).resolve())
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown setting(s) {', '.join(unknown)}")
    return data


def parser():
    p = argparse.ArgumentParser(prog="python -m mesp_mlx.train", allow_abbrev=False,
                                description="LoRA fine-tuning with memory-efficient structured backpropagation")
    p.add_argument("-c", "--config", help="YAML recipe; flags override it")
    bools = {"train", "mask_prompt", "resume", "fused_update", "skip_bad_rows"}
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.name in bools:
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None)
        elif f.name == "keys":
            p.add_argument(flag, dest=f.name, nargs="+", default=None)
        else:
            kind = {int: int, float: float}.get(type(f.default), str)
            if f.name in ("alpha", "learning_rate", "scale", "mezo_eps"):
                kind = float
            p.add_argument(flag, dest=f.name, type=kind, default=None)
    return p


def config_from_args(argv=None):
    args = vars(parser().parse_args(argv))
    values = load_recipe(args.pop("config")) if args.get("config") else {}
    args.pop("config", None)
    values.update({k: v for k, v in args.items() if v is not None})
    return TrainConfig(**values).validate()
