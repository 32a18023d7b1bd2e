"""The buffer-reusing .params reader agrees with mx.nd.load and refuses broken files cleanly."""

import struct

import mxnet as mx
import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from modavg_plugin.checkpoints import CheckpointError, average_checkpoint_files
from modavg_plugin.params_files import ParamsFileReader, ParamsFormatError

DTYPES = ["float32", "float16", "float64", "int32", "int64", "uint8", "int8"]


def save(path, arrays) -> str:
    mx.nd.save(str(path), arrays)
    return str(path)


def mixed_arrays() -> dict:
    rng = np.random.RandomState(0)
    shapes = [(1,), (2, 3), (2, 3, 4, 5), (7,), (3, 1, 2)]
    return {
        f"param-{dtype}-{index}-é": mx.nd.array(rng.randn(*shape) * 50, dtype=dtype)
        for index, (dtype, shape) in enumerate(zip(DTYPES * 2, shapes * 3))
    }


def test_reader_matches_mx_nd_load(tmp_path):
    path = save(tmp_path / "a.params", mixed_arrays())
    expected = mx.nd.load(path)
    read = ParamsFileReader().read(path)
    assert list(read) == list(expected)
    for name, array in expected.items():
        assert read[name].dtype == array.dtype and read[name].shape == array.shape, name
        assert_array_equal(read[name], array.asnumpy(), err_msg=name)


def test_reader_reuses_one_buffer_for_files_of_equal_size(tmp_path):
    reader = ParamsFileReader()
    paths = [save(tmp_path / f"{index}.params", {"w": mx.nd.full((1000,), index)}) for index in range(3)]
    reader.read(paths[0])
    buffer = reader._buffer
    for index, path in enumerate(paths):
        assert reader.read(path)["w"][0] == index
    assert reader._buffer is buffer


@pytest.mark.parametrize("keep", [0, 7, 16, 30, 60, -5, -1])
def test_truncated_files_are_refused(tmp_path, keep):
    path = save(tmp_path / "a.params", {"weight": mx.nd.ones((4, 4)), "bias": mx.nd.ones(4)})
    data = open(path, "rb").read()
    open(path, "wb").write(data[:keep] if keep >= 0 else data[: len(data) + keep])
    with pytest.raises(ParamsFormatError):
        ParamsFileReader().read(path)


def test_foreign_file_is_refused(tmp_path):
    (tmp_path / "text.params").write_text("these are not the weights you are looking for" * 10)
    with pytest.raises(ParamsFormatError, match="not an MXNet .params file"):
        ParamsFileReader().read(str(tmp_path / "text.params"))


def test_absurd_declared_size_is_refused_without_allocating_it(tmp_path):
    path = save(tmp_path / "a.params", {"w": mx.nd.ones((4,))})
    data = bytearray(open(path, "rb").read())
    dims_offset = 24 + 12  # list header, then magic, storage type, ndim
    struct.pack_into("<q", data, dims_offset, 1 << 40)
    open(path, "wb").write(bytes(data))
    with pytest.raises(ParamsFormatError, match="truncated"):
        ParamsFileReader().read(path)


def test_sparse_files_are_left_to_mx_nd_load_and_averaged_correctly(tmp_path):
    dense = save(tmp_path / "dense.params", {"w": mx.nd.array([[1.0, 2.0], [3.0, 4.0]])})
    sparse = save(tmp_path / "sparse.params", {"w": mx.nd.array([[3.0, 0.0], [0.0, 0.0]]).tostype("row_sparse")})
    assert ParamsFileReader().read(sparse) is None
    averaged = average_checkpoint_files([dense, sparse], [0.5, 0.5])
    assert_allclose(averaged["w"].asnumpy(), [[2.0, 1.0], [1.5, 2.0]])


def test_streaming_average_equals_the_in_memory_formula_for_mixed_dtypes(tmp_path):
    rng = np.random.RandomState(1)
    checkpoints = [
        {"w": rng.randn(3, 4).astype(np.float32), "h": rng.randn(5).astype(np.float16), "n": np.array([i], np.int64)}
        for i in range(4)
    ]
    paths = [
        save(tmp_path / f"{i}.params", {k: mx.nd.array(v, dtype=v.dtype) for k, v in c.items()})
        for i, c in enumerate(checkpoints)
    ]
    weights = [0.1, 0.2, 0.3, 0.4]
    averaged = average_checkpoint_files(paths, weights)
    for key in ("w", "h"):
        expected = sum(w * c[key].astype(np.float64) for w, c in zip(weights, checkpoints))
        assert averaged[key].dtype == checkpoints[0][key].dtype
        assert_allclose(averaged[key].asnumpy(), expected, rtol=1e-3 if key == "h" else 1e-6, atol=1e-3)
    assert_array_equal(averaged["n"].asnumpy(), [0])  # integers: copied from the first (best) checkpoint


def test_unreadable_file_error_names_it(tmp_path):
    path = save(tmp_path / "a.params", {"w": mx.nd.ones(2)})
    open(path, "wb").write(b"\x12\x01" + b"\x00" * 6)
    with pytest.raises(CheckpointError, match=r"no usable checkpoint.*a\.params"):
        average_checkpoint_files([path], [1.0])


def test_cached_layout_reads_the_next_checkpoint_of_the_same_model(tmp_path):
    reader = ParamsFileReader()
    first = save(tmp_path / "a.params", {"weight": mx.nd.full((3, 2), 1.0), "bias": mx.nd.full((2,), 2.0)})
    second = save(tmp_path / "b.params", {"weight": mx.nd.full((3, 2), 5.0), "bias": mx.nd.full((2,), 6.0)})
    reader.read(first)
    read = reader.read(second)
    assert reader._layout.matches(memoryview(open(second, "rb").read()))
    assert_array_equal(read["weight"], np.full((3, 2), 5.0))
    assert_array_equal(read["bias"], np.full((2,), 6.0))


def test_same_size_but_other_structure_is_parsed_again(tmp_path):
    reader = ParamsFileReader()
    reader.read(save(tmp_path / "a.params", {"weight": mx.nd.ones((3, 2)), "bias": mx.nd.ones((2,))}))
    renamed = save(tmp_path / "b.params", {"weight": mx.nd.ones((3, 2)), "bia2": mx.nd.full((2,), 9.0)})
    reshaped = save(tmp_path / "c.params", {"weight": mx.nd.full((2, 3), 4.0), "bias": mx.nd.ones((2,))})
    assert sorted(reader.read(renamed)) == ["bia2", "weight"]
    assert reader.read(reshaped)["weight"].shape == (2, 3)
