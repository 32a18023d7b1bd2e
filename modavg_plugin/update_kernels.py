"""Fast in-place EMA updates, ``shadow = d * shadow + (1 - d) * value``, for many arrays.

Shadows of one context and dtype live in one flat buffer (each shadow is a
reshaped slice of it). The update is picked by context:

- CPU (:class:`CpuUpdateGroup`): :func:`blend_in_place`, BLAS ``scal`` then
  ``axpy`` (SciPy's BLAS, run single-threaded) in place on zero-copy NumPy
  views of the arrays' memory, in blocks of 1 MiB that stay in the cache
  between the two calls. The MXNet engine is synchronised by hand: each
  parameter waits for its pending writes before it is read, the shadow
  buffer waits for its pending reads and writes before it is written.
  Values of another dtype (float16 parameters, float32 shadows) are cast by
  MXNet first.
- other contexts, e.g. GPU (:class:`MultiTensorUpdateGroup`): MXNet's
  ``multi_sgd_update`` with ``lr = d - 1``, ``wd = -1``, which computes exactly
  ``d * s + (1 - d) * p``, batched to at most 60 arrays a call (61 or more
  abort the process in MXNet 1.9).
- integer dtypes (:class:`CopyUpdateGroup`): copied, not averaged.

Written by hand because no library offers in-place arithmetic on MXNet's
memory under its engine; BLAS does the arithmetic. Single-threaded on
purpose (threadpoolctl limits every loaded BLAS to one thread for the
duration of an update): with its default two threads, SciPy's OpenBLAS
stalled whenever another process kept a core busy, and its spinning threads
slowed MXNet's own. With a busy-looping process beside it, a GluonTS
SimpleFeedForward run (1,500 steps) took 27.6 s with the EMA instead of
11.4 s without; single-threaded, 13.7 s with and 14.1 s without (run-to-run
noise). On a ResNet-50's weights, single-threaded blocks took 1.42-1.46x the
NumPy floor against 2.2-2.4x for NumPy's own ``multiply``/``add``.
"""

import ctypes
import functools
from typing import ContextManager, Dict, Optional, Sequence, Tuple

import mxnet as mx
import numpy as np
from mxnet.base import _LIB, check_call
from scipy.linalg import blas
from threadpoolctl import ThreadpoolController

from .dtypes import is_floating

__all__ = [
    "MULTI_TENSOR_LIMIT",
    "SCRATCH_VALUES",
    "CopyUpdateGroup",
    "CpuUpdateGroup",
    "MultiTensorUpdateGroup",
    "UpdateGroup",
    "blend_in_place",
    "single_threaded_blas",
    "update_group_for",
]

MULTI_TENSOR_LIMIT = 60
"""Most weights ``multi_sgd_update`` takes in one call (61 aborts the process)."""

SCRATCH_VALUES = 1 << 18
"""Values per block of :func:`blend_in_place`: 1 MiB of float32, within one core's cache here."""


def wait_to_write(array: mx.nd.NDArray) -> None:
    """Block until every pending read and write of ``array`` by the engine is done."""
    check_call(_LIB.MXNDArrayWaitToWrite(array.handle))


def data_pointer(array: mx.nd.NDArray) -> int:
    """Address of ``array``'s memory (MXNet first reorders MKLDNN layouts to the default)."""
    pointer = ctypes.c_void_p()
    check_call(_LIB.MXNDArrayGetData(array.handle, ctypes.byref(pointer)))
    return int(pointer.value or 0)


class ZeroCopyView:
    """A NumPy view of a CPU NDArray's memory, rebuilt when the array or its memory changes.

    Call :meth:`read` or :meth:`write` every time the memory is touched: they
    synchronise with the MXNet engine and re-check the address.
    """

    def __init__(self) -> None:
        self._array: Optional[mx.nd.NDArray] = None
        self._pointer = 0
        self._view: Optional[np.ndarray] = None

    def read(self, array: mx.nd.NDArray) -> np.ndarray:
        """Flat view of ``array`` after its pending writes."""
        array.wait_to_read()
        return self._current(array)

    def write(self, array: mx.nd.NDArray) -> np.ndarray:
        """Flat view of ``array`` after its pending reads and writes."""
        wait_to_write(array)
        return self._current(array)

    def _current(self, array: mx.nd.NDArray) -> np.ndarray:
        pointer = data_pointer(array)
        if array is not self._array or pointer != self._pointer:
            dtype = np.dtype(array.dtype)
            buffer = (ctypes.c_byte * (array.size * dtype.itemsize)).from_address(pointer)
            self._array, self._pointer, self._view = array, pointer, np.frombuffer(buffer, dtype=dtype)
        return self._view


@functools.lru_cache(maxsize=None)
def blas_functions(dtype: np.dtype):
    """BLAS ``scal`` (``x *= a``) and ``axpy`` (``y += a * x``) for ``dtype``."""
    return blas.get_blas_funcs(("scal", "axpy"), dtype=np.dtype(dtype))


@functools.lru_cache(maxsize=None)
def blas_libraries():
    """The BLAS libraries loaded in this process, to run them single-threaded around an update."""
    return ThreadpoolController().select(user_api="blas")


def single_threaded_blas() -> ContextManager[object]:
    """Run the process's BLAS libraries single-threaded inside the ``with`` block (about 35 µs to enter and leave)."""
    return blas_libraries().limit(limits=1)


def blend_in_place(target: np.ndarray, values: np.ndarray, keep: float, weight: float, scratch: np.ndarray) -> None:
    """``target = keep * target + weight * values`` in place, on flat arrays, block by block.

    Blocks of ``scratch.size`` values stay in the CPU cache between the two
    passes: BLAS ``scal`` (skipped when ``keep == 1``) and ``axpy`` when the
    dtypes match, else NumPy casting ``values`` through ``scratch`` (a flat
    array of ``target``'s dtype). Call it inside :func:`single_threaded_blas`.
    """
    if values.dtype != target.dtype:
        _blend_casting(target, values, keep, weight, scratch)
        return
    scal, axpy = blas_functions(target.dtype)
    for begin in range(0, values.size, scratch.size):
        block = target[begin : begin + scratch.size]
        if keep != 1.0:
            _check_in_place(scal(keep, block), block)
        _check_in_place(axpy(values[begin : begin + scratch.size], block, a=weight), block)


def _blend_casting(target: np.ndarray, values: np.ndarray, keep: float, weight: float, scratch: np.ndarray) -> None:
    for begin in range(0, values.size, scratch.size):
        stop = min(begin + scratch.size, values.size)
        scaled, block = scratch[: stop - begin], target[begin:stop]
        np.multiply(values[begin:stop], weight, out=scaled, casting="same_kind")
        if keep != 1.0:
            np.multiply(block, keep, out=block)
        np.add(block, scaled, out=block)


def _check_in_place(result: np.ndarray, target: np.ndarray) -> None:
    """SciPy's BLAS wrappers work in place on contiguous arrays of their dtype; never rely on it silently."""
    if result is not target:
        target[...] = result


class UpdateGroup:
    """Shadows of one context and dtype, in one flat buffer, and their update.

    Parameters
    ----------
    names
        Parameter names, in the order ``update`` receives their values.
    initial_values
        The values the shadows start from (any dtype; copied and cast).
    dtype
        The shadows' dtype.
    """

    def __init__(self, names: Sequence[str], initial_values: Sequence[mx.nd.NDArray], dtype: np.dtype) -> None:
        self.names = list(names)
        self.dtype = np.dtype(dtype)
        self.context = initial_values[0].context
        self.sizes = [int(value.size) for value in initial_values]
        self.offsets = [sum(self.sizes[:index]) for index in range(len(self.sizes))]
        self.flat = mx.nd.zeros((max(sum(self.sizes), 1),), ctx=self.context, dtype=self.dtype)
        self.shadows: Dict[str, mx.nd.NDArray] = {}
        for name, value, start, size in zip(self.names, initial_values, self.offsets, self.sizes):
            shadow = self.flat[start : start + size].reshape(value.shape)
            value.copyto(shadow)
            self.shadows[name] = shadow

    def update(self, values: Sequence[mx.nd.NDArray], decay: float) -> None:
        """``shadow = decay * shadow + (1 - decay) * value`` for every shadow, in place."""
        raise NotImplementedError


class CopyUpdateGroup(UpdateGroup):
    """Integer shadows: each update copies the current value."""

    def update(self, values: Sequence[mx.nd.NDArray], decay: float) -> None:
        for name, value in zip(self.names, values):
            value.copyto(self.shadows[name])


class CpuUpdateGroup(UpdateGroup):
    """CPU shadows updated by :func:`blend_in_place` on zero-copy views (see the module docstring)."""

    def __init__(self, names: Sequence[str], initial_values: Sequence[mx.nd.NDArray], dtype: np.dtype) -> None:
        super().__init__(names, initial_values, dtype)
        self._value_views = [ZeroCopyView() for _ in self.names]
        self._flat_view = ZeroCopyView()
        self._scratch = np.empty(min(SCRATCH_VALUES, max(1, *self.sizes)), dtype=self.dtype)

    def update(self, values: Sequence[mx.nd.NDArray], decay: float) -> None:
        # One wait for everything queued: a pending inference pass may still reorder a value in place (MKLDNN),
        # which waiting for the value's own writes does not catch (the pass only reads it).
        mx.nd.waitall()
        values = [value if value.dtype == self.dtype else value.astype(self.dtype) for value in values]
        views = [view.read(value) for view, value in zip(self._value_views, values)]
        flat = self._flat_view.write(self.flat)
        with single_threaded_blas():
            for value, start, size in zip(views, self.offsets, self.sizes):
                blend_in_place(flat[start : start + size], value, decay, 1.0 - decay, self._scratch)


class MultiTensorUpdateGroup(UpdateGroup):
    """Shadows on GPU (or any context) updated with ``multi_sgd_update``, 60 arrays a call."""

    def update(self, values: Sequence[mx.nd.NDArray], decay: float) -> None:
        values = [self._like_shadows(value) for value in values]
        shadows = [self.shadows[name] for name in self.names]
        for start in range(0, len(shadows), MULTI_TENSOR_LIMIT):
            chunk = slice(start, start + MULTI_TENSOR_LIMIT)
            pairs = [array for pair in zip(shadows[chunk], values[chunk]) for array in pair]
            count = len(pairs) // 2
            mx.nd.multi_sgd_update(
                *pairs,
                lrs=(decay - 1.0,) * count,
                wds=(-1.0,) * count,
                rescale_grad=1.0,
                clip_gradient=-1.0,
                num_weights=count,
                out=shadows[chunk],
            )

    def _like_shadows(self, value: mx.nd.NDArray) -> mx.nd.NDArray:
        """``value`` on the shadows' context, in their dtype."""
        if value.context != self.context:
            value = value.as_in_context(self.context)
        return value if np.dtype(value.dtype) == self.dtype else value.astype(self.dtype)


def update_group_for(names: Sequence[str], initial_values: Sequence[mx.nd.NDArray], dtype: np.dtype) -> UpdateGroup:
    """The update group suited to the shadows' dtype and context."""
    if not is_floating(dtype):
        return CopyUpdateGroup(names, initial_values, dtype)
    if initial_values[0].context.device_type == "cpu":
        return CpuUpdateGroup(names, initial_values, dtype)
    return MultiTensorUpdateGroup(names, initial_values, dtype)


def group_key(value: mx.nd.NDArray, dtype: np.dtype) -> Tuple[str, int, str]:
    """Shadows sharing a context and a dtype share a group."""
    return (value.context.device_type, value.context.device_id, np.dtype(dtype).name)
