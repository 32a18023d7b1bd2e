"""Reading MXNet ``.params`` files into NumPy views of one reused buffer.

``mx.nd.load`` allocates a fresh copy of the model for every file it reads;
averaging N checkpoints then pays N allocations and their page faults.
:class:`ParamsFileReader` reads each file into the same buffer and returns
views of it, so a streaming average costs little more than reading the files.
Written by hand because no library reads this format without allocating.

The layout (MXNet 1.x ``NDArray::Save``, dense arrays): ``uint64 0x112``,
``uint64 0``, ``uint64 count``; per array ``uint32 0xF993FAC9``,
``int32 storage type (0: dense)``, ``int32 ndim``, ``int64 dims[ndim]``,
``int32 device type``, ``int32 device id``, ``int32 dtype flag``, the raw
little-endian values; then ``uint64 count`` names, each ``uint64 length`` +
bytes. Other variants (sparse arrays, the V1 and V3 layouts, bfloat16) are
reported as unsupported so the caller can fall back to ``mx.nd.load``.
"""

import math
import mmap
import os
import struct
from typing import Dict, List, Optional, Tuple

import numpy as np

__all__ = ["ParamsFileReader", "ParamsFormatError"]

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


def _new_buffer(size: int) -> mmap.mmap:
    """Anonymous memory for file contents, on huge pages where the kernel allows it.

    Measured here (transparent huge pages in ``madvise`` mode): reading 8 files
    of 100 MB into a reused 4 KB-page buffer took 0.34 s, into a reused
    huge-page buffer 0.09 s.
    """
    buffer = mmap.mmap(-1, max(size, 1))
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            buffer.madvise(mmap.MADV_HUGEPAGE)
        except OSError:
            pass  # the kernel may refuse; 4 KB pages still work
    return buffer


class _Cursor:
    """Reads little-endian fields from a byte buffer, refusing to run past its end."""

    def __init__(self, data: memoryview) -> None:
        self.data = data
        self.position = 0

    def take(self, size: int) -> int:
        start = self.position
        if size < 0 or start + size > len(self.data):
            raise ParamsFormatError(f"truncated: needs {size} bytes at offset {start}, has {len(self.data) - start}")
        self.position += size
        return start

    def unpack(self, layout: struct.Struct) -> Tuple:
        return layout.unpack_from(self.data, self.take(layout.size))


class _Layout:
    """Where a parsed file's arrays lie, and its structure bytes (everything but the values).

    A later file of the same size whose structure bytes are identical (the
    next checkpoint of the same model) has its arrays at the same offsets, so
    it needs no parsing.
    """

    def __init__(self, data: memoryview, placed: List[Tuple[str, np.ndarray, int]]) -> None:
        self.size = len(data)
        self.entries = [(name, array.dtype, array.shape, start, array.size) for name, array, start in placed]
        self.structure: List[Tuple[int, int, bytes]] = []
        position = 0
        for _, array, start in sorted(placed, key=lambda entry: entry[2]):
            self.structure.append((position, start, bytes(data[position:start])))
            position = start + array.nbytes
        self.structure.append((position, self.size, bytes(data[position : self.size])))

    def matches(self, data: memoryview) -> bool:
        return len(data) == self.size and all(data[start:stop] == blob for start, stop, blob in self.structure)

    def arrays(self, data: memoryview) -> Dict[str, np.ndarray]:
        return {
            name: np.frombuffer(data, dtype=dtype, count=count, offset=start).reshape(shape)
            for name, dtype, shape, start, count in self.entries
        }


class ParamsFileReader:
    """Reads ``.params`` files; the arrays returned are views valid until the next read."""

    def __init__(self) -> None:
        self._buffer: mmap.mmap = _new_buffer(mmap.PAGESIZE)
        self._layout: Optional[_Layout] = None

    def read(self, path: str) -> Optional[Dict[str, np.ndarray]]:
        """Name -> NumPy view of every array in ``path``; ``None`` for layouts left to ``mx.nd.load``.

        Raises
        ------
        ParamsFormatError
            The file is truncated, of another format, or inconsistent.
        OSError
            The file cannot be read.
        """
        data = self._read_bytes(path)
        if self._layout is not None and self._layout.matches(data):
            return self._layout.arrays(data)
        try:
            arrays, self._layout = self._parse(data)
            return arrays
        except UnsupportedLayout:
            return None
        except (struct.error, UnicodeDecodeError) as error:
            raise ParamsFormatError(str(error)) from None

    def _read_bytes(self, path: str) -> memoryview:
        size = os.path.getsize(path)
        if len(self._buffer) < size:
            self._buffer = _new_buffer(size)  # views of the old one keep it alive until they go
        view = memoryview(self._buffer)[:size]
        with open(path, "rb", buffering=0) as file:
            done = 0
            while done < size:
                count = file.readinto(view[done:])
                if not count:
                    raise ParamsFormatError(f"file shrank while being read ({done} of {size} bytes)")
                done += count
        return view

    def _parse(self, data: memoryview) -> Tuple[Dict[str, np.ndarray], "_Layout"]:
        cursor = _Cursor(data)
        magic, _reserved, count = cursor.unpack(LIST_HEADER)
        if magic != LIST_MAGIC:
            raise ParamsFormatError(f"not an MXNet .params file (magic {magic:#x}, expected {LIST_MAGIC:#x})")
        placed = [self._parse_array(cursor) for _ in range(count)]
        arrays = [array for array, _ in placed]
        (name_count,) = cursor.unpack(COUNT)
        if name_count != count:
            raise UnsupportedLayout()  # unnamed arrays: let mx.nd.load report them
        names = [bytes(data[cursor.take(cursor.unpack(COUNT)[0]) : cursor.position]).decode() for _ in range(count)]
        if cursor.position != len(data):
            raise ParamsFormatError(f"{len(data) - cursor.position} unexpected bytes after the last name")
        layout = _Layout(data, [(name, array, start) for name, (array, start) in zip(names, placed)])
        return dict(zip(names, arrays)), layout

    def _parse_array(self, cursor: _Cursor) -> Tuple[np.ndarray, int]:
        magic, storage, ndim = cursor.unpack(ARRAY_HEADER)
        if magic != ARRAY_MAGIC_V2 or storage != DENSE_STORAGE or ndim <= 0:
            raise UnsupportedLayout()  # other versions, sparse arrays, empty and V3 scalar arrays
        shape = struct.unpack_from(f"<{ndim}q", cursor.data, cursor.take(8 * ndim))
        if min(shape) < 0:
            raise ParamsFormatError(f"negative dimension in shape {shape}")
        _device_type, _device_id, flag = cursor.unpack(ARRAY_FOOTER)
        if flag not in DTYPE_FLAGS:
            raise UnsupportedLayout()
        dtype = np.dtype(DTYPE_FLAGS[flag])
        count = math.prod(shape)
        start = cursor.take(count * dtype.itemsize)
        return np.frombuffer(cursor.data, dtype=dtype, count=count, offset=start).reshape(shape), start
