"""The optimizers a run can choose, what state each keeps, and how a block's update is applied.

One table (`OPTIMIZERS`) names each optimizer with its class, the moments it keeps per parameter (the memory
planner counts them) and whether its rule is element-wise. Only an element-wise rule (SGD, Adam, AdamW: each entry
of the update depends on the same entry of the gradient, parameter and state) may run on a block's parameters laid
end to end as one vector; a rule that mixes a parameter's entries (Muon orthogonalises each matrix's update) is
always applied one parameter at a time, whatever the shapes of its state say.
"""
from dataclasses import dataclass

import mlx.core as mx
import mlx.optimizers as optim


@dataclass(frozen=True)
class OptimizerKind:
    cls: type
    moments: int  # state arrays of the parameter's size kept per parameter
    elementwise: bool  # its update of an entry reads only that entry of the gradient, parameter and state


# MLX's SGD keeps a velocity of each parameter's size even without momentum (zeros): one moment, not none
OPTIMIZERS = {"sgd": OptimizerKind(optim.SGD, 1, True), "adam": OptimizerKind(optim.Adam, 2, True),
              "adamw": OptimizerKind(optim.AdamW, 2, True), "muon": OptimizerKind(optim.Muon, 1, False)}


def make_optimizer(name, learning_rate, **settings):
    return OPTIMIZERS[name].cls(learning_rate=learning_rate, **settings)


def learning_rate_schedule(lr, kind, warmup, steps):
    """A constant or cosine-decayed rate, after `warmup` steps rising linearly from 0 (as mlx-lm's warmup does);
    a plain number when it never changes, so a resume may lower it."""
    main = optim.cosine_decay(lr, max(steps - warmup, 1)) if kind == "cosine" else lr
    if warmup <= 0:
        return main
    rest = main if callable(main) else (lambda step: mx.array(lr, mx.float32))
    return optim.join_schedules([optim.linear_schedule(0.0, lr, warmup), rest], [warmup])


class OptimizerUpdate:
    """The optimizer's update of one block of a step. With an element-wise rule the block's parameters are laid end
    to end: their gradients concatenated (one kernel) and the rule run once on the whole vector, compiled where the
    engine compiles its blocks (one compiled kernel instead of one a parameter, ~14 a block). The parameters and
    their state are handed back as views of the updated vectors, and a block whose parameters and state are still
    those views next step reuses the vectors as they are (no concatenation). The step's first block advances the
    step count and any scheduled learning rate (apply_gradients of nothing); every block applies the values set
    (apply_single, what apply_gradients does per parameter after advancing them), so updating block by block is the
    arithmetic of one update of the whole tree, element for element. A rule that is not element-wise, or parameters
    of mixed dtypes, get one update a parameter. Bound to the current state tree, so a resumed run (which replaces
    it) compiles afresh."""

    def __init__(self, opt, elementwise):
        self.opt, self.elementwise, self.compiled, self.vectors = opt, elementwise, None, {}

    def _rule(self, gradient, parameter, state):
        state = dict(state)
        return self.opt.apply_single(gradient, parameter, state), state

    def _fn(self, compiled):
        if not compiled:
            return self._rule
        if self.compiled is None or self.compiled[0] is not self.opt.state:
            self.compiled = (self.opt.state, mx.compile(self._rule, inputs=self.opt.state))
        return self.compiled[1]

    def __call__(self, compiled, first=True):
        def update(gradients, parameters):  # flat trees ({name: array}), as to_flat makes them
            if first:
                self.opt.apply_gradients({}, {})
            return self._update(gradients, parameters, self._fn(compiled))
        return update

    def _update(self, gradients, parameters, fn):
        names = list(gradients)
        states = [self.opt.state[k] for k in names]
        keys = sorted(states[0])
        if not self.elementwise or len({parameters[k].dtype for k in names}) > 1 or any(
                sorted(s) != keys or any(s[f].shape != parameters[k].shape for f in keys)
                for k, s in zip(names, states)):
            return {k: self._apply_each(fn, gradients[k], parameters[k], self.opt.state[k]) for k in names}
        held = self.vectors.get(tuple(names))
        if held and all(parameters[k] is held[1][k] and all(self.opt.state[k][f] is held[2][k][f] for f in keys)
                        for k in names):
            p, state = held[0]
        else:  # first update, or parameters / state replaced since (a resume)
            p = mx.concatenate([parameters[k].reshape(-1) for k in names])
            state = {f: mx.concatenate([s[f].reshape(-1) for s in states]) for f in keys}
        p, state = fn(mx.concatenate([gradients[k].reshape(-1) for k in names]), p, state)
        out, views, at = {}, {}, 0
        for k in names:
            shape, n = parameters[k].shape, parameters[k].size
            out[k] = p[at:at + n].reshape(shape)
            views[k] = {f: state[f][at:at + n].reshape(shape) for f in keys}
            self.opt.state[k].update(views[k])
            at += n
        self.vectors[tuple(names)] = ((p, state), out, views)
        return out

    def _apply_each(self, fn, gradient, parameter, state):
        new, values = fn(gradient, parameter, state)
        state.update(values)
        return new
