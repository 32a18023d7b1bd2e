"""Checkpoint I/O: epoch-info records, ``.params`` files, and a streaming average.

Files are written to a temporary name (``.tmp-*``) in the same folder,
synced, renamed into place and the folder synced, so a reader never sees half
a file and a crash leaves at most a ``.tmp-*`` leftover, which readers ignore.
Averages are running weighted sums (float32 or wider) over checkpoints
streamed in 1 MiB chunks: peak memory is one model size (the sums) plus 1 MiB
whatever the number of checkpoints.

Reading a folder trusts nothing in it: an epoch-info file that is too large
(over :data:`MAX_EPOCH_INFO_BYTES`), not a JSON object, has a wrongly typed
``params_path`` or ``epoch_no``, points outside the folder, or whose
parameter file is missing or unreadable is skipped with a warning giving the
reason; only when nothing usable is left is it an error, listing every
reason. Metric values are judged by the strategy that ranks them.
"""

import errno
import json
import logging
import math
import numbers
import os
import tempfile
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import mxnet as mx
import numpy as np

from .parameters import averaging_dtype, is_floating, write_into_parameters
from .params_files import ParamsFile, ParamsFileReader, ParamsFormatError, open_regular_file
from .update_kernels import SCRATCH_VALUES, ZeroCopyView, blend_in_place, single_threaded_blas

__all__ = [
    "AVERAGED_MODEL_NAME",
    "EPOCH_INFO_SUFFIX",
    "MAX_EPOCH_INFO_BYTES",
    "TEMPORARY_PREFIX",
    "CheckpointError",
    "WeightedSum",
    "all_finite",
    "average_arrays",
    "average_checkpoint_files",
    "check_weights",
    "is_finite_file",
    "list_folder_files",
    "load_params",
    "load_weights",
    "normalised_weights",
    "read_array_names",
    "read_checkpoint_records",
    "read_json_object",
    "reused_file_reason",
    "save_epoch_info",
    "save_json",
    "read_state_file",
    "save_state_file",
    "arrays_named",
    "save_params",
    "shown_value",
    "write_atomically",
]

logger = logging.getLogger("gluonts.modavg_plugin.checkpoints")

EPOCH_INFO_SUFFIX = "-epoch-info.json"
ArrayLike = Union[mx.nd.NDArray, np.ndarray]
AVERAGED_MODEL_NAME = "averaged_model-0000.params"
TEMPORARY_PREFIX = ".tmp-"  # files being written; what a crash leaves behind
MAX_EPOCH_INFO_BYTES = 1 << 20  # the callbacks write about 100 bytes; larger files are not read
MAX_REASONS_SHOWN = 20  # files or records named in one warning or error; the rest are counted


class CheckpointError(ValueError):
    """A checkpoint folder, record or file cannot be used; the message names it."""


def _file_mode() -> int:
    """0666 less this process's umask, as ``open()`` would create a file (read once, at import)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


FILE_MODE = _file_mode()


def write_atomically(path: str, write: Callable[[str], None]) -> None:
    """Call ``write(temporary_path)``, sync the file, rename it to ``path`` and sync the folder.

    The temporary file is ``.tmp-*`` in the same folder and removed if
    anything fails before the rename; a crash can leave it behind (readers
    ignore such leftovers), never a partial ``path``.
    """
    folder = os.path.dirname(os.path.abspath(path))
    handle, temporary = tempfile.mkstemp(prefix=TEMPORARY_PREFIX, suffix="-" + os.path.basename(path), dir=folder)
    os.close(handle)
    try:
        write(temporary)
        with open(temporary, "rb") as written:
            os.fsync(written.fileno())
        os.chmod(temporary, FILE_MODE)  # mkstemp creates 0600; a checkpoint is an ordinary file
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
    fsync_folder(folder)


def fsync_folder(folder: str) -> None:
    """Make a rename in ``folder`` durable by syncing the folder itself.

    Skipped where the operating system cannot open a folder (Windows) or
    cannot sync one (some file systems answer ``EINVAL``); other errors, such
    as ``EIO``, are raised: the rename may not survive a power loss.
    """
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:  # Windows: folders cannot be opened
        return
    try:
        os.fsync(descriptor)
    except OSError as error:
        if error.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.EACCES):
            raise
    finally:
        os.close(descriptor)


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
    save_json(f"{tmp_path}{EPOCH_INFO_SUFFIX}", dict(epoch_info))


STATE_KEY_PREFIX = "state:"


def save_state_file(path: str, state: Mapping[str, Any], arrays: Mapping[str, mx.nd.NDArray], blobs: Mapping[str, bytes]) -> None:
    """One ``.params`` file, written atomically, holding a resume state whole.

    ``arrays`` as they are; the JSON of ``state`` and each of ``blobs``
    (e.g. an optimiser's saved state) as uint8 arrays named ``state:json``
    and ``state:NAME``. One file, so a crash cannot leave the counters of one
    epoch next to the arrays of another.
    """
    packed = dict(arrays)
    for name, data in {"json": json.dumps(dict(state)).encode(), **blobs}.items():
        packed[STATE_KEY_PREFIX + name] = mx.nd.array(np.frombuffer(data, dtype=np.uint8), dtype=np.uint8)
    save_params(path, packed)


def read_state_file(path: str) -> Tuple[Dict[str, Any], Dict[str, mx.nd.NDArray], Dict[str, bytes]]:
    """What :func:`save_state_file` wrote: the state, the arrays and the blobs."""
    try:
        loaded = load_params(path)
        blobs = {name: value.asnumpy().tobytes() for name, value in arrays_named(loaded, STATE_KEY_PREFIX).items()}
        state = json.loads(blobs.pop("json").decode())
    except (KeyError, ValueError, UnicodeDecodeError) as error:
        raise CheckpointError(f"cannot resume from {path}: not a state file this library wrote ({error})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"cannot resume from {path}: its state is not a JSON object")
    arrays = {name: value for name, value in loaded.items() if not name.startswith(STATE_KEY_PREFIX)}
    return state, arrays, blobs


def arrays_named(arrays: Mapping[str, mx.nd.NDArray], prefix: str) -> Dict[str, mx.nd.NDArray]:
    """The arrays whose names start with ``prefix``, by the rest of their names."""
    return {name[len(prefix):]: value for name, value in arrays.items() if name.startswith(prefix)}


def save_json(path: str, data: Any) -> None:
    """Write ``data`` as JSON to ``path``, atomically."""

    def write(temporary: str) -> None:
        with open(temporary, "w") as file:
            json.dump(data, file)

    write_atomically(path, write)


def save_params(path: str, arrays: Mapping[str, mx.nd.NDArray]) -> None:
    """Save named arrays as a ``.params`` file (``mx.nd.save`` format), atomically."""
    write_atomically(path, lambda temporary: mx.nd.save(temporary, dict(arrays)))


def load_params(path: str) -> Dict[str, mx.nd.NDArray]:
    """Load a ``.params`` file into CPU arrays; :class:`CheckpointError` naming it if unreadable.

    Sparse arrays are checked before anything densifies them: an index out
    of range would make MXNet write out of bounds (it aborts the process).
    """
    check_is_file(path)
    try:
        loaded = mx.nd.load(path)
    except mx.base.MXNetError as error:
        reason = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"checkpoint file {path} is not a readable .params file ({reason})") from None
    if not isinstance(loaded, dict):
        raise CheckpointError(f"checkpoint file {path} holds unnamed arrays; expected name -> array")
    for name, array in loaded.items():
        reason = _sparse_index_problem(array)
        if reason is not None:
            raise CheckpointError(f"checkpoint file {path} is not a readable .params file (array {name!r}: {reason})")
    return loaded


def load_weights(network: mx.gluon.Block, source: Union[str, Mapping[str, mx.nd.NDArray]]) -> None:
    """Write a checkpoint this library saved (a ``.params`` path, or arrays by name) into ``network``, in place.

    Use it to put an averaged or rebuilt checkpoint into a network or a
    GluonTS predictor's ``prediction_net``. The files name parameters
    relative to the training network (``dense0_weight``), while a network's
    own names carry a prefix: Gluon's per-process one, or, in a GluonTS
    predictor, the training network's, whose parameters it shares (so
    ``load_parameters`` refuses them). Each parameter is matched with the
    longest array name its own name ends with, and the prefix left over must
    be the same for every parameter. Values are copied into every device
    copy (never ``set_data``), after every name and shape is checked.

    Raises
    ------
    CheckpointError
        A parameter has no array, an array matches no parameter, or the
        prefixes left over differ (naming the parameter or array).
    """
    arrays = load_params(os.fspath(source)) if isinstance(source, (str, os.PathLike)) else dict(source)
    label = str(source) if isinstance(source, (str, os.PathLike)) else "the arrays given"
    parameters = list(network.collect_params().items())
    saved_name_of: Dict[str, str] = {}
    for full_name, _ in parameters:
        endings = [name for name in arrays if full_name.endswith(name)]
        if not endings:
            raise CheckpointError(f"{label} has no array for parameter {full_name!r} (array names are like {sorted(arrays)[:3]})")
        saved_name_of[full_name] = max(endings, key=len)
    prefixes = {full_name[: len(full_name) - len(name)] for full_name, name in saved_name_of.items()}
    unused = sorted(set(arrays) - set(saved_name_of.values()))
    if unused:
        raise CheckpointError(f"{label}: array {unused[0]!r} matches no parameter of the network")
    if len(prefixes) > 1:
        raise CheckpointError(f"{label}: the network's parameter names do not share one prefix before the saved names: {sorted(prefixes)}")
    write_into_parameters({full_name: arrays[name] for full_name, name in saved_name_of.items()}, parameters, label)


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


def check_is_file(path: str) -> None:
    """:class:`CheckpointError` naming ``path`` unless it is an existing regular file (a FIFO would block a reader)."""
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


def read_checkpoint_records(folder: str, allow_outside_folder: bool = False) -> List[Dict[str, Any]]:
    """Every usable ``*-epoch-info.json`` record in ``folder``, in file-name order.

    ``params_path`` is resolved against the folder when relative; each record
    also gets ``info_path``. Leftovers of interrupted writes (``.tmp-*``) are
    ignored, with one warning naming them. A record is skipped, with a
    warning naming its file and the reason, when the file is larger than
    :data:`MAX_EPOCH_INFO_BYTES` or not a regular file, is not a JSON object,
    has no string ``params_path``, has an ``epoch_no`` that is not an integer
    >= 0, points at the same parameter file as an earlier record, or whose
    parameter file is missing or has unreadable headers (values are not
    read here) -- or whose ``params_path`` resolves (symbolic links followed)
    outside ``folder``, unless ``allow_outside_folder``. GluonTS writes
    absolute paths inside the folder: those are accepted.

    Parameters
    ----------
    folder
        The checkpoint folder.
    allow_outside_folder
        Accept parameter files outside ``folder`` (e.g. a folder of epoch
        info whose checkpoints were moved elsewhere).

    Raises
    ------
    CheckpointError
        ``folder`` is not a folder, has no epoch-info files, or none is
        usable (the message lists why each was skipped).
    """
    names = _list_folder(folder)
    _report_leftovers(folder, [name for name in names if name.startswith(TEMPORARY_PREFIX)])
    info_names = [name for name in names if name.endswith(EPOCH_INFO_SUFFIX) and not name.startswith(TEMPORARY_PREFIX)]
    if not info_names:
        raise CheckpointError(f"no checkpoints (*{EPOCH_INFO_SUFFIX}) in folder {folder}")
    records: List[Dict[str, Any]] = []
    skipped: List[Tuple[str, str]] = []
    params_files: Dict[str, str] = {}  # real path of each parameter file -> the record naming it
    for info_path in (os.path.join(folder, name) for name in info_names):
        try:
            record = _read_epoch_info(info_path, allow_outside_folder)
            _check_first_use(record, params_files)
        except _Skipped as reason:
            skipped.append((info_path, str(reason)))
            continue
        records.append(record)
    if not records:
        raise CheckpointError(_nothing_usable_message(folder, skipped))
    for info_path, reason in skipped:
        logger.warning("skipping epoch info %s: %s", info_path, reason)
    return records


def _list_folder(folder: str) -> List[str]:
    """The sorted names in ``folder``; :class:`CheckpointError` naming it if it is not a readable folder."""
    if not os.path.isdir(folder):
        state = "is not a folder" if os.path.exists(folder) else "does not exist"
        raise CheckpointError(f"checkpoint folder {folder} {state}")
    try:
        return sorted(os.listdir(folder))
    except OSError as error:
        raise CheckpointError(f"checkpoint folder {folder} cannot be listed ({error.strerror or error})") from None


class _Skipped(Exception):
    """Why an epoch-info record cannot be used."""


def _report_leftovers(folder: str, leftovers: Sequence[str]) -> None:
    if leftovers:
        logger.warning(
            "ignoring %d temporary file(s) in %s (left by an interrupted write, or being written now): %s",
            len(leftovers),
            folder,
            ", ".join(leftovers),
        )


def list_some(items: Sequence[str], separator: str, before_count: str) -> str:
    """``items`` joined by ``separator``: the first ``MAX_REASONS_SHOWN`` named, the rest counted."""
    hidden = len(items) - MAX_REASONS_SHOWN
    return separator.join(items[:MAX_REASONS_SHOWN]) + (f"{before_count}and {hidden} more" if hidden > 0 else "")


def _nothing_usable_message(folder: str, skipped: Sequence[Tuple[str, str]]) -> str:
    reasons = list_some([f"{os.path.basename(info_path)}: {reason}" for info_path, reason in skipped], "; ", "; ")
    return f"no usable checkpoint in folder {folder}: all {len(skipped)} epoch-info files were skipped ({reasons})"


def _read_epoch_info(info_path: str, allow_outside_folder: bool) -> Dict[str, Any]:
    """One epoch-info record, checked, with ``params_path`` resolved and ``info_path`` added; else ``_Skipped``."""
    record = _parse_epoch_info(_read_small_file(info_path, MAX_EPOCH_INFO_BYTES))
    _check_record_types(record)
    folder = os.path.dirname(info_path)
    record["params_path"] = _resolve_params_path(folder, record["params_path"], allow_outside_folder)
    record["info_path"] = info_path
    try:
        read_array_names(record["params_path"])
    except CheckpointError as error:
        raise _Skipped(str(error)) from None
    return record


def _read_small_file(path: str, limit: int) -> bytes:
    """The bytes of regular file ``path`` if it has at most ``limit`` of them (a FIFO does not block)."""
    try:
        with open_regular_file(path) as file:
            size = os.fstat(file.fileno()).st_size
            if size > limit:
                raise _Skipped(f"{size} bytes, more than the {limit} an epoch-info file may have (not read)")
            data = file.read(limit + 1)
    except ParamsFormatError as error:  # not a regular file
        raise _Skipped(str(error)) from None
    except OSError as error:
        raise _Skipped(f"cannot be read ({error})") from None
    if len(data) > limit:
        raise _Skipped(f"grew past the {limit} bytes an epoch-info file may have while being read")
    return data


def _parse_epoch_info(data: bytes) -> Dict[str, Any]:
    try:
        record = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise _Skipped(f"not UTF-8 text ({error})") from None
    except ValueError as error:
        raise _Skipped(f"not JSON ({error})") from None
    except RecursionError:
        raise _Skipped("not usable JSON (nested too deeply)") from None
    if not isinstance(record, dict):
        raise _Skipped(f"not a JSON object (a {type(record).__name__})")
    return record


def _check_record_types(record: Mapping[str, Any]) -> None:
    params_path = record.get("params_path")
    if not isinstance(params_path, str) or not params_path or "\0" in params_path:
        shown = "nothing" if "params_path" not in record else shown_value(params_path)
        raise _Skipped(f"'params_path' must be a non-empty file name or path, got {shown}")
    epoch_no = record.get("epoch_no", 0)
    if isinstance(epoch_no, bool) or not isinstance(epoch_no, int) or epoch_no < 0:
        raise _Skipped(f"'epoch_no' must be an integer >= 0, got {shown_value(epoch_no)}")


def shown_value(value: Any, limit: int = 60) -> str:
    """``repr(value)`` and its type for a message, cut to about ``limit`` characters (values may be huge)."""
    if isinstance(value, int) and abs(value) >= 10**limit:  # repr of a huge int is slow, or refused
        text = f"an integer of about {int(value.bit_length() * math.log10(2)) + 1} digits"
    else:
        text = repr(value)
        text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{text} ({type(value).__name__})"


def _resolve_params_path(folder: str, params_path: str, allow_outside_folder: bool) -> str:
    """``params_path`` joined to ``folder``; ``_Skipped`` if it resolves outside it (unless allowed)."""
    path = os.path.join(folder, params_path)  # an absolute params_path stays as it is
    if allow_outside_folder or is_inside_folder(path, folder):
        return path
    raise _Skipped(
        f"'params_path' {shown_value(params_path, 200)} resolves to {os.path.realpath(path)}, outside the folder "
        f"(pass allow_outside_folder=True, or --allow-outside-folder to modavg, to use it)"
    )


def is_inside_folder(path: str, folder: str) -> bool:
    """Whether ``path`` lies inside ``folder`` once both are resolved (symbolic links followed, ``..`` removed)."""
    real_folder, real_path = os.path.realpath(folder), os.path.realpath(path)
    try:
        return os.path.commonpath([real_folder, real_path]) == real_folder
    except ValueError:  # Windows: different drives
        return False


def _check_first_use(record: Mapping[str, Any], params_files: Dict[str, str]) -> None:
    """``_Skipped`` if an earlier record names the same parameter file (it would count twice)."""
    reason = reused_file_reason(record["params_path"], os.path.basename(record["info_path"]), params_files)
    if reason is not None:
        raise _Skipped(reason)


def reused_file_reason(params_path: str, record_name: str, params_files: Dict[str, str]) -> Optional[str]:
    """Why a record cannot use ``params_path``: an earlier record names the same file (it would count twice).

    ``None`` the first time, and the file is then claimed for ``record_name`` in
    ``params_files`` (real path -> the record's name, symbolic links followed).
    """
    real_path = os.path.realpath(params_path)
    if real_path in params_files:
        return f"names the same parameter file as {params_files[real_path]}"
    params_files[real_path] = record_name
    return None


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

    def all_finite(self) -> bool:
        """Whether every floating-point sum is finite (NaN or inf in a source with weight > 0 shows here)."""
        return all(all_finite(flat) for flat in self._flats.values())

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
            _add_checkpoint(total, reader, path, weight)
            used.append(path)
        except _Unusable as error:
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
    _add_checkpoint(single, ParamsFileReader(), path, 1.0)
    return single.all_finite()


class _Unusable(CheckpointError):
    """A checkpoint file that could not be opened; nothing of it was added."""


def _add_checkpoint(total: WeightedSum, reader: ParamsFileReader, path: str, weight: float) -> None:
    try:
        params_file = open_params(reader, path)
    except CheckpointError as error:
        raise _Unusable(str(error)) from None
    if params_file is None:
        _add_loaded(total, path, weight)
        return
    with params_file:
        try:
            total.add_file(params_file, weight)
        except (ParamsFormatError, OSError) as error:
            raise CheckpointError(f"checkpoint file {path} changed while being averaged ({error})") from None


def _add_loaded(total: WeightedSum, path: str, weight: float) -> None:
    """Add a file in a layout left to ``mx.nd.load``; ``_Unusable`` if it cannot be loaded or converted."""
    try:
        loaded = load_params(path)
        values = {name: host_array(array) for name, array in loaded.items()}  # views of ``loaded``: keep it
    except CheckpointError as error:
        raise _Unusable(str(error)) from None
    except (mx.base.MXNetError, ValueError, TypeError) as error:  # e.g. a dtype NumPy does not have
        raise _Unusable(f"checkpoint file {path} has an array NumPy cannot hold ({error})") from None
    total.add(values, weight, path)
    del loaded


def list_folder_files(folder: str) -> List[str]:
    """The sorted names in ``folder`` except ``.tmp-*`` leftovers, which are ignored with one warning.

    The listing :func:`read_checkpoint_records` starts from, for other kinds
    of records kept in a checkpoint folder.

    Raises
    ------
    CheckpointError
        ``folder`` does not exist, is not a folder or cannot be listed.
    """
    names = _list_folder(folder)
    _report_leftovers(folder, [name for name in names if name.startswith(TEMPORARY_PREFIX)])
    return [name for name in names if not name.startswith(TEMPORARY_PREFIX)]


def read_json_object(path: str, limit: int = MAX_EPOCH_INFO_BYTES) -> Dict[str, Any]:
    """The JSON object in the regular file ``path`` of at most ``limit`` bytes, read as epoch-info files are.

    Raises
    ------
    CheckpointError
        The file is too large, not a regular file, unreadable, not UTF-8, not
        JSON or not a JSON object; the message is the reason alone (the
        caller names the file).
    """
    try:
        return _parse_epoch_info(_read_small_file(path, limit))
    except _Skipped as reason:
        raise CheckpointError(str(reason)) from None
