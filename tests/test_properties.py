"""Property-based tests (hypothesis) of selection, weights and averages.

For any scores (NaN, infinities, ties, huge and tiny values), any
``num_models`` and either direction, the strategies select only finite
scores, never a worse one over a better one, and give finite non-negative
weights summing to 1. Weighted averages of random arrays with random valid
weights lie within the element-wise range of the inputs and equal a float64
NumPy reference (to float32 round-off), in memory and streamed from files.
``check_weights`` accepts exactly the valid weight lists.

Examples are drawn afresh on each run, and the example database is off (a
failure prints its example); hypothesis still keeps a cache in
``.hypothesis/``, which ignores itself in git.
"""

import math
import os
import tempfile
from typing import Any, List, Sequence

import mxnet as mx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from numpy.testing import assert_allclose

from modavg_plugin import AveragingStrategy, CheckpointError
from modavg_plugin.weighted_sum import average_arrays, average_checkpoint_files, check_weights, normalised_weights

QUICK = settings(max_examples=200, deadline=None, database=None)
SLOW = settings(max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

SPECIAL_SCORES = [0.0, -0.0, 1.0, -1.0, 1e308, -1e308, 5e-324, -5e-324, 700.0, 800.0, math.nan, math.inf, -math.inf]
scores_lists = st.lists(st.one_of(st.floats(), st.sampled_from(SPECIAL_SCORES)), min_size=1, max_size=12)


def records(scores: Sequence[float]) -> List[dict]:
    return [{"params_path": f"p{index}", "epoch_no": index, "score": score} for index, score in enumerate(scores)]


# selection and weights


@QUICK
@given(
    scores=scores_lists,
    strategy_type=st.sampled_from(["mean", "softmax"]),
    num_models=st.integers(min_value=1, max_value=15),
    maximize=st.booleans(),
)
def test_selection_and_weights(scores, strategy_type, num_models, maximize):
    strategy = AveragingStrategy.from_config({"type": strategy_type, "num_models": num_models, "maximize": maximize})
    finite = [index for index, score in enumerate(scores) if math.isfinite(score)]
    if not finite:
        with pytest.raises(CheckpointError, match="no checkpoint has a finite 'score'"):
            strategy.select_checkpoints(records(scores))
        return
    paths, weights = strategy.select_checkpoints(records(scores))
    selected = [int(path[1:]) for path in paths]

    assert len(selected) == len(set(selected)) == min(num_models, len(finite))
    assert all(math.isfinite(scores[index]) for index in selected)  # NaN and inf never selected
    assert all(isinstance(weight, float) and math.isfinite(weight) and weight >= 0 for weight in weights)
    assert math.fsum(weights) == pytest.approx(1.0, rel=0, abs=1e-12)

    better = (lambda a, b: a > b) if maximize else (lambda a, b: a < b)
    for chosen in selected:
        for other in set(finite) - set(selected):
            assert not better(scores[other], scores[chosen]), (scores[other], scores[chosen])
            if scores[other] == scores[chosen]:
                assert chosen < other  # ties go to the earlier epoch
    # best first, and a better checkpoint never weighs less
    for (first, second), (w_first, w_second) in zip(zip(selected, selected[1:]), zip(weights, weights[1:])):
        assert not better(scores[second], scores[first])
        assert w_first >= w_second
    if strategy_type == "mean":
        assert weights == [1.0 / len(selected)] * len(selected)


# averages


def float_arrays(dtype: np.dtype, shape, count: int) -> st.SearchStrategy:
    limit = float(np.float32(1e30)) if dtype != np.float16 else 6e4  # bounds a float32 can hold exactly
    elements = st.floats(min_value=-limit, max_value=limit, width=32 if dtype != np.float64 else 64)
    size = int(np.prod(shape))
    return st.lists(st.lists(elements, min_size=size, max_size=size), min_size=count, max_size=count).map(
        lambda rows: [np.array(row, dtype=dtype).reshape(shape) for row in rows]
    )


valid_weight = st.one_of(st.floats(min_value=0.0, max_value=1e308), st.sampled_from([0.0, 5e-324, 1.0, 1e308]))


@st.composite
def averaging_inputs(draw: Any):
    """``(arrays, weights)``: 1-6 same-shape arrays of one dtype and valid weights (finite, >= 0, one > 0)."""
    dtype = np.dtype(draw(st.sampled_from(["float32", "float16", "float64"])))
    shape = tuple(draw(st.lists(st.integers(min_value=1, max_value=4), min_size=1, max_size=3)))
    count = draw(st.integers(min_value=1, max_value=6))
    arrays = draw(float_arrays(dtype, shape, count))
    weights = draw(st.lists(valid_weight, min_size=count, max_size=count).filter(lambda ws: any(w > 0 for w in ws)))
    return arrays, weights


def reference_average(arrays: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """The weighted mean in float64, weights scaled by their largest first (their sum may overflow)."""
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.max()
    w = w / w.sum()
    return np.tensordot(w, np.stack([array.astype(np.float64) for array in arrays]), axes=1)


def tolerance(arrays: Sequence[np.ndarray]) -> float:
    """Round-off of a float32 (or float64) running sum of ``len(arrays)`` terms, plus the cast back to float16."""
    dtype = arrays[0].dtype
    magnitude = max(float(np.abs(array.astype(np.float64)).max()) for array in arrays)
    summing_eps = np.finfo(np.float64 if dtype == np.float64 else np.float32).eps
    cast_eps = np.finfo(np.float16).eps if dtype == np.float16 else 0.0
    return magnitude * ((len(arrays) + 2) * summing_eps + cast_eps) + np.finfo(dtype).tiny


def check_average(averaged: np.ndarray, arrays: Sequence[np.ndarray], weights: Sequence[float]) -> None:
    assert averaged.dtype == arrays[0].dtype and averaged.shape == arrays[0].shape
    result = averaged.astype(np.float64)
    stacked = np.stack([array.astype(np.float64) for array in arrays])
    slack = tolerance(arrays)
    assert np.all(np.isfinite(result))
    assert np.all(result >= stacked.min(axis=0) - slack) and np.all(result <= stacked.max(axis=0) + slack)
    assert_allclose(result, reference_average(arrays, weights), rtol=0, atol=slack)


@QUICK
@given(inputs=averaging_inputs())
def test_average_arrays_is_within_the_inputs_range_and_equals_the_float64_mean(inputs):
    arrays, weights = inputs
    averaged = average_arrays([mx.nd.array(array, dtype=array.dtype) for array in arrays], weights)
    check_average(averaged.asnumpy(), arrays, weights)


@SLOW
@given(inputs=averaging_inputs())
def test_streamed_average_of_files_is_within_the_inputs_range_and_equals_the_float64_mean(inputs):
    arrays, weights = inputs
    with tempfile.TemporaryDirectory() as folder:
        paths = [os.path.join(folder, f"{index}.params") for index in range(len(arrays))]
        for path, array in zip(paths, arrays):
            mx.nd.save(path, {"w": mx.nd.array(array, dtype=array.dtype)})
        averaged = average_checkpoint_files(paths, weights)["w"].asnumpy()
    check_average(averaged, arrays, weights)


# check_weights


ANY_WEIGHT = st.one_of(
    valid_weight,
    st.floats(),  # negative, NaN, infinite
    st.integers(min_value=-(10**400), max_value=10**400),
    st.booleans(),
    st.none(),
    st.text(max_size=3),
    st.floats(width=32).map(np.float32),
    st.sampled_from([np.bool_(True), np.int64(2), [1.0]]),
)


def is_valid(weights: Sequence[Any], count: int) -> bool:
    """The specification: ``count`` real numbers (no bools, strings...), each finite and >= 0, not all 0."""
    if len(weights) != count:
        return False
    for weight in weights:
        if isinstance(weight, (bool, np.bool_)) or not isinstance(weight, (int, float, np.integer, np.floating)):
            return False
        try:
            value = float(weight)  # must be a finite float: an integer of 400 digits is not
        except OverflowError:
            return False
        if not math.isfinite(value) or value < 0:
            return False
    return count == 0 or any(weight > 0 for weight in weights)


@QUICK
@given(weights=st.lists(ANY_WEIGHT, max_size=6), count_offset=st.sampled_from([0, 0, 0, -1, 1]))
def test_check_weights_accepts_exactly_the_valid_lists(weights, count_offset):
    count = max(len(weights) + count_offset, 0)
    if not is_valid(weights, count):
        with pytest.raises(ValueError, match="weight"):
            check_weights(weights, count)
        return
    assert check_weights(weights, count) == [float(weight) for weight in weights]
    normalised = normalised_weights(weights, count)
    assert all(math.isfinite(weight) and weight >= 0 for weight in normalised)
    if count:
        assert math.fsum(normalised) == pytest.approx(1.0, rel=0, abs=1e-12)
