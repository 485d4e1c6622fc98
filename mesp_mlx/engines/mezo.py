"""MeZO (Malladi et al. 2023, arXiv 2305.17333): zeroth-order SPSA on the LoRA parameters.

Per step and per sample j of n: a seed s_j; theta += eps z, loss l+; theta -= 2 eps z, loss l-; theta += eps z
(restored); the projected gradient c_j = (l+ - l-) / (2 eps); update theta -= lr/n * c_j z, with z regenerated from
s_j every time, never stored. Forward passes stream the base like the other engines. `loss_and_grad` materialises
the estimate c z (for gradient comparisons only); training uses `step`.
"""
import mlx.core as mx

from .mesp import StreamingEngine


class MeZOEngine(StreamingEngine):
    def __init__(self, store, scale, eps=1e-2, n_samples=1, seed=0, **kw):
        super().__init__(store, scale, **kw)
        self.eps, self.n_samples = eps, n_samples
        self.seed = seed
        self.calls = 0
        self.combine = lambda c: c  # data-parallel runs set this to the group's mean of the projections

    def _z(self, seed, params):
        key = mx.random.key(seed)
        out = {}
        for i in sorted(params):
            out[i] = {}
            for p in sorted(params[i]):
                key, ka, kb = mx.random.split(key, 3)
                a, b = params[i][p]
                out[i][p] = (mx.random.normal(a.shape, key=ka), mx.random.normal(b.shape, key=kb))
        return out

    def _shift(self, params, seed, alpha):
        z = self._z(seed, params)
        new = {i: {p: (a + alpha * z[i][p][0], b + alpha * z[i][p][1]) for p, (a, b) in m.items()}
               for i, m in params.items()}
        mx.eval(new)
        return new

    def _projections(self, params, batch):
        """[(seed, c)] for n fresh seeds, and the mean of the two-sided losses."""
        out, losses = [], []
        for _ in range(self.n_samples):
            seed = self.seed * 1_000_003 + self.calls
            self.calls += 1
            lp = self.loss(self._shift(params, seed, self.eps), batch)
            lm = self.loss(self._shift(params, seed, -self.eps), batch)
            out.append((seed, self.combine((lp - lm).item() / (2 * self.eps))))
            losses.append((lp.item() + lm.item()) / 2)
        return out, sum(losses) / len(losses)

    def loss_and_grad(self, params, batch):
        proj, loss = self._projections(params, batch)
        grads = None
        for seed, c in proj:
            z = self._z(seed, params)
            est = {i: {p: (c * za / len(proj), c * zb / len(proj)) for p, (za, zb) in m.items()} for i, m in z.items()}
            grads = est if grads is None else {i: {p: (grads[i][p][0] + est[i][p][0], grads[i][p][1] + est[i][p][1])
                                                   for p in m} for i, m in est.items()}
        return mx.array(loss), grads

    def step(self, params, batch, lr):
        """One SPSA step with an SGD update; returns (loss, new params)."""
        proj, loss = self._projections(params, batch)
        for seed, c in proj:
            params = self._shift(params, seed, -lr * c / len(proj))
        return mx.array(loss), params
