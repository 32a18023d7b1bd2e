"""The fast update paths equal the plain formula, and synchronise with MXNet's engine."""

from typing import List, Tuple

import mxnet as mx
import numpy as np
import pytest
from numpy.testing import assert_allclose

from modavg_plugin import ExponentialMovingAverage, update_kernels
from modavg_plugin.update_kernels import (
    MULTI_TENSOR_LIMIT,
    CopyUpdateGroup,
    CpuUpdateGroup,
    MultiTensorUpdateGroup,
    update_group_for,
)

SHAPES = [(3,), (2, 5), (1,), (70000,), (4, 3, 2)] * 27  # 135 arrays: more than two multi-tensor chunks


def random_arrays(shapes, dtype, seed, ctx=None) -> List[mx.nd.NDArray]:
    rng = np.random.RandomState(seed)
    return [mx.nd.array(rng.randn(*shape), dtype=dtype, ctx=ctx or mx.cpu()) for shape in shapes]


def plain_formula(shadows: List[np.ndarray], values: List[np.ndarray], decay: float) -> List[np.ndarray]:
    return [decay * shadow + (1.0 - decay) * value.astype(np.float64) for shadow, value in zip(shadows, values)]


@pytest.mark.parametrize("group_type", [CpuUpdateGroup, MultiTensorUpdateGroup])
@pytest.mark.parametrize(
    "value_dtype, shadow_dtype, rtol",
    [("float32", "float32", 2e-6), ("float16", "float32", 2e-6), ("float64", "float64", 1e-12)],
)
def test_fast_paths_equal_the_plain_formula(group_type, value_dtype, shadow_dtype, rtol):
    assert len(SHAPES) > 2 * MULTI_TENSOR_LIMIT
    names = [f"p{index}" for index in range(len(SHAPES))]
    initial = random_arrays(SHAPES, value_dtype, seed=0)
    group = group_type(names, initial, np.dtype(shadow_dtype))
    expected = [array.asnumpy().astype(np.float64) for array in initial]
    for step, decay in enumerate([0.9, 0.5, 0.999, 0.0, 1.0], start=1):
        values = random_arrays(SHAPES, value_dtype, seed=step)
        group.update(values, decay)
        expected = plain_formula(expected, [value.asnumpy() for value in values], decay)
    for name, target in zip(names, expected):
        shadow = group.shadows[name]
        assert shadow.dtype == np.dtype(shadow_dtype)
        assert_allclose(shadow.asnumpy(), target, rtol=rtol, atol=rtol, err_msg=name)


def test_groups_are_picked_by_context_and_dtype():
    cpu_values = random_arrays([(2,)], "float32", seed=0)
    assert isinstance(update_group_for(["a"], cpu_values, np.dtype("float32")), CpuUpdateGroup)
    integers = [mx.nd.array([1, 2], dtype="int32")]
    assert isinstance(update_group_for(["a"], integers, np.dtype("int32")), CopyUpdateGroup)


def test_shadows_share_one_flat_buffer_per_context_and_dtype():
    params = []
    for index, ctx in enumerate([mx.cpu(0), mx.cpu(1), mx.cpu(0)]):
        parameter = mx.gluon.Parameter(f"w{index}", shape=(4,), init=mx.init.Constant(float(index)))
        parameter.initialize(ctx=ctx)
        params.append((parameter.name, parameter))
    ema = ExponentialMovingAverage(params, decay=0.5)
    assert len(ema._groups) == 2
    assert {group.flat.size for group in ema._groups} == {8, 4}
    for index, (name, parameter) in enumerate(params):
        parameter.data()[:] = 10.0 + index
        assert ema.shadows[name].context == parameter.data().context
    ema.apply()
    for index, (name, _) in enumerate(params):
        assert_allclose(ema.shadows[name].asnumpy(), np.full(4, 0.5 * index + 0.5 * (10.0 + index)))


def test_views_of_the_flat_buffer_save_and_load_like_arrays(tmp_path):
    names = ["a", "b"]
    group = CpuUpdateGroup(names, [mx.nd.array([1.0, 2.0]), mx.nd.array([[3.0], [4.0]])], np.dtype("float32"))
    mx.nd.save(str(tmp_path / "x.params"), group.shadows)
    loaded = mx.nd.load(str(tmp_path / "x.params"))
    assert_allclose(loaded["a"].asnumpy(), [1.0, 2.0])
    assert_allclose(loaded["b"].asnumpy(), [[3.0], [4.0]])


def slow_engine_work() -> mx.nd.NDArray:
    """An op chain that keeps the engine busy for a while (~0.1-1 s on 2 cores)."""
    matrix = mx.nd.random.uniform(shape=(1200, 1200))
    for _ in range(6):
        matrix = mx.nd.dot(matrix, matrix) / 1200.0
    return matrix


def make_average() -> Tuple[ExponentialMovingAverage, mx.gluon.Parameter]:
    parameter = mx.gluon.Parameter("weight", shape=(1000,), init=mx.init.Constant(1.0))
    parameter.initialize()
    return ExponentialMovingAverage([("weight", parameter)], decay=0.5), parameter


def test_apply_waits_for_pending_writes_to_the_parameter():
    ema, parameter = make_average()
    mx.nd.waitall()
    busy = slow_engine_work()
    # queued behind the slow chain: writes 7.0 into the parameter later
    mx.nd.elemwise_add(busy[0, :1000] * 0.0, mx.nd.full((1000,), 7.0), out=parameter.data())
    ema.apply()
    assert_allclose(ema.shadows["weight"].asnumpy(), np.full(1000, 0.5 * 1.0 + 0.5 * 7.0))


def test_apply_waits_for_pending_reads_of_the_shadow():
    ema, parameter = make_average()
    parameter.data()[:] = 3.0
    mx.nd.waitall()
    busy = slow_engine_work()
    # queued behind the slow chain: reads the shadow (1.0) later
    snapshot = busy[0, :1000] * 0.0 + ema.shadows["weight"]
    ema.apply()  # shadow becomes 2.0
    assert_allclose(snapshot.asnumpy(), np.full(1000, 1.0))
    assert_allclose(ema.shadows["weight"].asnumpy(), np.full(1000, 2.0))


def test_apply_reads_the_values_before_writes_queued_after_it():
    ema, parameter = make_average()
    parameter.data()[:] = 3.0
    busy = slow_engine_work()
    ema.apply()  # queued behind the slow chain, as the write below is
    mx.nd.elemwise_add(busy[0, :1000] * 0.0, mx.nd.full((1000,), 9.0), out=parameter.data())
    assert_allclose(ema.shadows["weight"].asnumpy(), np.full(1000, 2.0))
    assert_allclose(parameter.data().asnumpy(), np.full(1000, 9.0))


def test_more_queued_updates_than_argument_slots_all_land_with_their_own_decay():
    # Caught (would be): a slot's arguments overwritten while its update still waited in the engine.
    value = mx.nd.full((1000,), 1.0)
    group = CpuUpdateGroup(["w"], [value], np.dtype("float32"))
    busy = slow_engine_work()
    mx.nd.elemwise_add(busy[0, :1000] * 0.0, mx.nd.full((1000,), 2.0), out=value)  # the updates queue behind it
    decays = [0.99 + 0.0002 * step for step in range(3 * update_kernels.ENGINE_SLOTS)]
    for decay in decays:
        group.update([value], decay)
    expected = 2.0 - float(np.prod(decays))  # the shadow starts at 1.0 and every value is 2.0
    assert_allclose(group.shadows["w"].asnumpy(), np.full(1000, expected), rtol=1e-6)


def test_new_value_arrays_are_followed():
    # Caught: addresses kept from the first update after the host replaced its arrays (Parameter.reset_ctx).
    ema, parameter = make_average()
    parameter.data()[:] = 3.0
    ema.apply()  # 2.0
    parameter.reset_ctx(mx.cpu(0))  # new arrays, same values
    parameter.data()[:] = 5.0
    ema.apply()  # 3.5
    assert_allclose(ema.shadows["weight"].asnumpy(), np.full(1000, 3.5))
