"""Streaming weighted sums of named arrays: the one place checkpoints, soups and post-hoc EMAs are summed.

Sums are kept on the host in float32 or wider (float64 stays float64),
updated in place; checkpoint files are streamed into them in 1 MiB chunks,
so peak memory is one model size (the sums) plus 1 MiB whatever the number
of files. Integer arrays are copied from the first source, not averaged.

Every floating dtype MXNet writes is averaged: float16, float32, float64 and
bfloat16 (MXNet's ``amp_cast`` writes it; NumPy has none, MXNet shows it as
the record dtype :data:`~modavg_plugin.dtypes.BFLOAT16`). bfloat16 values are
widened to float32 exactly, summed in float32, and the mean is rounded back
to bfloat16 here, to nearest with ties to even, instead of by MXNet: its
``amp_cast`` rounds so only through MKLDNN (which also flushes subnormals to
zero, and refuses arrays of 7 or more dimensions); without MKLDNN
(``MXNET_MKLDNN_ENABLED=0``), and in ``astype``/``cast`` always, it truncates,
turning some NaN into infinity. An array must have one dtype in every
source: a float16 array in one file and float32 in another (or float32 and
float64, or int32 and float32) is an error naming the array and both files.
"""

import logging
import math
import numbers
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import mxnet as mx
import numpy as np

from .checks import CheckpointError
from .dtypes import (
    BFLOAT16,
    averaging_dtype,
    bfloat16_to_float32,
    dtype_name,
    is_floating,
    round_to_bfloat16,
)
from .kernels import blend
from .params_files import ParamsFile, ParamsFileReader, ParamsFormatError, load_params, open_params
from .update_kernels import ZeroCopyView

__all__ = [
    "WeightedSum",
    "add_checkpoint_file",
    "all_finite",
    "average_arrays",
    "average_checkpoint_files",
    "check_same_names",
    "check_weights",
    "host_array",
    "is_finite_file",
    "normalised_weights",
]

logger = logging.getLogger(__name__)

ArrayLike = Union[mx.nd.NDArray, np.ndarray]


def check_same_names(names: Iterable[str], source: str, expected: Iterable[str], expected_source: str) -> None:
    """Raise :class:`~modavg_plugin.CheckpointError` naming a key found in only one of two checkpoints."""
    missing, extra = sorted(set(expected) - set(names)), sorted(set(names) - set(expected))
    if not (missing or extra):
        return
    key, holder, lacking = (missing[0], expected_source, source) if missing else (extra[0], source, expected_source)
    others = len(missing) + len(extra) - 1
    more = f" ({others} more names differ)" if others else ""
    raise CheckpointError(f"parameter {key!r} is in {holder} but not in {lacking}{more}")


def check_weights(weights: Sequence[float], count: int) -> List[float]:
    """Weights as floats: one per item, each a real number (not a bool or a string), finite, >= 0; some > 0.

    Raises
    ------
    ValueError
        Naming the first offending weight (its position and value), or the count.
    """
    weights = list(weights)
    if len(weights) != count:
        raise ValueError(f"got {len(weights)} weights for {count} items to average")
    checked = [_checked_weight(index, weight) for index, weight in enumerate(weights)]
    if count and not any(weight > 0 for weight in checked):
        raise ValueError(f"weights must not all be 0 (they are normalised to sum to 1), got {checked}")
    return checked


def _checked_weight(index: int, weight: Any) -> float:
    if isinstance(weight, (bool, np.bool_)) or not isinstance(weight, numbers.Real):
        raise ValueError(f"weight {index} must be a real number, got {weight!r} ({type(weight).__name__})")
    try:
        value = float(weight)
    except OverflowError:
        value = math.inf
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"weight {index} must be finite and >= 0, got {weight!r}")
    return value


def normalised_weights(weights: Sequence[float], count: int) -> List[float]:
    """:func:`check_weights`, then scaled to sum to 1 (by the largest first, so huge or tiny weights work)."""
    checked = check_weights(weights, count)
    if not checked:
        return []
    largest = max(checked)
    scaled = [weight / largest for weight in checked]
    total = sum(scaled)
    return [weight / total for weight in scaled]


def host_array(value: ArrayLike) -> np.ndarray:
    """A NumPy array of ``value``: zero-copy for CPU NDArrays (keep ``value`` alive while using it).

    bfloat16 values (NumPy has no bfloat16) come as a float32 copy, exact.
    """
    return summable(_host_view(value))


def _host_view(value: ArrayLike) -> np.ndarray:
    """``value`` on the host as it is stored: zero-copy for CPU NDArrays, bfloat16 as :data:`~modavg_plugin.dtypes.BFLOAT16` records."""
    if isinstance(value, np.ndarray):
        return value
    if value.context.device_type == "cpu" and value.stype == "default":
        return ZeroCopyView().read(value).reshape(value.shape)
    return value.asnumpy()  # sparse or on another device: a dense host copy


def summable(values: np.ndarray) -> np.ndarray:
    """``values`` as NumPy can compute with them: bfloat16 widened to a float32 copy (exact), others as they are."""
    return bfloat16_to_float32(values) if values.dtype == BFLOAT16 else values


class WeightedSum:
    """Running weighted sum of named arrays, on the host, in float32 or wider, updated in place.

    Floating arrays (bfloat16 too, see the module's docstring) are summed
    (:func:`~modavg_plugin.kernels.blend`) in one flat buffer per summing dtype; integer arrays are
    copied from the first source added (the best-ranked checkpoint when
    sources come sorted). An array's dtype must be the same in every source.
    Memory: one copy of the sums, whatever the number of sources. Values
    arrive as pieces ``(name, first index, flat values)``, whole arrays or
    chunks of them.
    """

    def __init__(self) -> None:
        self._flats: Dict[np.dtype, np.ndarray] = {}
        self._places: Dict[str, Tuple[np.dtype, int]] = {}  # name -> (flat dtype, start in the flat)
        self._integers: Dict[str, np.ndarray] = {}
        self._dtypes: Dict[str, np.dtype] = {}
        self._shapes: Dict[str, Tuple[int, ...]] = {}
        self._first_source = ""
        self.total_weight = 0.0

    def add(self, arrays: Mapping[str, ArrayLike], weight: float, source: str) -> None:
        """Add ``weight * arrays`` (NDArrays or NumPy arrays); keys, shapes and dtypes must match the first source.

        bfloat16 arrays are widened to float32 one at a time, as they are summed.
        """
        values = {name: _host_view(array) for name, array in arrays.items()}
        specification = {name: (value.dtype, value.shape) for name, value in values.items()}
        pieces = ((name, 0, summable(value.reshape(-1))) for name, value in values.items())
        self.add_pieces(specification, pieces, weight, source)

    def add_file(self, params_file: ParamsFile, weight: float) -> None:
        """Add ``weight *`` the arrays of an open ``.params`` file, chunk by chunk."""
        specification = {name: (entry.dtype, entry.shape) for name, entry in params_file.entries.items()}
        pieces = ((name, start, values) for name in params_file.entries for start, values in params_file.chunks(name))
        self.add_pieces(specification, pieces, weight, params_file.path)

    def add_pieces(
        self,
        specification: Mapping[str, Tuple[np.dtype, Tuple[int, ...]]],
        pieces: Iterable[Tuple[str, int, np.ndarray]],
        weight: float,
        source: str,
    ) -> None:
        """Add ``weight *`` a source given as ``name -> (dtype, shape)`` and its ``(name, start, values)`` pieces.

        ``dtype`` is the source's own (bfloat16 as :data:`~modavg_plugin.dtypes.BFLOAT16`), while
        the pieces of bfloat16 arrays come as float32. Keys, shapes and
        dtypes are checked against the first source before anything is
        summed: :class:`~modavg_plugin.CheckpointError` naming the array and both sources.
        """
        first = not self._shapes
        if first:
            self._allocate(specification, source)
        else:
            self._check_matches(specification, source)
        for name, start, values in pieces:
            stop = start + values.size
            if name in self._integers:
                if first:
                    self._integers[name].reshape(-1)[start:stop] = values
                continue
            flat_dtype, offset = self._places[name]
            target = self._flats[flat_dtype][offset + start : offset + stop]
            blend(target, values, 0.0 if first else 1.0, weight)  # the first source is written, the others added
        self.total_weight += weight

    def _allocate(self, specification: Mapping[str, Tuple[np.dtype, Tuple[int, ...]]], source: str) -> None:
        self._first_source = source
        sizes: Dict[np.dtype, int] = {}
        for name, (dtype, shape) in specification.items():
            self._dtypes[name], self._shapes[name] = np.dtype(dtype), tuple(shape)
            if not is_floating(dtype):
                self._integers[name] = np.empty(shape, dtype=dtype)
                continue
            flat_dtype = averaging_dtype(dtype)
            self._places[name] = (flat_dtype, sizes.get(flat_dtype, 0))
            sizes[flat_dtype] = sizes.get(flat_dtype, 0) + math.prod(shape)
        self._flats = {flat_dtype: np.empty(size, dtype=flat_dtype) for flat_dtype, size in sizes.items()}

    def _check_matches(self, specification: Mapping[str, Tuple[np.dtype, Tuple[int, ...]]], source: str) -> None:
        check_same_names(specification, source, self._shapes, self._first_source)
        for name, shape in self._shapes.items():
            dtype, new_shape = specification[name]
            if tuple(new_shape) != shape:
                raise CheckpointError(
                    f"parameter {name!r} has shape {tuple(new_shape)} in {source} but {shape} in {self._first_source}"
                )
            if np.dtype(dtype) != self._dtypes[name]:
                raise CheckpointError(
                    f"parameter {name!r} has dtype {dtype_name(dtype)} in {source} "
                    f"but {dtype_name(self._dtypes[name])} in {self._first_source} (mixed dtypes are not averaged)"
                )

    def all_finite(self) -> bool:
        """Whether every floating-point sum is finite (NaN or inf in a source with weight > 0 shows here)."""
        return all(all_finite(flat) for flat in self._flats.values())

    def copy(self) -> "WeightedSum":
        """An independent copy of the sums (one more model size of memory)."""
        duplicate = WeightedSum()
        duplicate.__dict__.update(self.__dict__)
        duplicate._flats = {dtype: flat.copy() for dtype, flat in self._flats.items()}
        duplicate._integers = {name: values.copy() for name, values in self._integers.items()}
        return duplicate

    def mean(self, context: Optional[mx.Context] = None) -> Dict[str, mx.nd.NDArray]:
        """The weighted mean, as :meth:`average`, leaving the sums as they are (one more model size)."""
        if not self._shapes:
            raise ValueError("nothing to average: no arrays were added")
        scale = 1.0 / self.total_weight
        return self._arrays({dtype: flat * scale for dtype, flat in self._flats.items()}, context)

    def average(self, context: Optional[mx.Context] = None) -> Dict[str, mx.nd.NDArray]:
        """The weighted mean as NDArrays in each array's original dtype (on ``context``, default CPU).

        The sums are divided in place (not at all when the weights added up
        to 1) and handed to MXNet without copying where the dtype and context
        allow: the arrays are then views of one buffer. Call it once, last.
        """
        if not self._shapes:
            raise ValueError("nothing to average: no arrays were added")
        if not math.isclose(self.total_weight, 1.0, rel_tol=1e-12, abs_tol=0.0):
            for flat in self._flats.values():
                np.multiply(flat, 1.0 / self.total_weight, out=flat)
        averaged = self._arrays(self._flats, context)
        self._flats, self._integers = {}, {}
        return averaged

    def _arrays(self, flats: Mapping[np.dtype, np.ndarray], context: Optional[mx.Context]) -> Dict[str, mx.nd.NDArray]:
        """Every array, as NDArrays in its original dtype on ``context``: floats as views of ``flats`` where possible."""
        context = context or mx.cpu()
        shared = {flat_dtype: mx.nd.from_numpy(flat, zero_copy=True) for flat_dtype, flat in flats.items()}
        arrays: Dict[str, mx.nd.NDArray] = {}
        for name, shape in self._shapes.items():
            if name in self._integers:
                arrays[name] = mx.nd.array(self._integers[name], ctx=context, dtype=self._dtypes[name])
                continue
            flat_dtype, start = self._places[name]
            if self._dtypes[name] == BFLOAT16:
                arrays[name] = _bfloat16_array(flats[flat_dtype][start : start + math.prod(shape)], shape, context)
                continue
            view = shared[flat_dtype][start : start + math.prod(shape)].reshape(shape)
            arrays[name] = view.astype(self._dtypes[name], copy=False).as_in_context(context)
        return arrays


def _bfloat16_array(values: np.ndarray, shape: Tuple[int, ...], context: mx.Context) -> mx.nd.NDArray:
    """A bfloat16 NDArray of the flat float32 ``values`` (:func:`round_to_bfloat16`), on ``context``."""
    array = mx.nd.empty(shape, ctx=mx.cpu(), dtype=BFLOAT16)
    if values.size:
        round_to_bfloat16(values, ZeroCopyView().write(array))
    return array.as_in_context(context)


def all_finite(flat: np.ndarray) -> bool:
    """Whether ``flat`` holds no NaN or inf: its min and max (which propagate NaN) are finite; no copy."""
    return flat.size == 0 or bool(np.isfinite(flat.min()) and np.isfinite(flat.max()))


def average_arrays(arrays: Sequence[mx.nd.NDArray], weights: Sequence[float]) -> mx.nd.NDArray:
    """Element-wise weighted mean of same-shape arrays (weights are normalised)."""
    if len(arrays) == 0:
        raise ValueError("arrays is empty: nothing to average")
    weights = normalised_weights(weights, len(arrays))
    shapes = sorted({tuple(array.shape) for array in arrays})
    if len(shapes) > 1:
        raise ValueError(f"all arrays must have the same shape; found shapes {shapes}")
    total = WeightedSum()
    for index, (array, weight) in enumerate(zip(arrays, weights)):
        total.add({"array": array}, weight, f"array {index}")
    return total.average(arrays[0].context)["array"]


def average_checkpoint_files(
    paths: Sequence[str], weights: Sequence[float], progress: Optional[Callable[[str], None]] = None
) -> Dict[str, mx.nd.NDArray]:
    """Weighted mean of ``.params`` files, streamed one chunk at a time.

    A file that cannot be opened or whose headers are inconsistent (missing,
    truncated, foreign) is skipped with a warning naming it, and the remaining
    weights are renormalised; so is a file holding NaN or infinite
    floating-point values (a diverged epoch), found when the sum is not
    finite. It is an error only when nothing usable is left. Differing keys
    or shapes between files are errors naming the key, and so is a file that
    changes while it is being read (the sum would be partial).
    ``progress(path)`` is called after each file, read or skipped.
    """
    if len(paths) == 0:
        raise CheckpointError("no checkpoint files to average")
    weights = normalised_weights(weights, len(paths))  # the sums need no final division
    total, used = _stream_sum(paths, weights, progress)
    if total.all_finite():
        return total.average()
    del total  # one model size at a time while looking for the culprits
    non_finite = [path for path in used if not is_finite_file(path)]
    for path in non_finite:
        logger.warning("skipping checkpoint file %s: it holds NaN or infinite values", path)
    kept = [(path, weight) for path, weight in zip(paths, weights) if path in used and path not in non_finite]
    if not non_finite or not kept:
        culprits = ", ".join(non_finite) or "none alone (the sum overflowed)"
        raise CheckpointError(f"no finite average of {len(paths)} checkpoints: NaN or infinite values in {culprits}")
    total, _ = _stream_sum([path for path, _ in kept], normalised_weights([w for _, w in kept], len(kept)), None)
    if not total.all_finite():
        raise CheckpointError(f"checkpoint files changed while being averaged: {', '.join(path for path, _ in kept)}")
    return total.average()


def _stream_sum(
    paths: Sequence[str], weights: Sequence[float], progress: Optional[Callable[[str], None]]
) -> Tuple[WeightedSum, List[str]]:
    """The weighted sum of the usable files (weights renormalised over them) and those files."""
    total = WeightedSum()
    reader = ParamsFileReader()
    used: List[str] = []
    skipped: List[str] = []
    for path, weight in zip(paths, weights):  # WeightedSum.average divides by the weight of the files used
        try:
            add_checkpoint_file(total, reader, path, weight)
            used.append(path)
        except Unusable as error:
            logger.warning("skipping %s", error)
            skipped.append(path)
        if progress is not None:
            progress(path)
    if not used:
        raise CheckpointError(f"no usable checkpoint among {len(paths)}: unreadable {', '.join(skipped)}")
    return total, used


def is_finite_file(path: str) -> bool:
    """Whether every floating-point value of the ``.params`` file ``path`` is finite."""
    single = WeightedSum()
    add_checkpoint_file(single, ParamsFileReader(), path, 1.0)
    return single.all_finite()


class Unusable(CheckpointError):
    """A checkpoint file that could not be opened or loaded; nothing of it was added."""


def add_checkpoint_file(total: WeightedSum, reader: ParamsFileReader, path: str, weight: float) -> None:
    """Add ``weight *`` the arrays of the ``.params`` file ``path``, chunk by chunk.

    Raises ``Unusable`` (a :class:`~modavg_plugin.CheckpointError`) when the file
    cannot be opened or loaded, :class:`~modavg_plugin.CheckpointError` when it changes
    while being read, naming it either way.
    """
    try:
        params_file = open_params(reader, path)
    except CheckpointError as error:
        raise Unusable(str(error)) from None
    if params_file is None:
        _add_loaded(total, path, weight)
        return
    with params_file:
        try:
            total.add_file(params_file, weight)
        except (ParamsFormatError, OSError) as error:
            raise CheckpointError(f"checkpoint file {path} changed while being averaged ({error})") from None


def _add_loaded(total: WeightedSum, path: str, weight: float) -> None:
    """Add a file in a layout left to ``mx.nd.load``; ``Unusable`` if it cannot be loaded or converted."""
    try:
        loaded = load_params(path)
        values = {name: _host_view(array) for name, array in loaded.items()}  # views of ``loaded``: keep it
    except CheckpointError as error:
        raise Unusable(str(error)) from None
    except (mx.base.MXNetError, ValueError, TypeError) as error:  # e.g. a dtype NumPy does not have
        raise Unusable(f"checkpoint file {path} has an array NumPy cannot hold ({error})") from None
    total.add(values, weight, path)
    del loaded
