"""Training engines behind one interface (base.py): the trainer builds one with `make_engine` and asks it nothing
but what `Engine` offers."""
from .autodiff import AutodiffEngine
from .base import Engine
from .mebp import MeBPEngine
from .mesp import MeSPEngine
from .mezo import MeZOEngine

ENGINES = {"mesp": MeSPEngine, "mebp": MeBPEngine, "mezo": MeZOEngine, "autodiff": AutodiffEngine}
__all__ = ["ENGINES", "Engine", "make_engine"]


def make_engine(method, store, scale, config=None, **kw):
    """kw: compute (ops.linear.Compute), checkpoints and checkpoint_dtype for streaming engines, and each engine's
    own settings (mezo: eps, n_samples, seed); config: a run's settings, from which the engine takes those its class
    declares (`Engine.settings`), so the caller never names them."""
    if method not in ENGINES:
        raise ValueError(f"method must be one of {', '.join(ENGINES)}, got {method!r}")
    cls = ENGINES[method]
    own = {k: getattr(config, f) for k, f in cls.settings.items()} if config is not None else {}
    return cls(store, scale, **own, **kw)
