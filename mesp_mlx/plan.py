"""--memory-budget: choose the engine's chunk sizes and checkpoint placement so a step fits, from the engine's
memory model (engines/mesp.py), or refuse before any work with the nearest setting that would fit.

Plans are tried from the fastest to the leanest; the first that fits wins. Resident state is counted too: the
LoRA parameters, the optimizer's moments (2 per parameter for Adam/AdamW) and the store's small arrays. The model
is within ~1.3x of measured peaks either way (benchmarks), so a plan must fit with a 1.25x margin.
"""
import re

from .config import ConfigError

# fastest first; each later plan trades speed for memory
PLANS = [
    dict(share_dequant=True, attn_chunk=256, mlp_chunk=1024, vocab_chunk=4096, token_chunk=512, checkpoints="memory"),
    dict(share_dequant=False, attn_chunk=256, mlp_chunk=1024, vocab_chunk=4096, token_chunk=512, checkpoints="memory"),
    dict(share_dequant=False, attn_chunk=128, mlp_chunk=512, vocab_chunk=2048, token_chunk=256, checkpoints="memory"),
    dict(share_dequant=False, attn_chunk=64, mlp_chunk=256, vocab_chunk=1024, token_chunk=128, checkpoints="memory"),
    dict(share_dequant=False, attn_chunk=64, mlp_chunk=256, vocab_chunk=1024, token_chunk=128, checkpoints="disk"),
    dict(share_dequant=False, attn_chunk=32, mlp_chunk=128, vocab_chunk=512, token_chunk=64, checkpoints="disk"),
]
MARGIN = 1.25
UNITS = {"": 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30}


def parse_bytes(text):
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).upper() not in UNITS:
        raise ConfigError(f"memory budget {text!r}: expected a size like 300MB or 1.5GB")
    return int(float(m.group(1)) * UNITS[m.group(2).upper()])


def resident_bytes(params, optimizer):
    from .lora import num_params
    moments = {"sgd": 0, "adam": 2, "adamw": 2}.get(optimizer, 0)
    return 4 * num_params(params) * (1 + moments)


def predicted_peak(store, scale, batch_size, seq_len, params, optimizer, fused, plan):
    from .engines.mesp import MeSPEngine
    engine = MeSPEngine(store, scale, **plan)
    return MARGIN * (resident_bytes(params, optimizer) + engine.memory_model(batch_size, seq_len, params, fused)["peak"])


def plan_for_budget(store, scale, batch_size, seq_len, params, optimizer, fused, budget):
    """-> (engine kwargs, predicted peak bytes); ConfigError naming the nearest feasible setting when none fits."""
    for plan in PLANS:
        peak = predicted_peak(store, scale, batch_size, seq_len, params, optimizer, fused, plan)
        if peak <= budget:
            return plan, peak
    leanest = predicted_peak(store, scale, batch_size, seq_len, params, optimizer, fused, PLANS[-1])
    fit = seq_len
    while fit > 16 and predicted_peak(store, scale, batch_size, fit, params, optimizer, fused, PLANS[-1]) > budget:
        fit //= 2
    hint = (f"--max-seq-length {fit} fits in it" if fit > 16 and fit < seq_len
            else "a smaller --rank or fewer --num-layers is needed")
    raise ConfigError(f"a step at batch {batch_size} x {seq_len} tokens needs at least {leanest / 1e6:.0f} MB; "
                      f"the budget is {budget / 1e6:.0f} MB. Raise --memory-budget to {leanest / 1e6 * 1.05:.0f}MB, "
                      f"or: {hint}")
