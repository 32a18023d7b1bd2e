"""Reading MXNet ``.params`` files in small chunks through one reused buffer.

``mx.nd.load`` allocates a fresh copy of the model for every file it reads;
averaging N checkpoints then pays N allocations, their page faults, and a
pass over memory that a running sum does not need. :class:`ParamsFile` reads
only the headers of a file (where each array lies, its dtype and shape, its
name) and then hands out each array's values in chunks of about 1 MiB, read
into the same buffer: a chunk is summed while it is still in the CPU cache,
and memory stays at the sum plus 1 MiB. Written by hand because no library
reads this format without allocating.

Measured here (8 files of 102.5 MB in the page cache, medians of 7 fresh
processes): ``mx.nd.load`` of each 0.23 s; the whole file into a reused
buffer, then ``axpy``, 0.30 s; chunks of 1 MiB with ``axpy`` 0.15 s.

The layout (MXNet 1.x ``NDArray::Save``, dense arrays): ``uint64 0x112``,
``uint64 0``, ``uint64 count``; per array ``uint32 0xF993FAC9``,
``int32 storage type (0: dense)``, ``int32 ndim``, ``int64 dims[ndim]``,
``int32 device type``, ``int32 device id``, ``int32 dtype flag``, the raw
little-endian values; then ``uint64 count`` names, each ``uint64 length`` +
bytes. bfloat16 values (dtype flag 12, which NumPy lacks) are handed out
widened to float32, exactly. Other variants (sparse arrays, the V3 layout of
NumPy-shape arrays, unnamed lists) are left to ``mx.nd.load``, but only after
:func:`check_layout` has walked their headers too: ``mx.nd.load`` trusts
declared sizes (a 100-byte file declaring a terabyte makes it try to
allocate one) and sparse indices (one out of range aborts the process when
the array is densified; those values are checked after loading, see
``checkpoints.load_params``). Layouts older than MXNet 1.x's V2 (the V1
array magic, or none) are refused.
"""

import io
import math
import os
import stat
import struct
from typing import Dict, Iterator, List, NamedTuple, Optional, Tuple

import mxnet as mx
import numpy as np

from .checks import CheckpointError
from .dtypes import BFLOAT16, bfloat16_to_float32

__all__ = [
    "BFLOAT16",
    "ArrayEntry",
    "ParamsFile",
    "ParamsFileReader",
    "ParamsFormatError",
    "check_is_file",
    "check_layout",
    "load_params",
    "open_params",
    "read_array_names",
]

CHUNK_BYTES = 1 << 20  # the size of one core's L2 cache here; 4 MiB measured the same
LIST_MAGIC = 0x112
ARRAY_MAGIC_V2 = 0xF993FAC9
ARRAY_MAGIC_V3 = 0xF993FACA  # NumPy-shape semantics: ndim 0 is a scalar, -1 unknown
DENSE_STORAGE = 0
AUX_ARRAYS = {DENSE_STORAGE: 0, 1: 1, 2: 2}  # storage type -> index arrays: row_sparse (rows), csr (indptr, indices)
BFLOAT16_FLAG = 12
DTYPE_FLAGS = {
    0: np.float32,
    1: np.float64,
    2: np.float16,
    3: np.uint8,
    4: np.int32,
    5: np.int8,
    6: np.int64,
    7: np.bool_,
    # 8-11 (int16, uint16, uint32, uint64) are known to this layout but not to MXNet 1.9's loader: left to
    # mx.nd.load, which refuses them, so such a file is skipped with its reason
    BFLOAT16_FLAG: BFLOAT16,
}


LIST_HEADER = struct.Struct("<QQQ")
COUNT = struct.Struct("<Q")
ARRAY_HEADER = struct.Struct("<Iii")  # magic, storage type, ndim
ARRAY_FOOTER = struct.Struct("<iii")  # device type, device id, dtype flag
UINT32 = struct.Struct("<I")
INT32 = struct.Struct("<i")
CONTEXT = struct.Struct("<ii")  # device type, device id


class ParamsFormatError(ValueError):
    """The bytes are not a consistent ``.params`` file (truncated, foreign, corrupt)."""


class UnsupportedLayout(Exception):
    """A valid file in a layout this reader leaves to ``mx.nd.load``."""


class ArrayEntry(NamedTuple):
    """Where one array's values lie in a ``.params`` file."""

    dtype: np.dtype
    shape: Tuple[int, ...]
    offset: int  # of the first value, in bytes from the start of the file
    size: int  # number of values


class _FileCursor:
    """Reads little-endian fields at increasing offsets of an open file, refusing to run past its end."""

    def __init__(self, descriptor: int, size: int) -> None:
        self.descriptor = descriptor
        self.size = size
        self.position = 0

    def skip(self, count: int) -> int:
        """Move past ``count`` bytes; return where they start."""
        start = self.position
        if count < 0 or start + count > self.size:
            raise ParamsFormatError(f"truncated: needs {count} bytes at offset {start}, has {self.size - start}")
        self.position += count
        return start

    def take(self, count: int) -> bytes:
        start = self.skip(count)
        data = os.pread(self.descriptor, count, start)
        if len(data) != count:
            raise ParamsFormatError(f"file shrank while being read (at offset {start})")
        return data

    def unpack(self, layout: struct.Struct) -> Tuple:
        return layout.unpack(self.take(layout.size))


def _read_entries(cursor: _FileCursor) -> Dict[str, ArrayEntry]:
    """Name -> entry of every array, in file order, from the headers alone."""
    magic, _reserved, count = cursor.unpack(LIST_HEADER)
    if magic != LIST_MAGIC:
        raise ParamsFormatError(f"not an MXNet .params file (magic {magic:#x}, expected {LIST_MAGIC:#x})")
    entries = [_read_entry(cursor) for _ in range(count)]
    (name_count,) = cursor.unpack(COUNT)
    if name_count != count:
        raise UnsupportedLayout()  # unnamed arrays: let mx.nd.load report them
    try:
        names = [cursor.take(cursor.unpack(COUNT)[0]).decode() for _ in range(count)]
    except UnicodeDecodeError as error:
        raise ParamsFormatError(f"an array name is not UTF-8 ({error})") from None
    if cursor.position != cursor.size:
        raise ParamsFormatError(f"{cursor.size - cursor.position} unexpected bytes after the last name")
    if len(set(names)) != len(names):
        raise ParamsFormatError("an array name appears twice")
    return dict(zip(names, entries))


def _read_entry(cursor: _FileCursor) -> ArrayEntry:
    magic, storage, ndim = cursor.unpack(ARRAY_HEADER)
    if magic != ARRAY_MAGIC_V2 or storage != DENSE_STORAGE or ndim <= 0:
        raise UnsupportedLayout()  # other versions, sparse arrays, empty and V3 scalar arrays
    shape = struct.unpack(f"<{ndim}q", cursor.take(8 * ndim))
    if min(shape) < 0:
        raise ParamsFormatError(f"negative dimension in shape {shape}")
    _device_type, _device_id, flag = cursor.unpack(ARRAY_FOOTER)
    if flag not in DTYPE_FLAGS:
        raise UnsupportedLayout()
    dtype = np.dtype(DTYPE_FLAGS[flag])
    size = math.prod(shape)
    return ArrayEntry(dtype, shape, cursor.skip(size * dtype.itemsize), size)


class ParamsFile:
    """An open ``.params`` file: its arrays' entries (read from the headers) and their values in chunks.

    Raises
    ------
    ParamsFormatError
        The file is truncated, of another format, or inconsistent (checked
        against the file's size before any value is read).
    UnsupportedLayout
        A valid file in a layout left to ``mx.nd.load``.
    OSError
        The file cannot be opened or read.
    """

    def __init__(self, path: str, buffer: np.ndarray) -> None:
        self.path = path
        self._buffer = buffer
        self._file = open_regular_file(path)
        try:
            self.entries = _read_entries(_FileCursor(self._file.fileno(), os.fstat(self._file.fileno()).st_size))
        except BaseException:
            self._file.close()
            raise

    def chunks(self, name: str) -> Iterator[Tuple[int, np.ndarray]]:
        """``(first index, values)`` pieces of array ``name``, flat, in order.

        Each piece is a view of the shared buffer, valid until the next one.
        bfloat16 arrays come as float32 pieces (exactly their values; NumPy
        has no bfloat16): a chunk's 2-byte values are read behind the 4 bytes
        each will take, then widened in the same buffer.
        """
        entry = self.entries[name]
        if entry.dtype == BFLOAT16:
            yield from self._bfloat16_chunks(entry)
            return
        per_chunk = max(1, len(self._buffer) // entry.dtype.itemsize)
        for start in range(0, entry.size, per_chunk):
            count = min(per_chunk, entry.size - start)
            view = self._buffer[: count * entry.dtype.itemsize]
            self._read_exactly(view, entry.offset + start * entry.dtype.itemsize)
            yield start, view.view(entry.dtype)

    def _bfloat16_chunks(self, entry: ArrayEntry) -> Iterator[Tuple[int, np.ndarray]]:
        per_chunk = max(1, len(self._buffer) // 6)  # 4 bytes of float32 and 2 read, per value
        widened = self._buffer[: 4 * per_chunk].view(np.float32)
        for start in range(0, entry.size, per_chunk):
            count = min(per_chunk, entry.size - start)
            raw = self._buffer[4 * per_chunk : 4 * per_chunk + 2 * count]
            self._read_exactly(raw, entry.offset + 2 * start)
            yield start, bfloat16_to_float32(raw, out=widened[:count])

    def _read_exactly(self, view: np.ndarray, offset: int) -> None:
        done = 0
        while done < len(view):
            count = os.preadv(self._file.fileno(), [view[done:]], offset + done)
            if count == 0:
                raise ParamsFormatError(f"file shrank while being read (at offset {offset + done})")
            done += count

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "ParamsFile":
        return self

    def __exit__(self, *exception: object) -> None:
        self.close()


def open_regular_file(path: str) -> io.FileIO:
    """``path`` opened for unbuffered binary reading; :class:`ParamsFormatError` if it is not a regular file.

    Opened without blocking, so a FIFO (or a device) under a checkpoint's
    name is refused instead of waiting forever for a writer.
    """
    descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    try:
        mode = os.fstat(descriptor).st_mode
    except BaseException:
        os.close(descriptor)
        raise
    if not stat.S_ISREG(mode):
        os.close(descriptor)
        raise ParamsFormatError("not a regular file")
    return io.FileIO(descriptor, "rb", closefd=True)


def check_layout(path: str) -> None:
    """Walk every header of ``path``, in any layout MXNet 1.x writes, and check it against the file's size.

    Sizes are checked before ``mx.nd.load`` sees the file: every array's
    values (and sparse indices) must lie within the file, the names must be
    UTF-8 and distinct, and nothing may follow the last name.

    Raises
    ------
    ParamsFormatError
        The file is truncated, inconsistent, of another format, or in a
        layout older than MXNet 1.0.
    OSError
        The file cannot be opened or read.
    """
    with open_regular_file(path) as file:
        cursor = _FileCursor(file.fileno(), os.fstat(file.fileno()).st_size)
        magic, _reserved, count = cursor.unpack(LIST_HEADER)
        if magic != LIST_MAGIC:
            raise ParamsFormatError(f"not an MXNet .params file (magic {magic:#x}, expected {LIST_MAGIC:#x})")
        if count * UINT32.size > cursor.size:
            raise ParamsFormatError(f"truncated: declares {count} arrays in {cursor.size} bytes")
        for index in range(count):
            _skip_any_array(cursor, index)
        (name_count,) = cursor.unpack(COUNT)
        if name_count not in (0, count):
            raise ParamsFormatError(f"{name_count} names for {count} arrays")
        _check_names(cursor, name_count)


def _check_names(cursor: _FileCursor, count: int) -> None:
    names = set()
    for _ in range(count):
        try:
            name = cursor.take(cursor.unpack(COUNT)[0]).decode()
        except UnicodeDecodeError as error:
            raise ParamsFormatError(f"an array name is not UTF-8 ({error})") from None
        if name in names:
            raise ParamsFormatError(f"array name {name!r} appears twice")
        names.add(name)
    if cursor.position != cursor.size:
        raise ParamsFormatError(f"{cursor.size - cursor.position} unexpected bytes after the last name")


def _skip_any_array(cursor: _FileCursor, index: int) -> None:
    """Move past array ``index`` (dense or sparse, V2 or V3), checking its declared sizes."""
    (magic,) = cursor.unpack(UINT32)
    if magic not in (ARRAY_MAGIC_V2, ARRAY_MAGIC_V3):
        raise ParamsFormatError(
            f"array {index} has header magic {magic:#x}: not an MXNet 1.x array (older layouts are refused)"
        )
    (storage,) = cursor.unpack(INT32)
    if storage not in AUX_ARRAYS:
        raise ParamsFormatError(f"array {index} has unknown storage type {storage}")
    storage_shape = _read_dims(cursor, index, magic) if AUX_ARRAYS[storage] else None
    shape = _read_dims(cursor, index, magic)
    if shape is None:
        return  # an empty NDArray: MXNet writes nothing more for it
    if AUX_ARRAYS[storage]:
        _check_storage_shape(storage, storage_shape, shape, index)
    cursor.skip(CONTEXT.size)
    itemsize = _itemsize(cursor.unpack(INT32)[0], index)
    aux_itemsizes, aux_shapes = [], []
    for _ in range(AUX_ARRAYS[storage]):
        aux_itemsizes.append(_itemsize(cursor.unpack(INT32)[0], index, integer=True))
        aux_shapes.append(_read_dims(cursor, index, magic) or ())
    cursor.skip(_value_count(storage, shape, aux_shapes, index) * itemsize)
    for aux_itemsize, dims in zip(aux_itemsizes, aux_shapes):
        cursor.skip(math.prod(dims) * aux_itemsize)


def _read_dims(cursor: _FileCursor, index: int, magic: int) -> Optional[Tuple[int, ...]]:
    """A shape as MXNet writes it (``int32 ndim``, ``int64`` dims); ``None`` for the unknown shape of an empty array.

    The unknown shape is ``ndim 0`` in the V2 layout, ``ndim -1`` in V3 (where ``ndim 0`` is a scalar).
    """
    (ndim,) = cursor.unpack(INT32)
    unknown_ndim = 0 if magic == ARRAY_MAGIC_V2 else -1
    if ndim < unknown_ndim:
        raise ParamsFormatError(f"array {index} has a shape with {ndim} dimensions")
    if ndim == unknown_ndim:
        return None
    dims = struct.unpack(f"<{ndim}q", cursor.take(8 * ndim))
    if ndim and min(dims) < 0:
        raise ParamsFormatError(f"array {index} has a negative dimension in shape {dims}")
    return dims


def _check_storage_shape(
    storage: int, storage_shape: Optional[Tuple[int, ...]], shape: Tuple[int, ...], index: int
) -> None:
    """A sparse array's storage shape is ``(rows, *shape[1:])`` (row_sparse) or ``(nonzeros,)`` (csr).

    Its first dimension is not checked: MXNet may write it before the array
    is computed (0 or the real count, by chance), and its loader takes that
    count from the index arrays instead; the other dimensions it does use.
    """
    expected_tail = tuple(shape[1:]) if storage == 1 else ()
    if storage_shape is None or tuple(storage_shape[1:]) != expected_tail:
        raise ParamsFormatError(f"sparse array {index} has storage shape {storage_shape} for shape {shape}")


def _itemsize(flag: int, index: int, integer: bool = False) -> int:
    if flag not in DTYPE_FLAGS or (integer and np.dtype(DTYPE_FLAGS[flag]).kind not in "iu"):
        kind = "sparse index dtype" if integer else "dtype"
        raise ParamsFormatError(f"array {index} has unknown {kind} flag {flag}")
    return np.dtype(DTYPE_FLAGS[flag]).itemsize


def _value_count(storage: int, shape: Tuple[int, ...], aux_shapes: List[Tuple[int, ...]], index: int) -> int:
    """The number of values MXNet reads: the whole shape (dense) or what the index arrays' shapes say (sparse)."""
    if storage == DENSE_STORAGE:
        return math.prod(shape)
    if any(len(dims) != 1 for dims in aux_shapes):
        raise ParamsFormatError(f"sparse array {index} has index arrays of shapes {aux_shapes}, expected 1-D")
    if not shape:
        raise ParamsFormatError(f"sparse array {index} has a scalar shape")
    if storage == 1:  # row_sparse: values of the rows listed in the index array
        (rows,) = aux_shapes[0]
        if rows > shape[0]:
            raise ParamsFormatError(f"row_sparse array {index} of shape {shape} lists {rows} rows")
        return rows * math.prod(shape[1:])
    (pointers,), (nonzeros,) = aux_shapes  # csr: indptr, indices
    if len(shape) != 2 or pointers != shape[0] + 1 or nonzeros > shape[0] * shape[1]:
        raise ParamsFormatError(f"csr array {index} of shape {shape} has indptr of {pointers} and {nonzeros} indices")
    return nonzeros


class ParamsFileReader:
    """Opens ``.params`` files that share one chunk buffer (``chunk_bytes``, default 1 MiB)."""

    def __init__(self, chunk_bytes: int = CHUNK_BYTES) -> None:
        self._buffer = np.empty(max(chunk_bytes, 8), dtype=np.uint8)

    def open(self, path: str) -> Optional[ParamsFile]:
        """The open file, or ``None`` for a layout left to ``mx.nd.load`` whose sizes :func:`check_layout` checked.

        Raises :class:`ParamsFormatError` or ``OSError`` (see :class:`ParamsFile`).
        """
        try:
            return ParamsFile(path, self._buffer)
        except UnsupportedLayout:
            check_layout(path)
            return None


def check_is_file(path: str) -> None:
    """:class:`~modavg_plugin.CheckpointError` naming ``path`` unless it is an existing regular file (a FIFO would block a reader)."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint file {path} does not exist")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file {path} is not a regular file")


def open_params(reader: ParamsFileReader, path: str) -> Optional[ParamsFile]:
    """``path`` opened for chunked reading (headers checked), or ``None`` for layouts left to ``mx.nd.load``."""
    check_is_file(path)
    try:
        return reader.open(path)
    except ParamsFormatError as error:
        raise CheckpointError(f"checkpoint file {path} is not a readable .params file ({error})") from None
    except OSError as error:
        raise CheckpointError(f"checkpoint file {path} cannot be read ({error})") from None


def read_array_names(path: str) -> List[str]:
    """The names of the arrays in a ``.params`` file, from its headers (no values are read)."""
    params_file = open_params(ParamsFileReader(chunk_bytes=0), path)
    if params_file is None:
        return list(load_params(path))
    with params_file:
        return list(params_file.entries)


def load_params(path: str) -> Dict[str, mx.nd.NDArray]:
    """Load a ``.params`` file into CPU arrays; :class:`~modavg_plugin.CheckpointError` naming it if unreadable.

    Sparse arrays are checked before anything densifies them: an index out
    of range would make MXNet write out of bounds (it aborts the process).
    """
    check_is_file(path)
    try:
        loaded = mx.nd.load(path)
    except Exception as error:  # MXNetError, or a bare Exception ("unknown storage type: -1" for an empty entry)
        reason = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"checkpoint file {path} is not a readable .params file ({reason})") from None
    if not isinstance(loaded, dict):
        raise CheckpointError(f"checkpoint file {path} holds unnamed arrays; expected name -> array")
    for name, array in loaded.items():
        reason = _sparse_index_problem(array)
        if reason is not None:
            raise CheckpointError(f"checkpoint file {path} is not a readable .params file (array {name!r}: {reason})")
    return loaded


def _sparse_index_problem(array: mx.nd.NDArray) -> Optional[str]:
    """Why the index arrays of a sparse ``array`` are unsafe to use, or ``None`` (also for dense arrays)."""
    if array.stype == "row_sparse":
        rows = array.indices.asnumpy()
        if array.data.shape != (len(rows),) + tuple(array.shape[1:]):
            return f"row_sparse values of shape {array.data.shape} for {len(rows)} rows of shape {array.shape}"
        if len(rows) and (rows[0] < 0 or rows[-1] >= array.shape[0] or np.any(np.diff(rows) <= 0)):
            return f"row indices not increasing within [0, {array.shape[0]})"
    elif array.stype == "csr":
        pointers, columns = array.indptr.asnumpy(), array.indices.asnumpy()
        consistent = len(pointers) == array.shape[0] + 1 and pointers[0] == 0 and pointers[-1] == len(columns)
        if not consistent or np.any(np.diff(pointers) < 0) or array.data.shape != (len(columns),):
            return "csr indptr inconsistent with its indices"
        if len(columns) and (columns.min() < 0 or columns.max() >= array.shape[1]):
            return f"csr column indices outside [0, {array.shape[1]})"
    return None
