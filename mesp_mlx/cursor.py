"""The position in the training data: which batch comes next, as a function of (seed, epoch, batches consumed), so
a resumed run sees exactly the batches an uninterrupted one would. With W processes the batches are those of one
process with a W times larger batch, each process taking its slice (groups too small to give every process a row
are skipped). With packing, a batch is `batch_size` packed rows and the position counts packed batches."""
from .data import epoch_groups


class DataCursor:
    def __init__(self, dataset, make_batch, batch_size, seed, rank=0, world=1, pack=0):
        """make_batch(dataset, items, packed): the objective's batch of examples; pack: pack short rows into rows
        of this many positions (0: no packing)."""
        self.dataset, self.batch_size, self.seed, self.rank, self.world = dataset, batch_size, seed, rank, world
        self.make_batch, self.pack = make_batch, pack
        self.seek(0)

    def seek(self, position):
        """Moves to `position` batches from the start (resume)."""
        self.epoch, self.index, self.groups, self.position = None, 0, [], 0
        for _ in range(position):
            self._next_group()

    def next_batch(self):
        group = self._next_group()
        lo, hi = self.rank * len(group) // self.world, (self.rank + 1) * len(group) // self.world
        return self.make_batch(self.dataset, group[lo:hi], bool(self.pack))

    def _next_group(self):
        if self.epoch is None or self.index >= len(self.groups):
            self.epoch = 0 if self.epoch is None else self.epoch + 1
            groups = epoch_groups(self.dataset, self.batch_size * self.world, self.seed, self.epoch, self.pack)
            self.groups, self.index = [g for g in groups if len(g) >= self.world], 0
        self.index += 1
        self.position += 1
        return self.groups[self.index - 1]
