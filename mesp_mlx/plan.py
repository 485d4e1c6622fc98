"""--memory-budget: choose the engine's chunk sizes and checkpoint placement so a step fits, from the engine's
memory model (engines/mesp.py), or refuse before any work with the nearest setting that would fit. Stores that keep
GGML blocks packed (Q6_K, Q3_K, Q2_K, IQ4_*) are planned too: the model counts their measured dequantization
temporaries, and the planner row-blocks their products where a whole matrix's would not fit (`candidate_plans`).

The budget bounds the process, not MLX's allocator alone: what the process holds before the first step (its resident
set: interpreter, libraries, tokenizer, data, the weight files read so far) is measured and the step is planned in
the rest, MLX's share, which also becomes MLX's memory and cache limit. Plans are tried from the fastest to the
leanest; the first that fits wins. Resident state is counted too: the LoRA parameters, the optimizer's moments
(optimizer.py's count per parameter) and the store's small arrays. The model is above every step peak measured in
BENCHMARKS.md, by 1.09-1.42x (Qwen2.5, Qwen3.5 and Llama-3.1-8B shapes, every plan); a plan must still fit with a
1.25x margin, for the shapes and devices it has not been measured on.
"""
import dataclasses
from contextlib import contextmanager

import mlx.core as mx

from .config import parse_bytes
from .engines.mesp import MeSPEngine
from .errors import ConfigError
from .lora import num_params
from .optimizer import OPTIMIZERS
from .plots import chart_library
from .resident import resident_bytes

# fastest first; each later plan trades speed for memory: (Compute fields, checkpoint placement)
PLANS = [
    (dict(share_dequant=True, attn_chunk=256, mlp_chunk=1024, vocab_chunk=4096, token_chunk=512), "memory"),
    (dict(share_dequant=False, attn_chunk=256, mlp_chunk=1024, vocab_chunk=4096, token_chunk=512), "memory"),
    (dict(share_dequant=False, attn_chunk=128, mlp_chunk=512, vocab_chunk=2048, token_chunk=256), "memory"),
    (dict(share_dequant=False, attn_chunk=64, mlp_chunk=256, vocab_chunk=1024, token_chunk=128), "memory"),
    (dict(share_dequant=False, attn_chunk=64, mlp_chunk=256, vocab_chunk=1024, token_chunk=128), "disk"),
    (dict(share_dequant=False, attn_chunk=64, mlp_chunk=256, vocab_chunk=1024, token_chunk=128, recompute_mlp=True,
          mlp_rows=1024), "disk"),
    (dict(share_dequant=False, attn_chunk=32, mlp_chunk=128, vocab_chunk=512, token_chunk=64, recompute_mlp=True,
          mlp_rows=1024), "disk"),
]
# output rows per dequantized block of a product with GGML blocks kept packed (Compute.dequant_rows), largest first:
# tried within each plan that does not hold a block's dense weights, where the whole matrix's dequantization
# temporaries (ops.ggml.dequant_temp_bytes) and dense copy do not fit
ROW_BLOCKS = (1024, 256, 64)
MARGIN = 1.25
# the process grows beyond MLX's allocations as it runs (its Python objects, the allocator's fragmentation): 24 MB
# over the 157 MB it held at the start on the default run (BENCHMARKS.md); kept out of MLX's share with room to spare
GROWTH = 0.2


def candidate_plans(store):
    """PLANS, fastest first, for this store: where it keeps GGML blocks packed, each plan that dequantizes one
    matrix per product is followed by the same plan with those products row-blocked (ROW_BLOCKS), which bounds a
    product's dequantization temporaries and dense copy by dequant_rows rows for the same arithmetic."""
    if not store.packed_types():
        return PLANS
    out = []
    for fields, checkpoints in PLANS:
        out.append((fields, checkpoints))
        if not fields["share_dequant"]:
            out += [(dict(fields, dequant_rows=r), checkpoints) for r in ROW_BLOCKS]
    return out


def trainable_state_bytes(params, optimizer):
    return 4 * num_params(params) * (1 + OPTIMIZERS[optimizer].moments)


def engine_settings(compute, plan):
    """The engine keyword arguments of a plan, on top of the run's compute configuration (dtype, matmul path).
    A budget evaluates chunk by chunk on every device: the memory model's bounds on the attention tiles and MLP
    temporaries hold only then (a GPU's default, one evaluation per block, trades them for fewer host syncs)."""
    fields, checkpoints = plan
    return dict(compute=dataclasses.replace(compute, sync="chunk", **fields), checkpoints=checkpoints)


def predicted_peak(store, scale, batch_size, seq_len, params, optimizer, fused, settings):
    engine = MeSPEngine(store, scale, **settings)
    return MARGIN * (trainable_state_bytes(params, optimizer) + engine.memory_model(batch_size, seq_len, params, fused)["peak"])


def plan_for_budget(store, scale, batch_size, seq_len, params, optimizer, fused, budget, compute, held=0):
    """-> (engine kwargs, predicted peak bytes) of a step in `budget` bytes; ConfigError naming the nearest feasible
    setting when none fits. held: bytes the process holds besides (counted in the advice)."""
    peak_of = lambda plan, t=seq_len: predicted_peak(store, scale, batch_size, t, params, optimizer, fused,
                                                     engine_settings(compute, plan))
    plans = candidate_plans(store)
    for plan in plans:
        peak = peak_of(plan)
        if peak <= budget:
            return engine_settings(compute, plan), peak
    leanest = peak_of(plans[-1])
    fit = seq_len
    while fit > 16 and peak_of(plans[-1], fit) > budget:
        fit //= 2
    hint = (f"--max-seq-length {fit} fits in it" if fit > 16 and fit < seq_len
            else "a smaller --rank or fewer --num-layers is needed")
    held_note = f" beside the {held / 1e6:.0f} MB the process holds before it" if held else ""
    raise ConfigError(f"a step at batch {batch_size} x {seq_len} tokens needs at least {leanest / 1e6:.0f} MB"
                      f"{held_note}; the budget is {(budget + held) / 1e6:.0f} MB. Raise --memory-budget to "
                      f"{(leanest * 1.05 + held) / 1e6:.0f}MB, or: {hint}")


def plan_run(config, store, params, examples, rows_per_example, fused, log):
    """--memory-budget for a run: -> (engine settings, (MLX's share, what of it may stay cached) in bytes). The
    process's resident set now, and its growth, are the fixed part; a budget it already fills (or nearly: no plan
    fits the rest) is refused before any work. rows_per_example: batch rows per example (the objective's); fused:
    whether the trainer applies each block's update in the backward (one block's gradients at a time)."""
    chart_library()  # drawn at the end of the run: part of the fixed footprint
    budget = parse_bytes(config.memory_budget)
    held = int(resident_bytes() * (1 + GROWTH))
    longest = max(len(ids) - 1 for ids, _ in examples)
    if config.pack:  # packed rows fill up to max_seq_length
        longest = min(config.max_seq_length, sum(len(ids) - 1 for ids, _ in examples))
    if held >= budget:
        raise ConfigError(f"--memory-budget {budget / 1e6:.0f} MB: the process already holds "
                          f"{held / (1 + GROWTH) / 1e6:.0f} MB (+{GROWTH:.0%} for its growth) "
                          "before the first step (interpreter, libraries, tokenizer, data, weights read so far); "
                          "raise the budget")
    settings, peak = plan_for_budget(store, config.scale, config.batch_size * rows_per_example, longest, params,
                                     config.optimizer, fused, budget - held, config.compute(), held)
    c = settings["compute"]
    log(f"[mesp-mlx] memory budget {budget / 1e6:.0f} MB: the process holds {held / (1 + GROWTH) / 1e6:.0f} MB "
        f"before the first step (+{GROWTH:.0%} for its growth), MLX's share is {(budget - held) / 1e6:.0f} MB; "
        f"plan: chunks attention {c.attn_chunk}, MLP {c.mlp_chunk}, vocabulary {c.vocab_chunk}, tokens "
        f"{c.token_chunk}, checkpoints in {settings['checkpoints']}{', MLP recomputed' if c.recompute_mlp else ''}"
        f"{f', GGML weights dequantized {c.dequant_rows} rows at a time' if c.dequant_rows else ''}"
        f"{f', MLP weights {c.mlp_rows} rows at a time' if c.mlp_rows else ''}"
        f"; predicted MLX peak {peak / 1e6:.0f} MB")
    return settings, (budget - held, budget - held - peak)


@contextmanager
def mlx_limits(limits):
    """limits: (MLX's share, its cache's share) from `plan_run`, or None. MLX allocates within the first and keeps
    at most the second cached (freed buffers it keeps are resident too); the old limits come back afterwards."""
    if not limits:
        yield
        return
    old = mx.set_memory_limit(int(limits[0])), mx.set_cache_limit(int(max(limits[1], 0)))
    try:
        yield
    finally:
        mx.set_memory_limit(old[0])
        mx.set_cache_limit(old[1])
