"""The chunked .params reader agrees with mx.nd.load and refuses broken files before reading values."""

import os
import struct

import mxnet as mx
import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from modavg_plugin.checkpoints import CheckpointError, WeightedSum, average_checkpoint_files, read_array_names
from modavg_plugin.params_files import ParamsFileReader, ParamsFormatError

DTYPES = ["float32", "float16", "float64", "int32", "int64", "uint8", "int8"]


def save(path, arrays) -> str:
    mx.nd.save(str(path), arrays)
    return str(path)


def read_whole(reader: ParamsFileReader, path: str) -> dict:
    """Every array of ``path``, assembled from the reader's chunks."""
    with reader.open(path) as params_file:
        arrays = {}
        for name, entry in params_file.entries.items():
            pieces = [(start, values.copy()) for start, values in params_file.chunks(name)]
            assert [start for start, _ in pieces] == sorted(start for start, _ in pieces), name
            flat = np.concatenate([values for _, values in pieces]) if pieces else np.empty(0, entry.dtype)
            arrays[name] = flat.reshape(entry.shape)
        return arrays


def mixed_arrays() -> dict:
    rng = np.random.RandomState(0)
    shapes = [(1,), (2, 3), (2, 3, 4, 5), (7,), (3, 1, 2)]
    return {
        f"param-{dtype}-{index}-é": mx.nd.array(rng.randn(*shape) * 50, dtype=dtype)
        for index, (dtype, shape) in enumerate(zip(DTYPES * 2, shapes * 3))
    }


@pytest.mark.parametrize("chunk_bytes", [8, 24, 1 << 20])
def test_reader_matches_mx_nd_load(tmp_path, chunk_bytes):
    path = save(tmp_path / "a.params", mixed_arrays())
    expected = mx.nd.load(path)
    read = read_whole(ParamsFileReader(chunk_bytes=chunk_bytes), path)
    assert list(read) == list(expected)
    for name, array in expected.items():
        assert read[name].dtype == array.dtype and read[name].shape == array.shape, name
        assert_array_equal(read[name], array.asnumpy(), err_msg=name)


def test_chunks_are_views_of_one_small_buffer(tmp_path):
    reader = ParamsFileReader(chunk_bytes=64)
    path = save(tmp_path / "a.params", {"w": mx.nd.arange(100)})
    with reader.open(path) as params_file:
        pieces = [(start, values.size, values.base is not None) for start, values in params_file.chunks("w")]
    assert pieces == [(0, 16, True), (16, 16, True), (32, 16, True), (48, 16, True), (64, 16, True),
                      (80, 16, True), (96, 4, True)]  # fmt: skip


def test_array_names_come_from_the_headers(tmp_path):
    path = save(tmp_path / "a.params", {"arg:fc_weight": mx.nd.ones((2, 2)), "aux:bn_moving_mean": mx.nd.ones(2)})
    assert read_array_names(path) == list(mx.nd.load(path))


@pytest.mark.parametrize("keep", [0, 7, 16, 30, 60, -5, -1])
def test_truncated_files_are_refused(tmp_path, keep):
    path = save(tmp_path / "a.params", {"weight": mx.nd.ones((4, 4)), "bias": mx.nd.ones(4)})
    data = open(path, "rb").read()
    open(path, "wb").write(data[:keep] if keep >= 0 else data[: len(data) + keep])
    with pytest.raises(ParamsFormatError):
        ParamsFileReader().open(path)


def test_foreign_file_is_refused(tmp_path):
    (tmp_path / "text.params").write_text("these are not the weights you are looking for" * 10)
    with pytest.raises(ParamsFormatError, match="not an MXNet .params file"):
        ParamsFileReader().open(str(tmp_path / "text.params"))


def test_absurd_declared_size_is_refused_without_allocating_it(tmp_path):
    path = save(tmp_path / "a.params", {"w": mx.nd.ones((4,))})
    data = bytearray(open(path, "rb").read())
    dims_offset = 24 + 12  # list header, then magic, storage type, ndim
    struct.pack_into("<q", data, dims_offset, 1 << 40)
    open(path, "wb").write(bytes(data))
    with pytest.raises(ParamsFormatError, match="truncated"):
        ParamsFileReader().open(path)


def test_sparse_files_are_left_to_mx_nd_load_and_averaged_correctly(tmp_path):
    dense = save(tmp_path / "dense.params", {"w": mx.nd.array([[1.0, 2.0], [3.0, 4.0]])})
    sparse = save(tmp_path / "sparse.params", {"w": mx.nd.array([[3.0, 0.0], [0.0, 0.0]]).tostype("row_sparse")})
    assert ParamsFileReader().open(sparse) is None
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


def test_a_file_that_shrinks_while_averaged_is_an_error_not_a_partial_sum(tmp_path, monkeypatch):
    first = save(tmp_path / "a.params", {"w": mx.nd.ones((1000,))})
    second = save(tmp_path / "b.params", {"w": mx.nd.ones((1000,))})
    add_file = WeightedSum.add_file

    def truncate_then_add(self, params_file, weight):
        if params_file.path == second:  # after its headers were checked, before its values are read
            os.truncate(second, 200)
        add_file(self, params_file, weight)

    monkeypatch.setattr(WeightedSum, "add_file", truncate_then_add)
    with pytest.raises(CheckpointError, match=r"b\.params changed while being averaged \(file shrank"):
        average_checkpoint_files([first, second], [0.5, 0.5])


def test_progress_is_reported_for_every_file_read_or_skipped(tmp_path, caplog):
    good = [save(tmp_path / f"{index}.params", {"w": mx.nd.full((3,), index)}) for index in (1, 3)]
    broken = str(tmp_path / "broken.params")
    open(broken, "wb").write(b"\x12\x01" + b"\x00" * 6)
    seen = []
    averaged = average_checkpoint_files([good[0], broken, good[1]], [1.0, 1.0, 1.0], progress=seen.append)
    assert seen == [good[0], broken, good[1]]
    assert_allclose(averaged["w"].asnumpy(), [2.0, 2.0, 2.0])  # the broken file's weight is dropped
    assert "broken.params" in caplog.text
