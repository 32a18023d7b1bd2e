"""Checkpoint I/O: epoch-info records, ``.params`` files, and a streaming average.

Files are written to a temporary name in the same folder and renamed into
place, so a reader never sees half a file. Averages are running weighted sums
(float32 or wider) over checkpoints streamed in 1 MiB chunks: peak memory is
one model size (the sums) plus 1 MiB whatever the number of checkpoints.
"""

import glob
import json
import logging
import math
import os
import tempfile
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import mxnet as mx
import numpy as np

from .parameters import averaging_dtype, is_floating
from .params_files import ParamsFile, ParamsFileReader, ParamsFormatError
from .update_kernels import SCRATCH_VALUES, ZeroCopyView, blend_in_place, single_threaded_blas

__all__ = [
    "AVERAGED_MODEL_NAME",
    "EPOCH_INFO_SUFFIX",
    "CheckpointError",
    "WeightedSum",
    "average_arrays",
    "average_checkpoint_files",
    "load_params",
    "read_array_names",
    "read_checkpoint_records",
    "save_epoch_info",
    "save_params",
]

logger = logging.getLogger("gluonts.modavg_plugin.checkpoints")

EPOCH_INFO_SUFFIX = "-epoch-info.json"
ArrayLike = Union[mx.nd.NDArray, np.ndarray]
AVERAGED_MODEL_NAME = "averaged_model-0000.params"


class CheckpointError(ValueError):
    """A checkpoint folder, record or file cannot be used; the message names it."""


def write_atomically(path: str, write: Callable[[str], None]) -> None:
    """Call ``write(temporary_path)`` then rename the result to ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    handle, temporary = tempfile.mkstemp(prefix=".tmp-", suffix="-" + os.path.basename(path), dir=folder)
    os.close(handle)
    try:
        write(temporary)
        with open(temporary, "rb") as written:
            os.fsync(written.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def save_epoch_info(tmp_path: str, epoch_info: Mapping[str, Any]) -> None:
    """Write ``epoch_info`` to ``f"{tmp_path}-epoch-info.json"`` atomically.

    Parameters
    ----------
    tmp_path
        Base path of the checkpoint, e.g. ``folder/epoch-0003``.
    epoch_info
        ``params_path`` (absolute, or relative to the folder), ``epoch_no``
        and the metric values (``score`` by default).
    """

    def write(path: str) -> None:
        with open(path, "w") as file:
            json.dump(dict(epoch_info), file)

    write_atomically(f"{tmp_path}{EPOCH_INFO_SUFFIX}", write)


def save_params(path: str, arrays: Mapping[str, mx.nd.NDArray]) -> None:
    """Save named arrays as a ``.params`` file (``mx.nd.save`` format), atomically."""
    write_atomically(path, lambda temporary: mx.nd.save(temporary, dict(arrays)))


def load_params(path: str) -> Dict[str, mx.nd.NDArray]:
    """Load a ``.params`` file into CPU arrays; :class:`CheckpointError` naming it if unreadable."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file {path} does not exist")
    try:
        loaded = mx.nd.load(path)
    except mx.base.MXNetError as error:
        reason = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"checkpoint file {path} is not a readable .params file ({reason})") from None
    if not isinstance(loaded, dict):
        raise CheckpointError(f"checkpoint file {path} holds unnamed arrays; expected name -> array")
    return loaded


def open_params(reader: ParamsFileReader, path: str) -> Optional[ParamsFile]:
    """``path`` opened for chunked reading (headers checked), or ``None`` for layouts left to ``mx.nd.load``."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file {path} does not exist")
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


def read_checkpoint_records(folder: str) -> List[Dict[str, Any]]:
    """Every readable ``*-epoch-info.json`` record in ``folder``.

    ``params_path`` is resolved against the folder when relative; each record
    also gets ``info_path``. Records that are not JSON objects are skipped with
    a warning naming the file.
    """
    if not os.path.isdir(folder):
        raise CheckpointError(f"checkpoint folder {folder} does not exist")
    info_paths = sorted(glob.glob(os.path.join(glob.escape(folder), f"*{EPOCH_INFO_SUFFIX}")))
    if not info_paths:
        raise CheckpointError(f"no checkpoints (*{EPOCH_INFO_SUFFIX}) in folder {folder}")
    records = [record for record in map(_read_epoch_info, info_paths) if record is not None]
    if not records:
        raise CheckpointError(f"none of the {len(info_paths)} epoch-info files in {folder} is readable")
    return records


def _read_epoch_info(info_path: str) -> Optional[Dict[str, Any]]:
    try:
        with open(info_path) as file:
            record = json.load(file)
    except (OSError, ValueError) as error:
        logger.warning("skipping epoch info %s: %s", info_path, error)
        return None
    if not isinstance(record, dict) or not isinstance(record.get("params_path"), str):
        logger.warning("skipping epoch info %s: not an object with a 'params_path' string", info_path)
        return None
    folder = os.path.dirname(info_path)
    record["params_path"] = os.path.join(folder, record["params_path"])
    record["info_path"] = info_path
    return record


def check_same_names(names: Iterable[str], source: str, expected: Iterable[str], expected_source: str) -> None:
    """Raise :class:`CheckpointError` naming a key found in only one of two checkpoints."""
    missing, extra = sorted(set(expected) - set(names)), sorted(set(names) - set(expected))
    if not (missing or extra):
        return
    key, holder, lacking = (missing[0], expected_source, source) if missing else (extra[0], source, expected_source)
    others = len(missing) + len(extra) - 1
    more = f" ({others} more names differ)" if others else ""
    raise CheckpointError(f"parameter {key!r} is in {holder} but not in {lacking}{more}")


def check_weights(weights: Sequence[float], count: int) -> List[float]:
    """Weights as floats: one per item, finite, >= 0, with a positive sum."""
    weights = [float(weight) for weight in weights]
    if len(weights) != count:
        raise ValueError(f"got {len(weights)} weights for {count} items to average")
    if any(not math.isfinite(weight) or weight < 0 for weight in weights):
        raise ValueError(f"weights must be finite and >= 0, got {weights}")
    if count and sum(weights) <= 0:
        raise ValueError(f"weights must have a positive sum, got {weights}")
    return weights


def host_array(value: ArrayLike) -> np.ndarray:
    """A NumPy array of ``value``: zero-copy for CPU NDArrays (keep ``value`` alive while using it)."""
    if isinstance(value, np.ndarray):
        return value
    if value.context.device_type == "cpu" and value.stype == "default":
        return ZeroCopyView().read(value).reshape(value.shape)
    return value.asnumpy()  # sparse or on another device: a dense host copy


class WeightedSum:
    """Running weighted sum of named arrays, on the host, in float32 or wider, updated in place.

    Floating arrays are summed (BLAS ``axpy``) in one flat buffer per
    summing dtype; integer arrays are copied from the first source added (the
    best-ranked checkpoint when sources come sorted). Memory: one copy of the
    sums, whatever the number of sources. Values arrive as pieces
    ``(name, first index, flat values)``, whole arrays or chunks of them.
    """

    def __init__(self) -> None:
        self._flats: Dict[np.dtype, np.ndarray] = {}
        self._places: Dict[str, Tuple[np.dtype, int]] = {}  # name -> (flat dtype, start in the flat)
        self._integers: Dict[str, np.ndarray] = {}
        self._dtypes: Dict[str, np.dtype] = {}
        self._shapes: Dict[str, Tuple[int, ...]] = {}
        self._first_source = ""
        self._scratch: Dict[np.dtype, np.ndarray] = {}
        self.total_weight = 0.0

    def add(self, arrays: Mapping[str, ArrayLike], weight: float, source: str) -> None:
        """Add ``weight * arrays`` (NDArrays or NumPy arrays); keys and shapes must match the first source."""
        values = {name: host_array(array) for name, array in arrays.items()}
        specification = {name: (value.dtype, value.shape) for name, value in values.items()}
        pieces = ((name, 0, value.reshape(-1)) for name, value in values.items())
        self.add_pieces(specification, pieces, weight, source)

    def add_file(self, params_file: ParamsFile, weight: float) -> None:
        """Add ``weight *`` the arrays of an open ``.params`` file, chunk by chunk."""
        specification = {name: (entry.dtype, entry.shape) for name, entry in params_file.entries.items()}
        pieces = (
            (name, start, values) for name in params_file.entries for start, values in params_file.chunks(name)
        )
        self.add_pieces(specification, pieces, weight, params_file.path)

    def add_pieces(
        self,
        specification: Mapping[str, Tuple[np.dtype, Tuple[int, ...]]],
        pieces: Iterable[Tuple[str, int, np.ndarray]],
        weight: float,
        source: str,
    ) -> None:
        """Add ``weight *`` a source given as ``name -> (dtype, shape)`` and its ``(name, start, values)`` pieces."""
        first = not self._shapes
        if first:
            self._allocate(specification, source)
        else:
            self._check_matches(specification, source)
        with single_threaded_blas():
            for name, start, values in pieces:
                stop = start + values.size
                if name in self._integers:
                    if first:
                        self._integers[name].reshape(-1)[start:stop] = values
                    continue
                flat_dtype, offset = self._places[name]
                target = self._flats[flat_dtype][offset + start : offset + stop]
                if first:
                    np.multiply(values, weight, out=target, casting="same_kind")
                else:
                    self._add_scaled(target, values, weight)
        self.total_weight += weight

    def _add_scaled(self, target: np.ndarray, values: np.ndarray, weight: float) -> None:
        """``target += weight * values`` (single-threaded BLAS ``axpy``, or NumPy casting through a scratch)."""
        scratch = self._scratch.get(target.dtype)
        if scratch is None:
            scratch = self._scratch[target.dtype] = np.empty(SCRATCH_VALUES, dtype=target.dtype)
        blend_in_place(target, values, 1.0, weight, scratch)

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
            if tuple(specification[name][1]) != shape:
                raise CheckpointError(
                    f"parameter {name!r} has shape {tuple(specification[name][1])} in {source} "
                    f"but {shape} in {self._first_source}"
                )

    def average(self, context: Optional[mx.Context] = None) -> Dict[str, mx.nd.NDArray]:
        """The weighted mean as NDArrays in each array's original dtype (on ``context``, default CPU).

        The sums are divided in place (not at all when the weights added up
        to 1) and handed to MXNet without copying where the dtype and context
        allow: the arrays are then views of one buffer. Call it once, last.
        """
        if not self._shapes:
            raise ValueError("nothing to average: no arrays were added")
        context = context or mx.cpu()
        if not math.isclose(self.total_weight, 1.0, rel_tol=1e-12, abs_tol=0.0):
            for flat in self._flats.values():
                np.multiply(flat, 1.0 / self.total_weight, out=flat)
        flats = {flat_dtype: mx.nd.from_numpy(flat, zero_copy=True) for flat_dtype, flat in self._flats.items()}
        averaged: Dict[str, mx.nd.NDArray] = {}
        for name, shape in self._shapes.items():
            if name in self._integers:
                averaged[name] = mx.nd.array(self._integers[name], ctx=context, dtype=self._dtypes[name])
                continue
            flat_dtype, start = self._places[name]
            view = flats[flat_dtype][start : start + math.prod(shape)].reshape(shape)
            averaged[name] = view.astype(self._dtypes[name], copy=False).as_in_context(context)
        self._flats, self._integers, self._scratch = {}, {}, {}
        return averaged


def average_arrays(arrays: Sequence[mx.nd.NDArray], weights: Sequence[float]) -> mx.nd.NDArray:
    """Element-wise weighted mean of same-shape arrays (weights are normalised)."""
    if len(arrays) == 0:
        raise ValueError("arrays is empty: nothing to average")
    weights = check_weights(weights, len(arrays))
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
    weights are renormalised; it is an error only when nothing is readable.
    Differing keys or shapes between files are errors naming the key, and so
    is a file that changes while it is being read (the sum would be partial).
    ``progress(path)`` is called after each file, read or skipped.
    """
    if len(paths) == 0:
        raise CheckpointError("no checkpoint files to average")
    weights = check_weights(weights, len(paths))
    weights = [weight / sum(weights) for weight in weights]  # the sums need no final division
    total = WeightedSum()
    reader = ParamsFileReader()
    skipped: List[str] = []
    for path, weight in zip(paths, weights):
        try:
            _add_checkpoint(total, reader, path, weight)
        except _Unusable as error:
            logger.warning("skipping %s", error)
            skipped.append(path)
        if progress is not None:
            progress(path)
    if total.total_weight <= 0:
        raise CheckpointError(f"no usable checkpoint among {len(paths)}: unreadable {', '.join(skipped)}")
    return total.average()


class _Unusable(CheckpointError):
    """A checkpoint file that could not be opened; nothing of it was added."""


def _add_checkpoint(total: WeightedSum, reader: ParamsFileReader, path: str, weight: float) -> None:
    try:
        params_file = open_params(reader, path)
        arrays = load_params(path) if params_file is None else None
    except CheckpointError as error:
        raise _Unusable(str(error)) from None
    if params_file is None:
        total.add(arrays, weight, path)
        return
    with params_file:
        try:
            total.add_file(params_file, weight)
        except (ParamsFormatError, OSError) as error:
            raise CheckpointError(f"checkpoint file {path} changed while being averaged ({error})") from None
