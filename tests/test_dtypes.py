"""Every floating dtype MXNet writes is averaged, bfloat16 included; an array's dtype must agree across sources.

bfloat16 checkpoints are written the way MXNet's AMP writes them
(``mx.nd.amp_cast``). Their averages are compared bit for bit with a
reference computed here: the float32 mean rounded to bfloat16 to nearest,
ties to even, decided on the float32 bits. Inputs are chosen so that the
weighted sums are exact in float32 (8-bit significands in a narrow exponent
range, weights that are multiples of 1/4): the reference then does not
depend on the order of the additions or on fused multiply-adds, and many
means fall exactly half-way between two bfloat16 values, where rounding
to even matters.
"""

import re

import mxnet as mx
import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from modavg_plugin.checks import CheckpointError
from modavg_plugin.dtypes import BFLOAT16, round_to_bfloat16
from modavg_plugin.files import save_params
from modavg_plugin.params_files import ParamsFileReader
from modavg_plugin.weighted_sum import WeightedSum, average_checkpoint_files, host_array

LARGER_THAN_A_CHUNK = 600_000  # bfloat16 values: 1.2 MB in the file, several 1 MiB chunks once widened


# a reference rounding, and bfloat16 arrays made by MXNet


def reference_bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """float32 ``values`` (finite or infinite) rounded to bfloat16 bits: to nearest, ties to the even upper half."""
    bits = np.asarray(values, dtype=np.float32).view(np.uint32).astype(np.int64)
    upper, lower = bits >> 16, bits & 0xFFFF
    round_up = (lower > 0x8000) | ((lower == 0x8000) & (upper % 2 == 1))
    return (upper + round_up).astype(np.uint16)


def widen(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bits as float64 values (exact)."""
    return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def bfloat16_bits(array: mx.nd.NDArray) -> np.ndarray:
    assert array.dtype == BFLOAT16
    return array.asnumpy().view(np.uint16)


def as_bfloat16(values: np.ndarray) -> mx.nd.NDArray:
    """A bfloat16 NDArray of ``values`` (all representable in bfloat16), made as AMP makes them."""
    array = mx.nd.amp_cast(mx.nd.array(values, dtype="float32"), dtype=BFLOAT16)
    assert_array_equal(widen(bfloat16_bits(array)), values)  # nothing was rounded: the inputs are what they say
    return array


def exact_bfloat16_values(rng: np.random.RandomState, size: int) -> np.ndarray:
    """Values with 8 significant bits (exact in bfloat16) and magnitudes in [1/8, 16): their weighted sums are exact."""
    significands = 1.0 + rng.randint(0, 128, size) / 128.0
    return rng.choice([-1.0, 1.0], size) * significands * 2.0 ** rng.randint(-3, 4, size)


def save(path, arrays) -> str:
    mx.nd.save(str(path), arrays)
    return str(path)


def write_checkpoints(tmp_path, values, extra=None):
    """One file per entry of ``values`` holding ``w`` (bfloat16) and the arrays of ``extra[i]``."""
    return [
        save(tmp_path / f"epoch-{index}.params", {"w": as_bfloat16(array), **(extra[index] if extra else {})})
        for index, array in enumerate(values)
    ]


def test_the_reference_rounding_rounds_ties_to_even():
    ties = np.array([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), -(1 + 3 * 2**-8), 2 + 2**-7], np.float32)
    assert_array_equal(widen(reference_bfloat16_bits(ties)), [1.0, 1 + 2**-6, -1.0, -(1 + 2**-6), 2.0])
    near = np.array([1 + 2**-8 + 2**-20, 1 + 2**-8 - 2**-20], np.float32)
    assert_array_equal(widen(reference_bfloat16_bits(near)), [1 + 2**-7, 1.0])


# bfloat16 averages


@pytest.mark.parametrize(
    "weights, size",
    [([0.5, 0.5], 1000), ([0.25, 0.75], 1000), ([1.0, 2.0, 1.0], 1000), ([0.25, 0.5, 0.25], LARGER_THAN_A_CHUNK)],
)
def test_bfloat16_checkpoints_average_to_the_float32_mean_rounded_to_nearest_even(tmp_path, weights, size):
    rng = np.random.RandomState(len(weights) * size)
    values = [exact_bfloat16_values(rng, size).reshape(size // 100, 100) for _ in weights]
    paths = write_checkpoints(tmp_path, values)
    normalised = np.array(weights) / sum(weights)
    mean = sum(weight * array for weight, array in zip(normalised, values))  # exact in float64 and in float32
    assert_array_equal(mean.astype(np.float32), mean)
    expected = reference_bfloat16_bits(mean.astype(np.float32))
    ties = (mean.astype(np.float32).view(np.uint32) & 0xFFFF) == 0x8000
    assert ties.sum() > size / 20  # rounding ties to even is exercised

    streamed = average_checkpoint_files(paths, weights)["w"]
    assert streamed.shape == values[0].shape
    assert_array_equal(bfloat16_bits(streamed), expected)

    total = WeightedSum()  # in memory, from the arrays MXNet loads
    for path, weight in zip(paths, weights):
        total.add(mx.nd.load(path), weight, path)
    assert_array_equal(bfloat16_bits(total.average()["w"]), expected)


def test_bfloat16_average_with_any_weights_is_the_nearest_bfloat16_of_the_mean(tmp_path):
    rng = np.random.RandomState(3)
    exact = [reference_bfloat16_bits(rng.randn(20_000).astype(np.float32)) for _ in range(3)]
    values = [widen(bits) for bits in exact]
    paths = write_checkpoints(tmp_path, values)
    weights = [0.2, 0.3, 0.5]
    mean = sum(weight * array for weight, array in zip(weights, values))
    averaged = widen(bfloat16_bits(average_checkpoint_files(paths, weights)["w"]))
    # float32 sums differ from the float64 mean by at most a few float32 roundings of the terms' magnitude;
    # where that interval holds a rounding boundary (half-way between two bfloat16 values), either side is right
    error_bound = 4 * 2.0**-24 * sum(weight * np.abs(array) for weight, array in zip(weights, values))
    low = widen(reference_bfloat16_bits((mean - error_bound).astype(np.float32)))
    high = widen(reference_bfloat16_bits((mean + error_bound).astype(np.float32)))
    clear = low == high
    assert clear.mean() > 0.9
    assert_array_equal(averaged[clear], widen(reference_bfloat16_bits(mean.astype(np.float32)))[clear])
    assert np.all((low <= averaged) & (averaged <= high))


def test_subnormal_bfloat16_values_and_arrays_of_many_dimensions_are_averaged_exactly(tmp_path):
    """MXNet's amp_cast to bfloat16 goes through MKLDNN, which flushes subnormals to 0 and refuses 7 or more dimensions."""
    tiny = 2.0**-133 * np.arange(1, 9)  # subnormal in bfloat16 and in float32; their means stay exact
    shape = (2, 1, 1, 2, 1, 1, 2)
    paths = [
        save(tmp_path / f"{index}.params", {"w": mx.nd.array(bits.view(BFLOAT16), dtype=BFLOAT16).reshape(shape)})
        for index, bits in enumerate(reference_bfloat16_bits(values) for values in (tiny, 3 * tiny))
    ]
    averaged = average_checkpoint_files(paths, [0.5, 0.5])["w"]
    assert averaged.shape == shape
    assert_array_equal(widen(bfloat16_bits(averaged)).reshape(-1), 2 * tiny)


def test_the_averaged_bfloat16_file_saved_loads_back_as_bfloat16(tmp_path):
    rng = np.random.RandomState(4)
    values = [exact_bfloat16_values(rng, 300).reshape(3, 100) for _ in range(2)]
    paths = write_checkpoints(tmp_path, values, extra=[{"n": mx.nd.array([7], dtype="int64")}] * 2)
    averaged = average_checkpoint_files(paths, [0.5, 0.5])
    output = str(tmp_path / "averaged.params")
    save_params(output, averaged)
    loaded = mx.nd.load(output)
    assert loaded["w"].dtype == BFLOAT16 and loaded["w"].shape == (3, 100)
    assert_array_equal(bfloat16_bits(loaded["w"]), bfloat16_bits(averaged["w"]))
    assert loaded["n"].dtype == np.int64
    with ParamsFileReader().open(output) as params_file:
        assert params_file.entries["w"].dtype == BFLOAT16  # the chunked reader's path, not mx.nd.load's
    again = average_checkpoint_files([output, output], [1.0, 1.0])["w"]
    assert_array_equal(bfloat16_bits(again), bfloat16_bits(averaged["w"]))


@pytest.mark.parametrize("chunk_bytes", [8, 14, 64, 1 << 20])
def test_the_reader_widens_every_bfloat16_to_the_float32_mxnet_gives(tmp_path, chunk_bytes):
    every_bfloat16 = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)  # NaN, infinities, subnormals included
    array = mx.nd.array(every_bfloat16.view(BFLOAT16), dtype=BFLOAT16)
    path = save(tmp_path / "all.params", {"w": array})
    expected = mx.nd.amp_cast(array, dtype="float32").asnumpy().view(np.uint32)
    with ParamsFileReader(chunk_bytes=chunk_bytes).open(path) as params_file:
        assert params_file.entries["w"].dtype == BFLOAT16 and params_file.entries["w"].shape == (1 << 16,)
        pieces = []
        for start, values in params_file.chunks("w"):
            assert values.dtype == np.float32 and values.nbytes <= max(chunk_bytes, 8)  # within the one buffer
            pieces.append((start, values.view(np.uint32).copy()))
    assert [start for start, _ in pieces] == sorted(start for start, _ in pieces)
    assert_array_equal(np.concatenate([values for _, values in pieces]), expected)
    assert_array_equal(host_array(array).view(np.uint32), expected)  # and in memory


def test_round_to_bfloat16_matches_the_reference_on_edge_cases_and_random_bits():
    edges = np.array(
        [0.0, -0.0, 1e-45, -1e-45, 1e-39, -1e-39, 2**-126, np.inf, -np.inf, 1 + 2**-8, -(1 + 2**-8), 65535.0],
        np.float32,
    )
    edge_bits = np.array(
        [0x7F7F7FFF, 0x7F7F8000, 0x7F7FFFFF, 0xFF7F8000, 0x007F8000, 0x007FFFFF, 0x00008000, 0x00018000], np.uint32
    )  # below and at half-way from the largest bfloat16 to infinity, the largest float32, subnormal ties
    edges = np.concatenate([edges, edge_bits.view(np.float32)])
    random_bits = np.random.RandomState(5).randint(0, 1 << 32, 1 << 20, dtype=np.uint64).astype(np.uint32)
    values = np.concatenate([edges, random_bits.view(np.float32)])
    finite_or_infinite = ~np.isnan(values)
    out = np.empty(values.size, np.uint16)
    round_to_bfloat16(values, out)
    assert_array_equal(out[finite_or_infinite], reference_bfloat16_bits(values[finite_or_infinite]))
    assert np.isnan(widen(out[~finite_or_infinite])).all()
    for nan_bits in (0x7FC00000, 0x7F800001, 0xFFFFFFFF, 0xFF800001, 0x7FFFFFFF):
        out = np.empty(1, np.uint16)
        round_to_bfloat16(np.array([nan_bits], np.uint32).view(np.float32), out)
        assert np.isnan(widen(out)).all() and (out[0] >> 15) == (nan_bits >> 31), hex(nan_bits)


def test_integers_beside_bfloat16_are_copied_from_the_first_file(tmp_path):
    rng = np.random.RandomState(6)
    values = [exact_bfloat16_values(rng, 10) for _ in range(3)]
    counters = [{"n": mx.nd.array([10 * index, 1], dtype="int32")} for index in range(3)]
    paths = write_checkpoints(tmp_path, values, extra=counters)
    best_first = [paths[2], paths[0], paths[1]]
    averaged = average_checkpoint_files(best_first, [0.25, 0.5, 0.25])
    assert averaged["n"].dtype == np.int32
    assert averaged["n"].asnumpy().tolist() == [20, 1]
    expected = reference_bfloat16_bits((0.25 * values[2] + 0.5 * values[0] + 0.25 * values[1]).astype(np.float32))
    assert_array_equal(bfloat16_bits(averaged["w"]), expected)


def test_a_bfloat16_file_holding_nan_is_skipped_like_any_other(tmp_path, caplog):
    good = [np.full(4, 1.0), np.full(4, 3.0)]
    paths = write_checkpoints(tmp_path, good)
    nan = save(tmp_path / "nan.params", {"w": as_bfloat16(np.array([1.0, 1.0, np.nan, 1.0]))})
    averaged = average_checkpoint_files([paths[0], nan, paths[1]], [1.0, 1.0, 1.0])
    assert_array_equal(widen(bfloat16_bits(averaged["w"])), [2.0] * 4)
    assert f"skipping checkpoint file {nan}: it holds NaN or infinite values" in caplog.text


# float16 and float64 are averaged as before


def test_float16_checkpoints_average_in_float32_and_come_back_as_float16(tmp_path):
    rng = np.random.RandomState(7)
    values = [rng.randint(-64, 65, 1000) / 8.0 for _ in range(2)]  # the weighted mean is exact in float16
    paths = [save(tmp_path / f"{i}.params", {"w": mx.nd.array(v, dtype="float16")}) for i, v in enumerate(values)]
    averaged = average_checkpoint_files(paths, [0.25, 0.75])["w"]
    assert averaged.dtype == np.float16
    assert_array_equal(averaged.asnumpy(), 0.25 * values[0] + 0.75 * values[1])


def test_float64_checkpoints_average_in_float64(tmp_path):
    rng = np.random.RandomState(8)
    values = [rng.randn(1000) for _ in range(3)]
    paths = [save(tmp_path / f"{i}.params", {"w": mx.nd.array(v, dtype="float64")}) for i, v in enumerate(values)]
    averaged = average_checkpoint_files(paths, [0.2, 0.3, 0.5])["w"]
    assert averaged.dtype == np.float64
    assert_allclose(averaged.asnumpy(), 0.2 * values[0] + 0.3 * values[1] + 0.5 * values[2], rtol=1e-13, atol=1e-15)


# an array's dtype must be the same in every source

MIXED = [
    ("float16", "float32"),
    ("float32", "float16"),
    ("float32", "float64"),
    ("float32", "int32"),
    ("int32", "float32"),
    ("int32", "int64"),
    ("bfloat16", "float32"),
    ("float32", "bfloat16"),
    ("bfloat16", "float16"),
]


def array_of(dtype: str, values) -> mx.nd.NDArray:
    return as_bfloat16(np.asarray(values, np.float64)) if dtype == "bfloat16" else mx.nd.array(values, dtype=dtype)


def mixed_message(name: str, dtype: str, source: str, first_dtype: str, first_source: str) -> str:
    return re.escape(
        f"parameter {name!r} has dtype {dtype} in {source} but {first_dtype} in {first_source} "
        "(mixed dtypes are not averaged)"
    )


@pytest.mark.parametrize("first, second", MIXED)
def test_mixed_dtypes_across_files_are_an_error_naming_the_array_and_both_files(tmp_path, first, second):
    same = {"b": mx.nd.array([1.0, 2.0])}
    a = save(tmp_path / "a.params", {"w": array_of(first, [1, 2, 3]), **same})
    b = save(tmp_path / "b.params", {"w": array_of(first, [3, 2, 1]), **same})
    c = save(tmp_path / "c.params", {"w": array_of(second, [5, 6, 7]), **same})
    with pytest.raises(CheckpointError, match=mixed_message("w", second, c, first, a)):
        average_checkpoint_files([a, b, c], [1.0, 1.0, 1.0])
    with pytest.raises(CheckpointError, match=mixed_message("w", first, a, second, c)):
        average_checkpoint_files([c, a], [1.0, 1.0])


@pytest.mark.parametrize("first, second", MIXED)
def test_mixed_dtypes_in_memory_are_refused_before_anything_is_summed(first, second):
    total = WeightedSum()
    total.add({"w": array_of(first, [1, 2, 3]), "b": mx.nd.array([1.0])}, 0.25, "the first")
    with pytest.raises(CheckpointError, match=mixed_message("w", second, "the second", first, "the first")):
        total.add({"w": array_of(second, [5, 6, 7]), "b": mx.nd.array([9.0])}, 0.75, "the second")
    assert total.total_weight == 0.25
    mean = total.mean()
    assert mean["b"].asnumpy().tolist() == [1.0]  # nothing of the refused source was added, not even "b"
    assert mean["w"].dtype == array_of(first, [0]).dtype
    assert_array_equal(as_float64(mean["w"]), [1, 2, 3])


def as_float64(array: mx.nd.NDArray) -> np.ndarray:
    return widen(bfloat16_bits(array)) if array.dtype == BFLOAT16 else array.asnumpy().astype(np.float64)


def test_an_ema_of_bfloat16_parameters_is_kept_in_float32_and_swapped_in_rounded_to_nearest():
    from modavg_plugin import ExponentialMovingAverage
    from modavg_plugin.parameters import DeviceArrays

    values = [np.array([1.0, 2.0, 3.0], np.float32), np.array([2.0, 2.0, 5.0], np.float32)]
    parameter = mx.nd.amp_cast(mx.nd.array(values[0]), dtype=BFLOAT16)
    ema = ExponentialMovingAverage([("w", DeviceArrays(lambda: [parameter]))], decay=0.5, warmup="none")
    assert ema.shadows["w"].dtype == np.float32  # averaged, not copied as an integer would be
    parameter[:] = mx.nd.amp_cast(mx.nd.array(values[1]), dtype=BFLOAT16)
    ema.apply()
    expected = 0.5 * values[0] + 0.5 * values[1]
    np.testing.assert_array_equal(ema.shadows["w"].asnumpy(), expected)
    with ema.average_parameters():
        np.testing.assert_array_equal(host_array(parameter), expected)  # 1.5, 2, 4: exact in bfloat16
