"""--memory-budget: choose the engine's chunk sizes and checkpoint placement so a step fits, from the engine's
memory model (engines/mesp.py), or refuse before any work with the nearest setting that would fit.

Plans are tried from the fastest to the leanest; the first that fits wins. Resident state is counted too: the
LoRA parameters, the optimizer's moments (2 per parameter for Adam/AdamW) and the store's small arrays. The model
is within ~1.3x of measured peaks either way (benchmarks), so a plan must fit with a 1.25x margin.
"""
import dataclasses

from .engines.mesp import MeSPEngine
from .errors import ConfigError
from .lora import num_params

# fastest first; each later plan trades speed for memory: (Compute fields, checkpoint placement)
PLANS = [
    (dict(share_dequant=True, attn_chunk=256, mlp_chunk=1024, vocab_chunk=4096, token_chunk=512), "memory"),
    (dict(share_dequant=False, attn_chunk=256, mlp_chunk=1024, vocab_chunk=4096, token_chunk=512), "memory"),
    (dict(share_dequant=False, attn_chunk=128, mlp_chunk=512, vocab_chunk=2048, token_chunk=256), "memory"),
    (dict(share_dequant=False, attn_chunk=64, mlp_chunk=256, vocab_chunk=1024, token_chunk=128), "memory"),
    (dict(share_dequant=False, attn_chunk=64, mlp_chunk=256, vocab_chunk=1024, token_chunk=128), "disk"),
    (dict(share_dequant=False, attn_chunk=64, mlp_chunk=256, vocab_chunk=1024, token_chunk=128, recompute_mlp=True),
     "disk"),
    (dict(share_dequant=False, attn_chunk=32, mlp_chunk=128, vocab_chunk=512, token_chunk=64, recompute_mlp=True),
     "disk"),
]
MARGIN = 1.25
MOMENTS = {"sgd": 0, "adam": 2, "adamw": 2}


def resident_bytes(params, optimizer):
    return 4 * num_params(params) * (1 + MOMENTS.get(optimizer, 0))


def engine_settings(compute, plan):
    """The engine keyword arguments of a plan, on top of the run's compute configuration (dtype, matmul path).
    A budget evaluates chunk by chunk on every device: the memory model's bounds on the attention tiles and MLP
    temporaries hold only then (a GPU's default, one evaluation per block, trades them for fewer host syncs)."""
    fields, checkpoints = plan
    return dict(compute=dataclasses.replace(compute, sync="chunk", **fields), checkpoints=checkpoints)


def predicted_peak(store, scale, batch_size, seq_len, params, optimizer, fused, settings):
    engine = MeSPEngine(store, scale, **settings)
    return MARGIN * (resident_bytes(params, optimizer) + engine.memory_model(batch_size, seq_len, params, fused)["peak"])


def plan_for_budget(store, scale, batch_size, seq_len, params, optimizer, fused, budget, compute):
    """-> (engine kwargs, predicted peak bytes); ConfigError naming the nearest feasible setting when none fits."""
    peak_of = lambda plan, t=seq_len: predicted_peak(store, scale, batch_size, t, params, optimizer, fused,
                                                     engine_settings(compute, plan))
    for plan in PLANS:
        peak = peak_of(plan)
        if peak <= budget:
            return engine_settings(compute, plan), peak
    leanest = peak_of(PLANS[-1])
    fit = seq_len
    while fit > 16 and peak_of(PLANS[-1], fit) > budget:
        fit //= 2
    hint = (f"--max-seq-length {fit} fits in it" if fit > 16 and fit < seq_len
            else "a smaller --rank or fewer --num-layers is needed")
    raise ConfigError(f"a step at batch {batch_size} x {seq_len} tokens needs at least {leanest / 1e6:.0f} MB; "
                      f"the budget is {budget / 1e6:.0f} MB. Raise --memory-budget to {leanest / 1e6 * 1.05:.0f}MB, "
                      f"or: {hint}")
