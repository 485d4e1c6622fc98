"""The data-parallel group a run belongs to (MLX's mx.distributed: ring backend via mlx.launch, MPI where present);
a single process is a group of one and every method below is then the identity.

Each process computes the mean loss and gradients over its own rows; the group's result is the token-weighted
mean of those, which equals the mean over the whole global batch.
"""
import mlx.core as mx


class Group:
    def __init__(self):
        self.group = mx.distributed.init()
        self.rank, self.size = self.group.rank(), self.group.size()

    def totals(self, n, tokens):
        """(n, the group's sum of n, the group's sum of tokens) in one all-reduce: n is this process's weight in the
        group's mean (what the objective weighs a batch by: its target tokens, or its examples), tokens its target
        tokens (what tokens/s counts)."""
        if self.size == 1:
            return n, n, tokens
        both = self.sum(mx.stack([n.astype(mx.float32), tokens.astype(mx.float32)]))
        return n, both[0], both[1]

    def sum(self, x):
        return mx.distributed.all_sum(x, group=self.group)

    def mean(self, tree, n, total):
        """The group's token-weighted mean of per-process means (= the mean over the whole global batch)."""
        if self.size == 1:
            return tree
        if isinstance(tree, dict):
            return {k: self.mean(v, n, total) for k, v in tree.items()}
        if isinstance(tree, tuple):
            return tuple(self.mean(v, n, total) for v in tree)
        return self.sum(tree * n) / total

    def send_from_first(self, x):
        """Process 0's array, in every process (others pass any array of the same shape)."""
        return self.sum(x if self.rank == 0 else mx.zeros_like(x))
