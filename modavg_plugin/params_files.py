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
bytes. Other variants (sparse arrays, the V1 and V3 layouts, bfloat16) are
reported as unsupported so the caller can fall back to ``mx.nd.load``.
"""

import math
import os
import struct
from typing import Dict, Iterator, NamedTuple, Optional, Tuple

import numpy as np

__all__ = ["ArrayEntry", "ParamsFile", "ParamsFileReader", "ParamsFormatError"]

CHUNK_BYTES = 1 << 20  # the size of one core's L2 cache here; 4 MiB measured the same
LIST_MAGIC = 0x112
ARRAY_MAGIC_V2 = 0xF993FAC9
DENSE_STORAGE = 0
DTYPE_FLAGS = {
    0: np.float32,
    1: np.float64,
    2: np.float16,
    3: np.uint8,
    4: np.int32,
    5: np.int8,
    6: np.int64,
    7: np.bool_,
    8: np.int16,
    9: np.uint16,
    10: np.uint32,
    11: np.uint64,
}


LIST_HEADER = struct.Struct("<QQQ")
COUNT = struct.Struct("<Q")
ARRAY_HEADER = struct.Struct("<Iii")  # magic, storage type, ndim
ARRAY_FOOTER = struct.Struct("<iii")  # device type, device id, dtype flag


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
        self._file = open(path, "rb", buffering=0)
        try:
            self.entries = _read_entries(_FileCursor(self._file.fileno(), os.fstat(self._file.fileno()).st_size))
        except BaseException:
            self._file.close()
            raise

    def chunks(self, name: str) -> Iterator[Tuple[int, np.ndarray]]:
        """``(first index, values)`` pieces of array ``name``, flat, in order.

        Each piece is a view of the shared buffer, valid until the next one.
        """
        entry = self.entries[name]
        per_chunk = max(1, len(self._buffer) // entry.dtype.itemsize)
        for start in range(0, entry.size, per_chunk):
            count = min(per_chunk, entry.size - start)
            view = self._buffer[: count * entry.dtype.itemsize]
            self._read_exactly(view, entry.offset + start * entry.dtype.itemsize)
            yield start, view.view(entry.dtype)

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


class ParamsFileReader:
    """Opens ``.params`` files that share one chunk buffer (``chunk_bytes``, default 1 MiB)."""

    def __init__(self, chunk_bytes: int = CHUNK_BYTES) -> None:
        self._buffer = np.empty(max(chunk_bytes, 8), dtype=np.uint8)

    def open(self, path: str) -> Optional[ParamsFile]:
        """The open file, or ``None`` for layouts left to ``mx.nd.load`` (see :class:`ParamsFile`)."""
        try:
            return ParamsFile(path, self._buffer)
        except UnsupportedLayout:
            return None
