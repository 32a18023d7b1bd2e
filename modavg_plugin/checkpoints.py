"""Checkpoint I/O: epoch-info records, ``.params`` files, and a streaming average.

Files are written to a temporary name in the same folder and renamed into
place, so a reader never sees half a file. Averages are running weighted sums
(float32 or wider) over checkpoints loaded one at a time: peak memory is about
two model sizes whatever the number of checkpoints.
"""

import glob
import json
import logging
import math
import os
import tempfile
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import mxnet as mx
import numpy as np

from .parameters import averaging_dtype, is_floating
from .params_files import ParamsFileReader, ParamsFormatError
from .update_kernels import ZeroCopyView, add_scaled_view, scale_view

__all__ = [
    "AVERAGED_MODEL_NAME",
    "EPOCH_INFO_SUFFIX",
    "CheckpointError",
    "WeightedSum",
    "average_arrays",
    "average_checkpoint_files",
    "load_params",
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


def read_params(reader: ParamsFileReader, path: str) -> Mapping[str, ArrayLike]:
    """Arrays of a ``.params`` file as views of ``reader``'s buffer (``mx.nd.load`` for rarer layouts)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file {path} does not exist")
    try:
        arrays = reader.read(path)
    except ParamsFormatError as error:
        raise CheckpointError(f"checkpoint file {path} is not a readable .params file ({error})") from None
    except OSError as error:
        raise CheckpointError(f"checkpoint file {path} cannot be read ({error})") from None
    return arrays if arrays is not None else load_params(path)


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
    sums, whatever the number of sources.
    """

    def __init__(self) -> None:
        self._flats: Dict[np.dtype, np.ndarray] = {}
        self._places: Dict[str, Tuple[np.dtype, int, int]] = {}  # name -> (flat dtype, start, stop)
        self._integers: Dict[str, np.ndarray] = {}
        self._dtypes: Dict[str, np.dtype] = {}
        self._shapes: Dict[str, Tuple[int, ...]] = {}
        self._first_source = ""
        self.total_weight = 0.0

    def add(self, arrays: Mapping[str, ArrayLike], weight: float, source: str) -> None:
        """Add ``weight * arrays`` (NDArrays or NumPy arrays); keys and shapes must match the first source."""
        if not self._shapes:
            self._start(arrays, weight, source)
        else:
            self._check_matches(arrays, source)
            for name, (flat_dtype, start, stop) in self._places.items():
                add_scaled_view(self._flats[flat_dtype][start:stop], host_array(arrays[name]).reshape(-1), weight)
        self.total_weight += weight

    def _start(self, arrays: Mapping[str, ArrayLike], weight: float, source: str) -> None:
        self._first_source = source
        values = {name: host_array(array) for name, array in arrays.items()}
        sizes: Dict[np.dtype, int] = {}
        for name, value in values.items():
            self._dtypes[name], self._shapes[name] = np.dtype(value.dtype), tuple(value.shape)
            if not is_floating(value.dtype):
                self._integers[name] = value.copy()
                continue
            flat_dtype = averaging_dtype(value.dtype)
            start = sizes.get(flat_dtype, 0)
            self._places[name] = (flat_dtype, start, start + value.size)
            sizes[flat_dtype] = start + value.size
        self._flats = {flat_dtype: np.empty(size, dtype=flat_dtype) for flat_dtype, size in sizes.items()}
        for name, (flat_dtype, start, stop) in self._places.items():
            np.multiply(values[name].reshape(-1), weight, out=self._flats[flat_dtype][start:stop], casting="same_kind")

    def _check_matches(self, arrays: Mapping[str, ArrayLike], source: str) -> None:
        missing = sorted(set(self._shapes) - set(arrays))
        extra = sorted(set(arrays) - set(self._shapes))
        if missing or extra:
            key, where = (missing[0], f"missing from {source}") if missing else (extra[0], f"only in {source}")
            raise CheckpointError(f"parameter {key!r} is {where}, not in {self._first_source}")
        for name, shape in self._shapes.items():
            if tuple(arrays[name].shape) != shape:
                raise CheckpointError(
                    f"parameter {name!r} has shape {tuple(arrays[name].shape)} in {source} "
                    f"but {shape} in {self._first_source}"
                )

    def average(self, context: Optional[mx.Context] = None) -> Dict[str, mx.nd.NDArray]:
        """The weighted mean as NDArrays in each array's original dtype (on ``context``, default CPU).

        The sums are divided in place and handed over without copying where
        the dtype and context allow: call it once, last.
        """
        if not self._shapes:
            raise ValueError("nothing to average: no arrays were added")
        context = context or mx.cpu()
        for flat in self._flats.values():
            scale_view(flat, 1.0 / self.total_weight)
        averaged: Dict[str, mx.nd.NDArray] = {}
        for name, shape in self._shapes.items():
            if name in self._integers:
                total = self._integers[name]
            else:
                flat_dtype, start, stop = self._places[name]
                total = self._flats[flat_dtype][start:stop].reshape(shape)
            averaged[name] = self._as_ndarray(total, self._dtypes[name], context)
        self._flats, self._integers = {}, {}
        return averaged

    @staticmethod
    def _as_ndarray(total: np.ndarray, dtype: np.dtype, context: mx.Context) -> mx.nd.NDArray:
        """Zero-copy when possible (the sum becomes read-only), else a cast copy."""
        if total.dtype == dtype and context.device_type == "cpu" and total.flags.c_contiguous:
            return mx.nd.from_numpy(total, zero_copy=True)
        return mx.nd.array(total, ctx=context, dtype=dtype)


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


def average_checkpoint_files(paths: Sequence[str], weights: Sequence[float]) -> Dict[str, mx.nd.NDArray]:
    """Weighted mean of ``.params`` files, loading one at a time.

    An unreadable file is skipped with a warning naming it, and the remaining
    weights are renormalised; it is an error only when nothing is readable.
    Differing keys or shapes between files are errors naming the key.
    """
    if len(paths) == 0:
        raise CheckpointError("no checkpoint files to average")
    weights = check_weights(weights, len(paths))
    total = WeightedSum()
    reader = ParamsFileReader()
    skipped: List[str] = []
    for path, weight in zip(paths, weights):
        try:
            arrays = read_params(reader, path)
        except CheckpointError as error:
            logger.warning("skipping %s", error)
            skipped.append(path)
            continue
        total.add(arrays, weight, path)
        del arrays  # free this checkpoint before the next one is read
    if total.total_weight <= 0:
        raise CheckpointError(f"no usable checkpoint among {len(paths)}: unreadable {', '.join(skipped)}")
    del reader  # the read buffer goes before the result is built
    return total.average()
