"""The optimizer table (mesp_mlx/optimizer.py): for every optimizer a run can choose, updating block by block with
`OptimizerUpdate` (as the trainer does inside the backward) ends at the very parameters and state of one
`apply_gradients` over the whole tree, two steps in a row; only element-wise rules are laid end to end."""
import mlx.core as mx
import numpy as np
import pytest

from mesp_mlx.lora import from_flat, to_flat
from mesp_mlx.optimizer import OPTIMIZERS, OptimizerUpdate, make_optimizer


def tree(seed):
    """Two blocks of LoRA pairs of unequal shapes (Muon orthogonalises each matrix, so shapes matter)."""
    k = iter(mx.random.split(mx.random.key(seed), 8))
    return {i: {"q": (mx.random.normal((16, 4), key=next(k)), mx.random.normal((4, 8), key=next(k))),
                "v": (mx.random.normal((16, 4), key=next(k)), mx.random.normal((4, 12), key=next(k)))}
            for i in (0, 1)}


def by_blocks(name, elementwise, steps=2):
    params, opt = tree(0), make_optimizer(name, 1e-2)
    opt.init(to_flat(params))
    updates = OptimizerUpdate(opt, elementwise)
    for s in range(steps):
        grads, step0 = tree(1 + s), opt.state["step"]
        for i in (1, 0):  # top block first, as the backward hands them out
            flat = updates(False, opt.state["step"] is step0)(to_flat({i: grads[i]}), to_flat({i: params[i]}))
            params[i] = from_flat(flat)[i]
        mx.eval(params, opt.state)
    return to_flat(params), updates


def whole(name, steps=2):
    params, opt = tree(0), make_optimizer(name, 1e-2)
    opt.init(to_flat(params))
    flat = to_flat(params)
    for s in range(steps):
        flat = opt.apply_gradients(to_flat(tree(1 + s)), flat)
        mx.eval(flat, opt.state)
    return flat


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_block_updates_equal_one_update(name):
    got, updates = by_blocks(name, OPTIMIZERS[name].elementwise)
    want = whole(name)
    assert all(np.array_equal(np.array(got[k]), np.array(want[k])) for k in want), name
    # element-wise rules ran on the blocks laid end to end; the others one parameter at a time
    assert bool(updates.vectors) == OPTIMIZERS[name].elementwise


def test_a_rule_that_is_not_elementwise_must_not_be_concatenated():
    """The control for the table's flag: Muon run on a block's parameters laid end to end is another update."""
    got, _ = by_blocks("muon", elementwise=True)
    want = whole("muon")
    assert max(float(mx.max(mx.abs(got[k] - want[k]))) for k in want) > 1e-3


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_moments_counted_as_the_optimizer_keeps_them(name):
    """The memory planner's count: state arrays of each parameter's size the optimizer keeps."""
    opt = make_optimizer(name, 1e-2)
    opt.init({"p": mx.zeros((3, 5))})
    assert sum(v.size == 15 for v in opt.state["p"].values()) == OPTIMIZERS[name].moments
