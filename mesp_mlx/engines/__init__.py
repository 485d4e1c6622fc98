"""Training engines behind one interface (base.py): the trainer builds one with `make_engine` and asks it nothing
but what `Engine` offers."""
from .autodiff import AutodiffEngine
from .base import Engine
from .mebp import MeBPEngine
from .mesp import MeSPEngine
from .mezo import MeZOEngine

ENGINES = {"mesp": MeSPEngine, "mebp": MeBPEngine, "mezo": MeZOEngine, "autodiff": AutodiffEngine}
__all__ = ["ENGINES", "Engine", "make_engine"]


def make_engine(method, store, scale, **kw):
    """kw: compute (ops.linear.Compute), checkpoints and checkpoint_dtype for streaming engines, and each engine's
    own settings (mezo: eps, n_samples, seed)."""
    if method not in ENGINES:
        raise ValueError(f"method must be one of {', '.join(ENGINES)}, got {method!r}")
    return ENGINES[method](store, scale, **kw)
