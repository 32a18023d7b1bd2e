"""The compiled loop is the formula, in one rounding, in place, and never keeps a NaN it was told to drop."""

import numpy as np
import pytest
from numpy.testing import assert_array_equal

from modavg_plugin.kernels import blend, blend_at_addresses


@pytest.mark.parametrize("target_dtype", [np.float32, np.float64])
@pytest.mark.parametrize("values_dtype", [np.float32, np.float64, np.float16])  # compiled loop, NumPy for float16
@pytest.mark.parametrize("keep", [0.0, 0.9, 1.0])
def test_blend_is_the_formula_in_place(target_dtype, values_dtype, keep):
    rng = np.random.default_rng(3)
    size = 70_001  # more than one NumPy block of the float16 path
    target = rng.standard_normal(size).astype(target_dtype)
    memory = target.__array_interface__["data"][0]
    values = rng.standard_normal(size).astype(values_dtype)
    exact = keep * target.astype(np.float64) + 0.25 * values.astype(np.float64)
    blend(target, values, keep, 0.25)
    assert target.__array_interface__["data"][0] == memory
    assert target.dtype == target_dtype
    assert_array_equal(target, exact.astype(target_dtype))  # one rounding, from the float64 result


def test_blend_with_keep_zero_drops_a_nan_target():
    target = np.full(5, np.nan, dtype=np.float32)
    blend(target, np.arange(5, dtype=np.float32), 0.0, 2.0)
    assert_array_equal(target, [0.0, 2.0, 4.0, 6.0, 8.0])


def test_blend_refuses_arrays_of_different_sizes():
    with pytest.raises(ValueError, match=r"blend needs flat arrays of one size, not \(3,\) and \(4,\)"):
        blend(np.zeros(3, dtype=np.float32), np.zeros(4, dtype=np.float32), 0.5, 0.5)


def test_blend_at_addresses_updates_each_slice_from_its_array():
    rng = np.random.default_rng(4)
    arrays = [rng.standard_normal(size).astype(np.float32) for size in (1, 7, 300, 0, 5)]
    sizes = np.array([array.size for array in arrays], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    flat = rng.standard_normal(int(sizes.sum())).astype(np.float32)
    exact = [0.75 * flat[o : o + n].astype(np.float64) + 0.25 * a for o, n, a in zip(offsets, sizes, arrays)]
    addresses = np.array([array.__array_interface__["data"][0] for array in arrays], dtype=np.int64)
    blend_at_addresses(flat, addresses, offsets, sizes, 0.75, 0.25)
    for offset, size, expected in zip(offsets, sizes, exact):
        assert_array_equal(flat[offset : offset + size], expected.astype(np.float32))
