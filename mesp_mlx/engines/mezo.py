"""MeZO (Malladi et al. 2023, arXiv 2305.17333): zeroth-order SPSA on the LoRA parameters.

Per step and per sample j of n: a key s_j (the run's seed folded with MeZO's purpose and the count of draws);
theta += eps z, loss l+; theta -= 2 eps z, loss l-; theta += eps z (restored); the projected gradient
c_j = (l+ - l-) / (2 eps); the estimate g = mean_j c_j z_j, with z regenerated from s_j every time, never stored. Forward passes stream the base like the other engines. A training step hands the
estimate to the optimizer one block at a time (SGD gives MeZO's update theta -= lr g; Adam gives MeZO-Adam), so
at most one block of z exists at once. In a data-parallel group the processes share seeds and average only the
scalars c_j. `loss_and_grad` materialises the whole estimate (for gradient comparisons).
"""
import mlx.core as mx

from ..ops.keys import purpose_key
from .streaming import StreamingEngine


class MeZOEngine(StreamingEngine):
    fuses_update = False  # no backward to fuse into; its update is per block anyway
    settings = {"eps": "mezo_eps", "seed": "seed"}

    def __init__(self, store, scale, eps=1e-2, n_samples=1, seed=0, **kw):
        super().__init__(store, scale, **kw)
        self.eps, self.n_samples = eps, n_samples
        self.seed = seed
        self.calls = 0  # seeds drawn so far: the only random state of a run

    @property
    def weight_passes(self):
        return 2 * self.n_samples  # two forwards per SPSA sample, no backward

    def state(self):
        return {"mezo_calls": self.calls}

    def load_state(self, state):
        self.calls = state.get("mezo_calls", 0)

    @staticmethod
    def _keys(key, params):
        """{block: {path: (key of z_A, key of z_B)}}: the same chain of splits for every use of a key."""
        out = {}
        for i in sorted(params):
            for p in sorted(params[i]):
                key, ka, kb = mx.random.split(key, 3)
                out.setdefault(i, {})[p] = (ka, kb)
        return out

    def _z(self, seed, params, keys=None, block=None):
        """The direction of `seed`, or only its part for `block`."""
        keys = keys or self._keys(seed, params)
        return {i: {p: (mx.random.normal(params[i][p][0].shape, key=ka), mx.random.normal(params[i][p][1].shape,
                                                                                         key=kb))
                    for p, (ka, kb) in keys[i].items()} for i in keys if block is None or i == block}

    def _shift(self, params, seed, alpha):
        z = self._z(seed, params)
        new = {i: {p: (a + alpha * z[i][p][0], b + alpha * z[i][p][1]) for p, (a, b) in m.items()}
               for i, m in params.items()}
        mx.eval(new)
        return new

    def _projections(self, params, batch, reduce=lambda v: v):
        """[(seed, c)] for n fresh seeds (c reduced over the group), and the mean of the two-sided losses."""
        out, losses = [], []
        for _ in range(self.n_samples):
            seed = purpose_key(self.seed, "mezo", self.calls)
            self.calls += 1
            lp = self.loss(self._shift(params, seed, self.eps), batch)["loss"]
            lm = self.loss(self._shift(params, seed, -self.eps), batch)["loss"]
            out.append((seed, reduce(mx.array((lp - lm).item() / (2 * self.eps))).item()))
            losses.append((lp.item() + lm.item()) / 2)
        return out, sum(losses) / len(losses)

    def loss_and_grad(self, params, batch, on_block=None, seed=None):  # no LoRA dropout: both losses must match
        proj, loss = self._projections(params, batch)
        grads = None
        for seed, c in proj:
            z = self._z(seed, params)
            est = {i: {p: (c * za / len(proj), c * zb / len(proj)) for p, (za, zb) in m.items()} for i, m in z.items()}
            grads = est if grads is None else {i: {p: (grads[i][p][0] + est[i][p][0], grads[i][p][1] + est[i][p][1])
                                                   for p in m} for i, m in est.items()}
        if on_block is not None:
            for i in sorted(grads, reverse=True):
                mx.eval(on_block(i, grads.pop(i)))
        return {"loss": mx.array(loss)}, grads if on_block is None else {}

    def train_step(self, params, batch, update, reduce, seed=None):
        proj, loss = self._projections(params, batch, reduce)
        keys = [self._keys(seed, params) for seed, _ in proj]
        for i in sorted(params, reverse=True):
            est = None
            for (seed, c), k in zip(proj, keys):
                z = self._z(seed, params, k, block=i)[i]
                term = {p: (c * za / len(proj), c * zb / len(proj)) for p, (za, zb) in z.items()}
                est = term if est is None else {p: (est[p][0] + t[0], est[p][1] + t[1]) for p, t in term.items()}
            mx.eval(update(i, est))
        return {"loss": mx.array(loss)}
