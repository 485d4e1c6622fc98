"""Kernels per training step, a device-independent proxy for a GPU's launch cost: while a `KernelCounter` is active,
every `mx.eval` / `mx.async_eval` has its pending graph exported with `mx.export_to_dot` and the primitive nodes
counted before it runs. On a GPU each primitive MLX evaluates is at least one kernel launch (a `Compiled` node, one
fused element-wise chain of an `mx.compile`d function, counts once), so the count says how much of a step is launch
overhead without timing anything. View-only primitives (`VIEWS`: they make no kernel or a copy at most) and the
weight store's `Load` are reported apart from the compute primitives. Arrays already evaluated are leaves of the
exported graph, so each primitive is counted by the evaluation that runs it.

    python tools/count_kernels.py WHICH T [MODEL]      (from the project root, PYTHONPATH=.)
      WHICH: mesp, mebp or autodiff, each with optional :SYNC, @MATMUL and +COMPILE (auto, on, off); e.g.
             mesp:block@quantized (the GPU path) or mesp:block@quantized+off; a trailing /step counts a training
             step (Adam applied block by block, as the trainer does) instead of loss_and_grad alone; or mlx-lm (its
             compiled LoRA step, Adam included) or mlx-lm-nocompile. MODEL: a store path or tools/bench_memory.py model spec (default
             model when omitted). Prints one JSON line.

It agrees with an independent counter it was written against (outside this repository) on the same configuration:
one `loss_and_grad` after a warm-up for our engines, mlx-lm's third step for mlx-lm. `tools/bench_memory.py` reports
the same count of one extra step as its `kernels` column.
"""
import collections
import json
import os
import re
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

VIEWS = {"Broadcast", "Reshape", "Slice", "Transpose", "AsStrided", "Squeeze", "ExpandDims", "Copy", "StopGradient",
         "Depends", "Split", "Flatten", "Unflatten"}
_NODE = re.compile(r'label ="([^"]+)", shape=rectangle')


def graph_primitives(arrays, dot_path):
    """Counter of primitive names in the unevaluated graph that produces `arrays` (a tree of arrays)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    leaves = [v for _, v in tree_flatten(arrays) if isinstance(v, mx.array)]
    if not leaves:
        return collections.Counter()
    mx.export_to_dot(dot_path, *leaves)
    return collections.Counter(label.split()[0] for label in _NODE.findall(Path(dot_path).read_text()))


class KernelCounter:
    """`with KernelCounter() as k: ...` counts the primitives and host syncs of what runs inside; `k.summary()`.
    It replaces mlx.core's eval and async_eval (our code looks them up at each call) for the duration only."""

    def __init__(self):
        self.ops = collections.Counter()
        self.evals = 0

    def __enter__(self):
        import mlx.core as mx
        self._mx, self._saved = mx, (mx.eval, mx.async_eval)
        self._dir = tempfile.TemporaryDirectory()
        dot = os.path.join(self._dir.name, "graph.dot")

        def counted(real):
            def fn(*args, **kw):
                self.ops.update(graph_primitives(list(args), dot))
                self.evals += 1
                return real(*args, **kw)
            return fn
        mx.eval, mx.async_eval = counted(mx.eval), counted(mx.async_eval)
        return self

    def __exit__(self, *exc):
        self._mx.eval, self._mx.async_eval = self._saved
        self._dir.cleanup()

    def summary(self, top=12):
        kinds = collections.Counter()
        for op, n in self.ops.items():
            kinds["load" if op == "Load" else "view" if op in VIEWS else "compute"] += n
        return dict(evals=self.evals, compute_prims=kinds["compute"], view_prims=kinds["view"], loads=kinds["load"],
                    top=self.ops.most_common(top))


def engine_step_counts(engine, params, batch):
    """The summary of one `loss_and_grad` of `engine`, after one uncounted warm-up (compiles and caches)."""
    import mlx.core as mx
    mx.eval(params)
    engine.loss_and_grad(params, batch)
    with KernelCounter() as k:  # an engine evaluates its loss and gradients itself
        engine.loss_and_grad(params, batch)
    return k.summary()


def train_step_counts(engine, params, batch):
    """The summary of one training step: `train_step` with Adam applied block by block as `Trainer.update_block`
    does (compiled exactly when the engine's blocks are), after one uncounted warm-up step."""
    import mlx.core as mx
    import mlx.optimizers as optim
    from mesp_mlx.lora import from_flat, to_flat
    from mesp_mlx.optimizer import OptimizerUpdate
    opt = optim.Adam(learning_rate=1e-5)
    opt.init(to_flat(params))
    updates = OptimizerUpdate(opt, elementwise=True)

    def step():
        step0 = opt.state["step"]

        def update(i, grads):
            apply = updates(engine.compute.compiled, opt.state["step"] is step0)
            flat = apply(to_flat({i: grads}), to_flat({i: params[i]}))
            params[i] = from_flat(flat)[i]
            return flat, opt.state  # evaluated with the block's backward, as Trainer.update_block's
        engine.train_step(params, batch, update, lambda tree: tree)
    mx.eval(params)
    step()
    with KernelCounter() as k:
        step()
    return k.summary()


def _mlx_lm(model, seq):
    # mlx-lm's own trainer step (compiled unless "mlx-lm-nocompile"), as its tuner/trainer.py builds it
    from functools import partial
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx_lm.tuner.trainer import default_loss, grad_checkpoint
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load
    from bench_inputs import KEYS, bench_ids
    lm, tok = load(model)
    lm.freeze()
    linear_to_lora_layers(lm, len(lm.layers), {"rank": 8, "scale": 20.0, "dropout": 0.0, "keys": KEYS})
    grad_checkpoint(lm.layers[0])
    opt = optim.Adam(learning_rate=1e-5)
    loss_and_grad = nn.value_and_grad(lm, default_loss)
    state = [lm.state, opt.state]

    def step(inputs, lengths):
        (loss, _), grads = loss_and_grad(lm, inputs, lengths)
        opt.update(lm, grads)
        return loss
    return step, state, mx.array([bench_ids(tok, seq)]), mx.array([[0, seq]])


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2:
        raise SystemExit(__doc__)
    which, seq = argv[0], int(argv[1])
    model = argv[2] if len(argv) > 2 else None
    from mesp_mlx.blas import ensure_fast_blas
    ensure_fast_blas()
    import mlx.core as mx
    from bench_inputs import bench_ids, resolve_model
    model = resolve_model(model) if model else None
    if which.startswith("mlx-lm"):
        step, state, ids, lengths = _mlx_lm(model, seq)
        if which == "mlx-lm":
            step = mx.compile(step, inputs=state, outputs=state)
        for _ in range(2):  # mlx-lm's first steps compile
            mx.eval(state, step(ids, lengths))
        with KernelCounter() as k:
            mx.eval(state, step(ids, lengths))
        out = k.summary()
    else:
        from mesp_mlx.engines import make_engine
        from mesp_mlx.io.sources import load_model
        from mesp_mlx.lora import LoRAConfig, init_lora
        from mesp_mlx.objectives import SFT
        from mesp_mlx.ops.linear import Compute
        which_, _, step = which.partition("/")
        method, _, rest = which_.partition(":")
        rest, _, compile_ = rest.partition("+")
        sync, _, matmul = rest.partition("@")
        store = load_model(model)
        params = init_lora(store.args, LoRAConfig(rank=8), 0)
        ids = mx.array([bench_ids(store.tokenizer(), seq)])
        batch = SFT().batch(ids[:, :-1], ids[:, 1:], mx.ones((1, seq)))
        compute = Compute(sync=sync or "auto", matmul=matmul or "auto", compile=compile_ or "auto")
        engine = make_engine(method, store, 20.0, compute=compute)
        out = (train_step_counts if step else engine_step_counts)(engine, params, batch)
    print(json.dumps(dict(which=which, seq=seq, **out)))
    return out


if __name__ == "__main__":
    main()
