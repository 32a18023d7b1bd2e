"""The chunked .params reader agrees with mx.nd.load and refuses broken files before reading values."""

import os
import struct
import subprocess
import sys
import threading

import mxnet as mx
import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from modavg_plugin.checks import CheckpointError
from modavg_plugin.params_files import ParamsFileReader, ParamsFormatError, load_params, read_array_names
from modavg_plugin.weighted_sum import WeightedSum, average_checkpoint_files

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


# other formats, special files, and the layouts left to mx.nd.load


def list_header(count: int) -> bytes:
    return struct.pack("<QQQ", 0x112, 0, count)


def shape_bytes(*dims: int) -> bytes:
    return struct.pack("<i", len(dims)) + struct.pack(f"<{len(dims)}q", *dims)


def names_bytes(*names: bytes) -> bytes:
    return struct.pack("<Q", len(names)) + b"".join(struct.pack("<Q", len(name)) + name for name in names)


def row_sparse_file(rows, shape=(4, 2), storage_shape=(0, 2)) -> bytes:
    """A one-array row_sparse .params file as MXNet writes it: row ``rows`` hold 1.0."""
    values = [1.0] * (len(rows) * shape[1])
    return (
        list_header(1)
        + struct.pack("<Ii", 0xF993FAC9, 1)  # V2 magic, row_sparse
        + shape_bytes(*storage_shape)
        + shape_bytes(*shape)
        + struct.pack("<iii", 1, 0, 0)  # cpu(0), float32
        + struct.pack("<i", 6)  # int64 row indices
        + shape_bytes(len(rows))
        + struct.pack(f"<{len(values)}f", *values)
        + struct.pack(f"<{len(rows)}q", *rows)
        + names_bytes(b"w")
    )


def write(path, data: bytes) -> str:
    open(path, "wb").write(data)
    return str(path)


def test_row_sparse_bytes_built_here_are_what_mxnet_writes(tmp_path):
    """The builder above is checked against MXNet, so the hostile variants below differ in one field only."""
    dense = np.zeros((4, 2), np.float32)
    dense[[0, 2]] = 1.0
    saved = open(save(tmp_path / "mx.params", {"w": mx.nd.array(dense).tostype("row_sparse")}), "rb").read()
    # MXNet writes the storage shape before the conversion has set it: (0, 2) or (2, 2) by chance
    storage_shape = struct.unpack_from("<2q", saved, 24 + 12)
    assert storage_shape in {(0, 2), (2, 2)}
    assert saved == row_sparse_file([0, 2], storage_shape=storage_shape)


def test_the_first_dimension_of_a_sparse_storage_shape_is_not_trusted_nor_needed(tmp_path):
    path = write(tmp_path / "w.params", row_sparse_file([1], storage_shape=(1 << 40, 2)))
    assert ParamsFileReader().open(path) is None
    assert_allclose(average_checkpoint_files([path], [1.0])["w"].asnumpy(), [[0, 0], [1, 1], [0, 0], [0, 0]])


FOREIGN_FILES = {
    "empty": b"",
    "JSON": b'{"params_path": "epoch-0001.params", "epoch_no": 1, "score": 0.5}',
    "random bytes": np.random.RandomState(0).bytes(4096),
    "a list header only": list_header(3),
    "NumPy .npy": b"\x93NUMPY\x01\x00v\x00{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }" + b" " * 60,
}


@pytest.mark.parametrize("kind", sorted(FOREIGN_FILES))
def test_files_of_other_formats_are_refused_and_skipped_when_averaging(tmp_path, caplog, kind):
    foreign = write(tmp_path / "foreign.params", FOREIGN_FILES[kind])
    with pytest.raises(ParamsFormatError, match="truncated|not an MXNet .params file"):
        ParamsFileReader().open(foreign)
    good = save(tmp_path / "good.params", {"w": mx.nd.array([2.0, 4.0])})
    averaged = average_checkpoint_files([foreign, good], [0.9, 0.1])
    assert_allclose(averaged["w"].asnumpy(), [2.0, 4.0])  # the foreign file's weight is dropped
    assert f"skipping checkpoint file {foreign} is not a readable .params file" in caplog.text


def test_a_fifo_named_params_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "w.params"
    os.mkfifo(fifo)
    # the reader opens without blocking: a regression would wait forever for a writer, so check in a thread
    outcome = {}

    def open_it():
        try:
            ParamsFileReader().open(str(fifo))
        except ParamsFormatError as error:
            outcome["error"] = str(error)

    opener = threading.Thread(target=open_it, daemon=True)
    opener.start()
    opener.join(timeout=60)
    assert not opener.is_alive(), "opening a FIFO blocked"
    assert outcome == {"error": "not a regular file"}
    with pytest.raises(CheckpointError, match=r"w\.params is not a regular file"):
        read_array_names(str(fifo))


HOSTILE_LAYOUTS = {
    # declared sizes MXNet would trust: more rows than the shape has, rows of 2**40 values, a terabyte of bfloat16
    "sparse storage shape": (row_sparse_file([0], storage_shape=(0, 1 << 40)), r"storage shape \(0, 1099511627776\)"),
    "sparse rows beyond the shape": (row_sparse_file(list(range(5))), "lists 5 rows"),
    "bfloat16 terabyte": (
        list_header(1) + struct.pack("<Iii", 0xF993FAC9, 0, 2) + struct.pack("<2q", 1 << 39, 1)
        + struct.pack("<iii", 1, 0, 12) + b"\0" * 16 + names_bytes(b"w"),
        "truncated: needs 1099511627776 bytes",
    ),
    # MXNet reads a pre-1.0 header as ndim = magic, then ndim uint32 dims: 2**31 of them here
    "legacy layout": (list_header(1) + struct.pack("<I", 1 << 31) + b"\0" * 64, "header magic 0x80000000"),
    "unknown storage type": (list_header(1) + struct.pack("<Iii", 0xF993FAC9, 7, 1) + b"\0" * 32, "storage type 7"),
    "unknown dtype": (
        list_header(1) + struct.pack("<Iii", 0xF993FAC9, 0, 1) + struct.pack("<q", 2) + struct.pack("<iii", 1, 0, 99)
        + b"\0" * 8 + names_bytes(b"w"),
        "unknown dtype flag 99",
    ),
    "float sparse indices": (
        row_sparse_file([0]).replace(struct.pack("<i", 6) + shape_bytes(1), struct.pack("<i", 1) + shape_bytes(1)),
        "unknown sparse index dtype flag 1",
    ),
    "names for some arrays": (row_sparse_file([0])[:-17] + names_bytes(b"w", b"v"), "2 names for 1 arrays"),
    "trailing bytes": (row_sparse_file([0]) + b"\0", "1 unexpected bytes after the last name"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(HOSTILE_LAYOUTS))
def test_layouts_left_to_mx_nd_load_are_size_checked_first(tmp_path, case, monkeypatch):
    content, message = HOSTILE_LAYOUTS[case]
    path = write(tmp_path / "hostile.params", content)
    monkeypatch.setattr(mx.nd, "load", lambda *args: pytest.fail("mx.nd.load saw a file whose sizes are wrong"))
    with pytest.raises(ParamsFormatError, match=message):
        ParamsFileReader().open(path)
    with pytest.raises(CheckpointError, match=r"hostile\.params is not a readable \.params file"):
        read_array_names(path)


@pytest.mark.parametrize(
    "rows, reason",
    [([1000000], "out of range"), ([-1], "negative"), ([2, 1], "unsorted"), ([1, 1], "repeated")],
)
def test_sparse_indices_out_of_range_are_refused_before_mxnet_densifies_them(tmp_path, rows, reason):
    path = write(tmp_path / "bad-index.params", row_sparse_file(rows))
    assert ParamsFileReader().open(path) is None  # sizes are consistent: left to mx.nd.load
    message = (
        r"bad-index\.params is not a readable .params file \(array 'w': row indices not increasing within \[0, 4\)"
    )
    with pytest.raises(CheckpointError, match=message):
        load_params(path)


def test_averaging_a_sparse_file_with_an_index_out_of_range_skips_it_and_does_not_abort(tmp_path):
    """MXNet aborts the whole process (SIGABRT) when it densifies this file: run the average in a child process."""
    bad = write(tmp_path / "bad-index.params", row_sparse_file([1000000]))
    good = save(tmp_path / "good.params", {"w": mx.nd.ones((4, 2))})
    code = (
        "import logging, sys\n"
        "logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format='%(message)s')\n"
        "from modavg_plugin.weighted_sum import average_checkpoint_files\n"
        f"print(average_checkpoint_files([{bad!r}, {good!r}], [0.5, 0.5])['w'].asnumpy().tolist())\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    warning, averaged = result.stdout.strip().splitlines()[-2:]
    assert warning.startswith(f"skipping checkpoint file {bad} is not a readable .params file (array 'w': row indices")
    assert averaged == str([[1.0, 1.0]] * 4)


def test_csr_files_are_averaged_and_inconsistent_csr_indices_refused(tmp_path):
    dense = np.array([[3.0, 0.0], [0.0, 5.0]], np.float32)
    path = save(tmp_path / "csr.params", {"w": mx.nd.array(dense).tostype("csr")})
    assert_allclose(average_checkpoint_files([path], [1.0])["w"].asnumpy(), dense)
    data = bytearray(open(path, "rb").read())
    column_indices_offset = len(data) - 17 - 16  # the last aux array (2 int64 column indices) precedes the names
    struct.pack_into("<q", data, column_indices_offset + 8, 7)  # the second column index: 7 of 2 columns
    broken = write(tmp_path / "bad-csr.params", bytes(data))
    with pytest.raises(CheckpointError, match=r"array 'w': csr column indices outside \[0, 2\)"):
        load_params(broken)


def test_numpy_shape_files_are_skipped_with_mxnets_reason(tmp_path, caplog):
    path = str(tmp_path / "np.params")
    mx.npx.set_np()
    try:
        mx.npx.save(path, {"w": mx.np.ones((2,)), "s": mx.np.array(1.0)})
    finally:
        mx.npx.reset_np()
    assert ParamsFileReader().open(path) is None  # the V3 layout's sizes check out; mx.nd.load then refuses it
    good = save(tmp_path / "good.params", {"w": mx.nd.array([2.0, 4.0]), "s": mx.nd.array([1.0])})
    averaged = average_checkpoint_files([path, good], [0.5, 0.5])
    assert_allclose(averaged["w"].asnumpy(), [2.0, 4.0])
    assert f"skipping checkpoint file {path} is not a readable .params file" in caplog.text
    assert "np shape semantics" in caplog.text


# non-finite values


def test_a_checkpoint_holding_nan_or_inf_is_skipped_and_the_rest_renormalised(tmp_path, caplog):
    good = [save(tmp_path / f"good{index}.params", {"w": mx.nd.array([index, 10.0]), "n": mx.nd.array([index], dtype="int32")})
            for index in (1, 3)]  # fmt: skip
    nan = save(tmp_path / "nan.params", {"w": mx.nd.array([np.nan, 1.0]), "n": mx.nd.array([9], dtype="int32")})
    inf = save(tmp_path / "inf.params", {"w": mx.nd.array([1.0, -np.inf]), "n": mx.nd.array([9], dtype="int32")})
    seen = []
    averaged = average_checkpoint_files([nan, good[0], inf, good[1]], [0.4, 0.1, 0.4, 0.1], progress=seen.append)
    assert_allclose(averaged["w"].asnumpy(), [2.0, 10.0])
    assert averaged["n"].asnumpy().tolist() == [1]  # integers from the first usable checkpoint
    assert seen == [nan, good[0], inf, good[1]]
    assert f"skipping checkpoint file {nan}: it holds NaN or infinite values" in caplog.text
    assert f"skipping checkpoint file {inf}: it holds NaN or infinite values" in caplog.text


def test_only_non_finite_checkpoints_is_an_error_naming_them(tmp_path):
    nan = save(tmp_path / "nan.params", {"w": mx.nd.array([np.nan])})
    inf = save(tmp_path / "inf.params", {"w": mx.nd.array([np.inf])})
    with pytest.raises(CheckpointError, match=rf"NaN or infinite values in {nan}, {inf}"):
        average_checkpoint_files([nan, inf], [0.5, 0.5])
