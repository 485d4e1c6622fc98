"""Random keys by purpose: a run's key (its --seed) is folded with the purpose (dropout, MeZO, the samples of a
training or an evaluation batch), then the step and micro-batch, then the block and the projection, one integer at
a time. Each fold hashes the integer under the key (a threefry split keyed by the parent mixed with the integer's
own key), so two uses share a stream only if every integer on their paths is equal: no product of counts (a step
times 64 plus a micro-batch, say) can make them collide."""
import mlx.core as mx

PURPOSES = ("dropout", "mezo", "sample", "eval")


def fold(key, *indices):
    """`key` (a key array, or an int seed) folded with each of `indices` in turn -> a key array."""
    key = mx.random.key(key) if isinstance(key, int) else key
    for i in indices:
        key = mx.random.split(mx.bitwise_xor(key, mx.random.key(i)))[0]
    return key


def purpose_key(seed, purpose, *indices):
    """The key of one use within a run of `seed`: fold(seed, purpose, *indices)."""
    return fold(seed, PURPOSES.index(purpose), *indices)
