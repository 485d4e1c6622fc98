"""Training engines behind one interface.

`engine.loss_and_grad(params, batch)` -> (loss, grads) with grads shaped like params ({block: {path: (dA, dB)}});
`engine.loss(params, batch)` -> loss only. A batch is (inputs, targets, mask) of shape (B, T), mask 1.0 where a
target token counts. The trainer never knows which engine runs.
"""
from .autodiff import AutodiffEngine
from .mebp import MeBPEngine
from .mesp import MeSPEngine
from .mezo import MeZOEngine

ENGINES = {"mesp": MeSPEngine, "mebp": MeBPEngine, "mezo": MeZOEngine, "autodiff": AutodiffEngine}


def make_engine(method, store, scale, **kw):
    if method not in ENGINES:
        raise ValueError(f"method must be one of {', '.join(ENGINES)}, got {method!r}")
    return ENGINES[method](store, scale, **kw)
