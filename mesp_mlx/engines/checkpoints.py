"""Block checkpoints: the block inputs a streaming engine keeps from the forward for the backward.

"memory": kept as computed (exact); with `dtype` float16/bfloat16 they are kept rounded (half the bytes, gradients
no longer exact); "disk": written to a temporary file and mapped back when their block's backward comes (exact, as
MeBP does; costs a write and a read per block).
"""
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..errors import ConfigError

PLACES = ("memory", "disk")


class Checkpoints:
    def __init__(self, where="memory", dtype=None):
        if where not in PLACES:
            raise ConfigError(f"checkpoints must be one of {', '.join(PLACES)}, got {where!r}")
        self.where, self.dtype, self.items, self.dir = where, dtype, {}, None

    def __setitem__(self, i, x):
        kept = x.astype(self.dtype) if self.dtype is not None else x
        if self.where == "disk":
            if self.dir is None:
                self.dir = tempfile.TemporaryDirectory(prefix="mesp-checkpoints-")
            path = Path(self.dir.name) / f"{i}.npy"
            arr = np.array(kept.view(mx.uint16) if kept.dtype == mx.bfloat16 else kept)
            np.save(path, arr)
            kept = (path, kept.dtype)
        self.items[i] = (kept, x.dtype)

    def pop(self, i):
        kept, dtype = self.items.pop(i)
        if self.where == "disk":
            path, stored = kept
            kept = mx.array(np.load(path))
            kept = kept.view(mx.bfloat16) if stored == mx.bfloat16 else kept
            path.unlink()
        return kept.astype(dtype)
