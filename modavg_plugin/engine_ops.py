"""Compiled work run by MXNet's dependency engine, in order with the operators on the same arrays.

:class:`EnginePush` hands a C function to the engine (``MXEnginePushSyncND``) with
the arrays it reads and the arrays it writes. The engine calls it on one of
its worker threads once every operator pushed earlier that writes what it
reads, or touches what it writes, is done; operators pushed later wait for it
in the same way. The caller does not wait: an update of the averages overlaps
the rest of the training step, as an optimiser update does. The function is
compiled (:data:`modavg_plugin.kernels.ENGINE_KERNELS`): it runs without
Python and without the GIL, so it never waits for the training loop's thread.

Written by hand because MXNet's Python package exposes no way to push work to
its engine; its C API has one (``c_api.h``, MXNet 1.9).
"""

import atexit
import ctypes
from typing import Sequence

import mxnet as mx
from mxnet.base import _LIB, check_call

__all__ = ["EnginePush", "handle_array"]

_DEVICE_TYPES = {"cpu": 1, "gpu": 2, "cpu_pinned": 3, "cpu_shared": 5}


class _Context(ctypes.Structure):
    """MXNet's ``Context``: device type and id."""

    _fields_ = [("device_type", ctypes.c_int), ("device_id", ctypes.c_int)]


def handle_array(arrays: Sequence[mx.nd.NDArray]) -> ctypes.Array:
    """The C handles of ``arrays``, as :class:`EnginePush` takes them (keep ``arrays`` alive with it)."""
    return (ctypes.c_void_p * len(arrays))(*[array.handle.value for array in arrays])


class EnginePush:
    """Pushes of one compiled function with fixed arrays: MXNet's engine calls ``function(run_context, arguments)``.

    Parameters
    ----------
    function
        Address of a C function ``void (void *run_context, void *arguments)``.
    reads, writes
        From :func:`handle_array`: it runs after the pending writes of
        ``reads`` and every pending use of ``writes`` (no array in both), and
        operators pushed later wait for it in the same way.
    context
        The device it is run for.
    name
        How MXNet's profiler names it.
    """

    def __init__(
        self, function: int, reads: ctypes.Array, writes: ctypes.Array, context: mx.Context, name: str
    ) -> None:
        self._device = _Context(_DEVICE_TYPES[context.device_type], context.device_id)
        self._function = ctypes.c_void_p(function)
        self._dependencies = (reads, len(reads), writes, len(writes), None, 0, name.encode())
        self._device_pointer = ctypes.byref(self._device)

    def __call__(self, arguments: ctypes.c_void_p) -> None:
        """Queue one call; ``arguments`` must stay valid and unchanged until it has run."""
        check_call(_LIB.MXEnginePushSyncND(self._function, arguments, None, self._device_pointer, *self._dependencies))


@atexit.register
def _finish_pushed_work() -> None:
    """Let queued work finish while what it reads is still there (runs before MXNet's own exit handler)."""
    mx.nd.waitall()
