"""In-place EMA updates, ``shadow = d * shadow + (1 - d) * value``, for many arrays at once.

Shadows of one context and dtype live in one flat buffer (each shadow is a
reshaped slice of it). The update is picked by context:

- CPU (:class:`CpuUpdateGroup`): one compiled loop over every array, given
  their addresses (:data:`modavg_plugin.kernels.ENGINE_KERNELS`), pushed
  into MXNet's engine (:mod:`modavg_plugin.engine_ops`) after the writes of
  the values and before the next writes of the weights or uses of the
  shadows: the caller does not wait, the engine runs no Python, and the
  cost per array is nanoseconds. Addresses are looked up once, when the
  value arrays are new. Values the loop cannot read in place (another
  dtype, another device, sparse) are first copied into staging arrays, by
  MXNet, in the engine too.
  Arrays of three or more dimensions (convolution weights) may be reordered
  in place by MKLDNN into a blocked layout during an inference pass, which
  an address cannot show: for a group holding any, each update first waits
  for all queued work and asks MXNet for the address, which puts the array
  back in the default layout (without the wait, 1 in 3 runs of a test read
  the blocked layout).
- other contexts, e.g. GPU (:class:`MultiTensorUpdateGroup`): MXNet's
  ``multi_sgd_update`` with ``lr = d - 1``, ``wd = -1``, which computes exactly
  ``d * s + (1 - d) * p``, batched to at most 60 arrays a call (61 or more
  abort the process in MXNet 1.9).
- integer dtypes (:class:`CopyUpdateGroup`): copied, not averaged.

Written by hand because no library offers arithmetic on MXNet's memory under
its engine; the loop itself is compiled by Numba. On CPU, MXNet's own
operators are far from the memory-bandwidth floor here (``sgd_update`` on a
flat ResNet-50-sized array: 29 ms against 7 ms for NumPy's ``s += p``;
``multi_sgd_update`` per tensor: 114 ms).
"""

import ctypes
import operator
from typing import Dict, List, Optional, Sequence, Tuple

import mxnet as mx
import numpy as np
from mxnet.base import _LIB, check_call

from .dtypes import is_floating
from .engine_ops import EnginePush, handle_array
from .kernels import DONE_FIELD, ENGINE_FIELDS, ENGINE_KERNELS, KEEP_FIELD, compile_kernels, engine_arguments
from .parameters import readable_in_place

__all__ = [
    "MULTI_TENSOR_LIMIT",
    "CopyUpdateGroup",
    "CpuUpdateGroup",
    "MultiTensorUpdateGroup",
    "UpdateGroup",
    "ZeroCopyView",
    "data_pointer",
    "update_group_for",
]

MULTI_TENSOR_LIMIT = 60
"""Most weights ``multi_sgd_update`` takes in one call (61 aborts the process)."""

ENGINE_SLOTS = 16
"""Updates of one group that may be queued in MXNet's engine at once (each has its own arguments)."""

REORDERABLE_NDIM = 3
"""Arrays with this many dimensions or more may be put in a blocked layout by MKLDNN (convolution weights)."""


def data_pointer(array: mx.nd.NDArray) -> int:
    """Address of ``array``'s memory (MXNet first reorders MKLDNN layouts to the default)."""
    pointer = ctypes.c_void_p()
    check_call(_LIB.MXNDArrayGetData(array.handle, ctypes.byref(pointer)))
    return int(pointer.value or 0)


def host_view(array: mx.nd.NDArray) -> np.ndarray:
    """A flat NumPy view of a CPU NDArray's memory, as it is now (no synchronisation)."""
    dtype = np.dtype(array.dtype)
    buffer = (ctypes.c_byte * (array.size * dtype.itemsize)).from_address(data_pointer(array))
    return np.frombuffer(buffer, dtype=dtype)


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
        check_call(_LIB.MXNDArrayWaitToWrite(array.handle))
        return self._current(array)

    def _current(self, array: mx.nd.NDArray) -> np.ndarray:
        pointer = data_pointer(array)
        if array is not self._array or pointer != self._pointer:
            self._array, self._pointer, self._view = array, pointer, host_view(array)
        return self._view


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
    """CPU shadows updated by one compiled loop pushed into MXNet's engine (see the module docstring)."""

    def __init__(self, names: Sequence[str], initial_values: Sequence[mx.nd.NDArray], dtype: np.dtype) -> None:
        super().__init__(names, initial_values, dtype)
        compile_kernels(self.dtype)
        self._kernel = ENGINE_KERNELS[self.dtype]
        mx.nd.waitall()  # the flat buffer is allocated and filled: its address is fixed from here on
        self._offsets = np.array(self.offsets, dtype=np.int64)
        self._sizes = np.array(self.sizes, dtype=np.int64)
        self._values: List[mx.nd.NDArray] = []  # the arrays the addresses below are of
        self._staging: List[Optional[mx.nd.NDArray]] = []  # per value: the array the loop reads, if not the value
        self._reads: List[mx.nd.NDArray] = []
        self._push = EnginePush(self._kernel, handle_array([]), handle_array([self.flat]), self.context, "modavg_ema")
        self._addresses = np.zeros(0, dtype=np.int64)
        self._reorderable: List[int] = []
        self._slots = np.zeros((ENGINE_SLOTS, ENGINE_FIELDS), dtype=np.int64)  # arguments of the queued updates
        self._slot_keeps = [fields.view(np.float64)[KEEP_FIELD : KEEP_FIELD + 1] for fields in self._slots]
        self._slot_addresses = [ctypes.c_void_p(fields.ctypes.data) for fields in self._slots]
        self._pushed = np.zeros(ENGINE_SLOTS, dtype=np.int64)  # updates pushed with each slot
        self._next_slot = 0

    def update(self, values: Sequence[mx.nd.NDArray], decay: float) -> None:
        if len(values) != len(self._values) or not all(map(operator.is_, values, self._values)):
            self._follow(values)
        for value, staging in zip(values, self._staging):
            if staging is not None:
                value.copyto(staging)  # MXNet casts or copies across devices, in the engine
        if self._reorderable:
            mx.nd.waitall()  # no queued inference pass may reorder a convolution weight after the look-up below
            for index in self._reorderable:
                data_pointer(self._reads[index])  # puts an MKLDNN-reordered array back in the default layout
        slot = self._next_slot
        self._next_slot = (slot + 1) % ENGINE_SLOTS
        if self._slots[slot, DONE_FIELD] != self._pushed[slot]:
            mx.nd.waitall()  # the engine is ENGINE_SLOTS updates behind: this slot's last update has not run yet
        self._slot_keeps[slot][0] = decay
        self._pushed[slot] += 1
        self._push(self._slot_addresses[slot])

    def _follow(self, values: Sequence[mx.nd.NDArray]) -> None:
        """New value arrays (the first update, or a host that re-created them): look their addresses up."""
        if len(values) != len(self.names):
            raise ValueError(f"{len(values)} values for {len(self.names)} shadows")
        mx.nd.waitall()  # nothing queued may use the old addresses, nor reorder or fill the new arrays meanwhile
        self._staging = [
            None if self._readable(value) else mx.nd.empty(value.shape, ctx=self.context, dtype=self.dtype)
            for value in values
        ]
        self._reads = [value if staging is None else staging for value, staging in zip(values, self._staging)]
        self._push = EnginePush(
            self._kernel, handle_array(self._reads), handle_array([self.flat]), self.context, "modavg_ema"
        )
        self._addresses = np.array([data_pointer(array) for array in self._reads], dtype=np.int64)
        self._reorderable = [index for index, array in enumerate(self._reads) if array.ndim >= REORDERABLE_NDIM]
        for fields in self._slots:
            engine_arguments(
                fields, data_pointer(self.flat), self.flat.size, self._addresses, self._offsets, self._sizes
            )
        self._values = list(values)

    def _readable(self, value: mx.nd.NDArray) -> bool:
        """Whether the loop can read ``value`` where it is: the shadows' dtype, host memory, default storage."""
        return (
            np.dtype(value.dtype) == self.dtype
            and readable_in_place(value.context, self.context)
            and value.stype == "default"
        )

    def __del__(self) -> None:
        if hasattr(self, "_slots") and np.any(self._slots[:, DONE_FIELD] != self._pushed):
            try:
                mx.nd.waitall()  # queued updates still read this group's arguments
            except Exception:  # at interpreter exit MXNet may be gone (engine_ops has waited by then)
                pass


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
