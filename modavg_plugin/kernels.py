"""``target = keep * target + weight * values`` in one pass over memory, compiled by Numba.

One fused loop reads each array once and writes the target once: the three
memory streams of ``s += p``, the floor any update can reach (BLAS needs a
``scal`` pass and an ``axpy`` pass; NumPy needs a scratch array). Arithmetic
is in float64, rounded once when stored, so a float32 average loses half a
unit in the last place per update, not three. ``keep == 0`` writes
``weight * values`` without reading the target (a NaN there does not stay).

:func:`blend_at_addresses` runs the loop over many arrays, given by address,
in one call: the per-array cost is a few nanoseconds, not the microseconds of
a Python-level call per array. The compiled code is cached on disk by Numba,
next to this file or in ``NUMBA_CACHE_DIR`` (2.5 s to compile at the first
import on a machine here; 0.7 s, Numba's own import included, after).
Single-threaded and without the GIL, so it runs beside MXNet's threads.

:data:`ENGINE_KERNELS` are the same loop as C functions MXNet's engine can
call itself (``void f(void *run_context, void *arguments)``), so an update
pushed into the engine runs no Python and needs no GIL; ``arguments`` points
to :data:`ENGINE_FIELDS` int64 fields, see :func:`engine_arguments`.
"""

import functools

import numba
import numpy as np
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

__all__ = [
    "DONE_FIELD",
    "ENGINE_FIELDS",
    "ENGINE_KERNELS",
    "KEEP_FIELD",
    "KERNEL_DTYPES",
    "blend",
    "blend_at_addresses",
    "compile_kernels",
    "engine_arguments",
]

KERNEL_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
"""Target and value dtypes the compiled loop takes; others go through NumPy (:func:`blend`)."""


@intrinsic
def _pointer(typing_context, address):
    """An integer address as a pointer, for ``numba.carray`` (Numba's documented low-level extension API)."""

    def generate(context, builder, signature, arguments):
        return builder.inttoptr(arguments[0], cgutils.voidptr_t)

    return types.voidptr(address), generate


@numba.njit(nogil=True, cache=True)
def _blend(target, values, keep, weight):
    if keep == 0.0:
        for index in range(target.shape[0]):
            target[index] = weight * values[index]
    else:
        for index in range(target.shape[0]):
            target[index] = keep * target[index] + weight * values[index]


@numba.njit(nogil=True, cache=True)
def _blend_at_addresses(flat, addresses, offsets, sizes, keep, weight):
    for array in range(addresses.shape[0]):
        values = numba.carray(_pointer(addresses[array]), (sizes[array],), flat.dtype)
        _blend(flat[offsets[array] : offsets[array] + sizes[array]], values, keep, weight)


ENGINE_FIELDS = 8
"""int64 fields an engine kernel reads: flat address, flat size, addresses, offsets and sizes (each the address
of an int64 array), array count, ``keep`` (a float64's bits), and a counter the kernel adds 1 to when done."""
KEEP_FIELD = 6
DONE_FIELD = 7


@numba.njit(nogil=True, cache=True)
def _engine_blend(flat, fields, keep):
    count = fields[5]
    addresses = numba.carray(_pointer(fields[2]), (count,), np.int64)
    offsets = numba.carray(_pointer(fields[3]), (count,), np.int64)
    sizes = numba.carray(_pointer(fields[4]), (count,), np.int64)
    _blend_at_addresses(flat, addresses, offsets, sizes, keep, 1.0 - keep)
    fields[DONE_FIELD] += 1


_ENGINE_SIGNATURE = types.void(types.voidptr, types.voidptr)


@numba.cfunc(_ENGINE_SIGNATURE, nogil=True, cache=True)
def _engine_blend_float32(run_context, arguments):
    fields = numba.carray(arguments, (ENGINE_FIELDS,), np.int64)
    keep = numba.carray(arguments, (ENGINE_FIELDS,), np.float64)[KEEP_FIELD]
    _engine_blend(numba.carray(_pointer(fields[0]), (fields[1],), np.float32), fields, keep)


@numba.cfunc(_ENGINE_SIGNATURE, nogil=True, cache=True)
def _engine_blend_float64(run_context, arguments):
    fields = numba.carray(arguments, (ENGINE_FIELDS,), np.int64)
    keep = numba.carray(arguments, (ENGINE_FIELDS,), np.float64)[KEEP_FIELD]
    _engine_blend(numba.carray(_pointer(fields[0]), (fields[1],), np.float64), fields, keep)


ENGINE_KERNELS = {
    np.dtype(np.float32): _engine_blend_float32.address,
    np.dtype(np.float64): _engine_blend_float64.address,
}
"""By the flat buffer's dtype: the address of a C function blending one group, for MXNet's engine."""


def engine_arguments(
    fields: np.ndarray, flat_address: int, flat_size: int, addresses: np.ndarray, offsets: np.ndarray, sizes: np.ndarray
) -> None:
    """Fill ``fields`` (int64, :data:`ENGINE_FIELDS` long) for an engine kernel; keep the arrays alive meanwhile.

    ``keep`` is set per update with ``fields.view(np.float64)[KEEP_FIELD] = keep``.
    """
    count = addresses.size
    if not (offsets.size == sizes.size == count and addresses.dtype == offsets.dtype == sizes.dtype == np.int64):
        raise ValueError("addresses, offsets and sizes must be int64 arrays of one length")
    fields[:6] = [flat_address, flat_size, addresses.ctypes.data, offsets.ctypes.data, sizes.ctypes.data, count]


def blend(target: np.ndarray, values: np.ndarray, keep: float, weight: float) -> None:
    """``target = keep * target + weight * values`` in place, on flat arrays of the same size.

    Targets and values of :data:`KERNEL_DTYPES` take the compiled loop;
    others (float16 values) are computed by NumPy in blocks.
    """
    if target.shape != values.shape or target.ndim != 1:
        raise ValueError(f"blend needs flat arrays of one size, not {target.shape} and {values.shape}")
    if target.dtype in KERNEL_DTYPES and values.dtype in KERNEL_DTYPES and target.flags.c_contiguous:
        _blend(target, np.ascontiguousarray(values), float(keep), float(weight))
        return
    _blend_with_numpy(target, values, keep, weight)


def _blend_with_numpy(target: np.ndarray, values: np.ndarray, keep: float, weight: float) -> None:
    block = 1 << 15  # two float64 scratch blocks of 256 KiB: they stay in the cache
    scratch = np.empty((2, min(block, max(values.size, 1))), dtype=np.float64)
    for begin in range(0, values.size, block):
        stop = min(begin + block, values.size)
        part, scaled, kept = target[begin:stop], scratch[0, : stop - begin], scratch[1, : stop - begin]
        np.multiply(values[begin:stop], weight, out=scaled, dtype=np.float64)
        if keep != 0.0:
            np.add(scaled, np.multiply(part, keep, out=kept, dtype=np.float64), out=scaled)
        part[...] = scaled


def blend_at_addresses(
    flat: np.ndarray, addresses: np.ndarray, offsets: np.ndarray, sizes: np.ndarray, keep: float, weight: float
) -> None:
    """``flat[o:o+n] = keep * flat[o:o+n] + weight * values`` for the arrays of ``flat``'s dtype at ``addresses``.

    ``addresses``, ``offsets`` and ``sizes`` are int64 arrays, one entry per
    array; the caller guarantees each address holds ``n`` values that stay
    valid, and unchanged by others, during the call.
    """
    _blend_at_addresses(flat, addresses, offsets, sizes, float(keep), float(weight))


@functools.lru_cache(maxsize=None)
def compile_kernels(dtype: np.dtype) -> None:
    """Compile (or load from Numba's cache) the loops for ``dtype`` now, not in the middle of a training step."""
    target, values = np.zeros(1, dtype=dtype), np.ones(1, dtype=dtype)
    _blend(target, values, 0.5, 0.5)
    empty = np.zeros(0, dtype=np.int64)
    _blend_at_addresses(target, empty, empty, empty, 0.5, 0.5)
