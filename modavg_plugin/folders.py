"""Reading the records of a checkpoint folder, trusting nothing in it.

A folder holds ``.params`` files, each described by a small JSON record: an
epoch-info file (``*-epoch-info.json``: ``params_path``, ``epoch_no`` and
metrics) or a post-hoc snapshot record (``*-posthoc-info.json``:
``params_path``, ``step``, ``gamma``). One reader serves both kinds: a
record is skipped, with its reason, when its file is larger than
:data:`MAX_RECORD_BYTES` or not a regular file, is not a JSON object, has a
field of the wrong type, points outside the folder (symbolic links followed),
names the same ``.params`` file as an earlier record, or names a file that
is missing or has unreadable headers (values are not read here). All skipped
records are named in one warning; only when nothing usable is left is it an
error, listing every reason. Leftovers of interrupted writes (``.tmp-*``)
are ignored, with one warning naming them.
"""

import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional

from .checks import CheckpointError, check_integer, list_some, shown_value
from .files import TEMPORARY_PREFIX
from .params_files import ParamsFormatError, open_regular_file, read_array_names
from .profiles import check_snapshot_limits

__all__ = [
    "EPOCH_INFO_SUFFIX",
    "MAX_RECORD_BYTES",
    "POSTHOC_INFO_SUFFIX",
    "UNSTAMPED",
    "RecordKind",
    "is_inside_folder",
    "list_folder_files",
    "one_run",
    "read_checkpoint_records",
    "read_json_object",
    "read_posthoc_snapshots",
    "read_records",
    "required_field",
    "resolve_inside",
]

logger = logging.getLogger(__name__)

EPOCH_INFO_SUFFIX = "-epoch-info.json"
POSTHOC_INFO_SUFFIX = "-posthoc-info.json"
MAX_RECORD_BYTES = 1 << 20  #: the library writes about 100 bytes; larger files are not read
MAX_EPOCH_INFO_BYTES = MAX_RECORD_BYTES


@dataclass(frozen=True)
class RecordKind:
    """One kind of record: its file suffix, its names in messages, and how one record is checked.

    ``check(record, folder, file_name)`` returns the record with
    ``params_path`` resolved and ``info_path`` added, or raises
    :class:`~modavg_plugin.CheckpointError` with the reason alone (the reader names the file).
    """

    suffix: str
    plural: str  # "epoch-info files"
    none_found: str  # "no checkpoints"
    nothing_usable: str  # "no usable checkpoint"
    check: Callable[[Dict[str, Any], str, str], Dict[str, Any]]


def read_records(folder: str, kind: RecordKind) -> List[Dict[str, Any]]:
    """Every usable record of ``kind`` in ``folder``, in file-name order (see the module docstring).

    Raises
    ------
    CheckpointError
        ``folder`` is not a readable folder, holds no such records, or none
        is usable (the message lists each file and why it was skipped).
    """
    info_names = [name for name in list_folder_files(folder) if name.endswith(kind.suffix)]
    if not info_names:
        raise CheckpointError(f"{kind.none_found} (*{kind.suffix}) in folder {folder}")
    records: List[Dict[str, Any]] = []
    skipped: List[str] = []
    claimed: Dict[str, str] = {}  # real path of each parameter file -> the record naming it
    for name in info_names:
        try:
            record = kind.check(read_json_object(os.path.join(folder, name)), folder, name)
            read_array_names(record["params_path"])  # CheckpointError naming the file if missing or unreadable
            _claim(record["params_path"], name, claimed)
        except CheckpointError as reason:
            skipped.append(f"{name}: {reason}")
            continue
        records.append(record)
    if not records:
        reasons = list_some(skipped, "; ", "; ")
        raise CheckpointError(
            f"{kind.nothing_usable} in folder {folder}: all {len(skipped)} {kind.plural} were skipped ({reasons})"
        )
    if skipped:
        logger.warning(
            "skipping %d of the %s in %s: %s", len(skipped), kind.plural, folder, list_some(skipped, "; ", "; ")
        )
    return records


def _claim(params_path: str, record_name: str, claimed: Dict[str, str]) -> None:
    """:class:`~modavg_plugin.CheckpointError` if an earlier record names the same parameter file (it would count twice)."""
    real_path = os.path.realpath(params_path)
    if real_path in claimed:
        raise CheckpointError(f"names the same parameter file as {claimed[real_path]}")
    claimed[real_path] = record_name


def list_folder_files(folder: str) -> List[str]:
    """The sorted names in ``folder`` except ``.tmp-*`` leftovers, which are ignored with one warning.

    Raises
    ------
    CheckpointError
        ``folder`` does not exist, is not a folder or cannot be listed.
    """
    if not os.path.isdir(folder):
        state = "is not a folder" if os.path.exists(folder) else "does not exist"
        raise CheckpointError(f"checkpoint folder {folder} {state}")
    try:
        names = sorted(os.listdir(folder))
    except OSError as error:
        raise CheckpointError(f"checkpoint folder {folder} cannot be listed ({error.strerror or error})") from None
    leftovers = [name for name in names if name.startswith(TEMPORARY_PREFIX)]
    if leftovers:
        logger.warning(
            "ignoring %d temporary file(s) in %s (left by an interrupted write, or being written now): %s",
            len(leftovers), folder, ", ".join(leftovers),
        )  # fmt: skip
    return [name for name in names if not name.startswith(TEMPORARY_PREFIX)]


def read_json_object(path: str, limit: int = MAX_RECORD_BYTES) -> Dict[str, Any]:
    """The JSON object in the regular file ``path`` of at most ``limit`` bytes.

    Raises
    ------
    CheckpointError
        The file is too large, not a regular file, unreadable, not UTF-8, not
        JSON or not a JSON object; the message is the reason alone.
    """
    try:
        with open_regular_file(path) as file:
            size = os.fstat(file.fileno()).st_size
            if size > limit:
                raise CheckpointError(f"{size} bytes, more than the {limit} a record file may have (not read)")
            data = file.read(limit + 1)
    except ParamsFormatError as error:  # not a regular file
        raise CheckpointError(str(error)) from None
    except OSError as error:
        raise CheckpointError(f"cannot be read ({error})") from None
    if len(data) > limit:
        raise CheckpointError(f"grew past the {limit} bytes a record file may have while being read")
    try:
        record = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise CheckpointError(f"not UTF-8 text ({error})") from None
    except ValueError as error:
        raise CheckpointError(f"not JSON ({error})") from None
    except RecursionError:
        raise CheckpointError("not usable JSON (nested too deeply)") from None
    if not isinstance(record, dict):
        raise CheckpointError(f"not a JSON object (a {type(record).__name__})")
    return record


def is_inside_folder(path: str, folder: str) -> bool:
    """Whether ``path`` lies inside ``folder`` once both are resolved (symbolic links followed, ``..`` removed)."""
    real_folder, real_path = os.path.realpath(folder), os.path.realpath(path)
    try:
        return os.path.commonpath([real_folder, real_path]) == real_folder
    except ValueError:  # Windows: different drives
        return False


def resolve_inside(folder: str, params_path: Any, allow_outside_folder: bool = False, hint: str = "") -> str:
    """``params_path`` (a non-empty string) joined to ``folder``; :class:`~modavg_plugin.CheckpointError` if it leads outside.

    An absolute ``params_path`` stays as it is (GluonTS writes absolute paths
    inside the folder: those are accepted).
    """
    if not isinstance(params_path, str) or not params_path or "\0" in params_path:
        raise CheckpointError(f"'params_path' must be a non-empty file name or path, got {shown_value(params_path)}")
    path = os.path.join(folder, params_path)
    if allow_outside_folder or is_inside_folder(path, folder):
        return path
    shown = shown_value(params_path, 200)
    raise CheckpointError(f"'params_path' {shown} resolves to {os.path.realpath(path)}, outside the folder{hint}")


def required_field(record: Dict[str, Any], key: str, wanted: str) -> Any:
    """``record[key]``; :class:`~modavg_plugin.CheckpointError` saying what was wanted when the key is missing."""
    if key not in record:
        raise CheckpointError(f"{key!r} must be {wanted}, got nothing")
    return record[key]


def _epoch_info_checker(allow_outside_folder: bool) -> Callable[[Dict[str, Any], str, str], Dict[str, Any]]:
    hint = (
        ""
        if allow_outside_folder
        else (" (pass allow_outside_folder=True, or --allow-outside-folder to modavg, to use it)")
    )

    def check(record: Dict[str, Any], folder: str, name: str) -> Dict[str, Any]:
        params_path = required_field(record, "params_path", "a non-empty file name or path")
        params_path = resolve_inside(folder, params_path, allow_outside_folder, hint)
        check_integer("'epoch_no'", record.get("epoch_no", 0), 0, CheckpointError)
        return {**record, "params_path": params_path, "info_path": os.path.join(folder, name)}

    return check


def read_checkpoint_records(
    folder: str, allow_outside_folder: bool = False, run: Optional[str] = None
) -> List[Dict[str, Any]]:
    """Every usable ``*-epoch-info.json`` record in ``folder``, in file-name order.

    ``params_path`` is resolved against the folder when relative; each record
    also gets ``info_path``. ``epoch_no``, when present, must be an integer
    >= 0. See the module docstring for what is skipped.

    Parameters
    ----------
    folder
        The checkpoint folder.
    allow_outside_folder
        Accept parameter files outside ``folder`` (e.g. a folder of epoch
        info whose checkpoints were moved elsewhere).
    run
        Only the records of this run (their ``run_id``; ``"unstamped"`` for
        records written before runs were stamped); needed when the folder
        holds several runs' records.

    Raises
    ------
    CheckpointError
        ``folder`` is not a folder, has no epoch-info files, none is usable,
        or it holds several runs and ``run`` does not say which (the message
        lists them).
    """
    kind = RecordKind(
        EPOCH_INFO_SUFFIX, "epoch-info files", "no checkpoints", "no usable checkpoint",
        _epoch_info_checker(allow_outside_folder),
    )  # fmt: skip
    return one_run(read_records(folder, kind), run, folder)


def _check_posthoc_record(record: Dict[str, Any], folder: str, name: str) -> Dict[str, Any]:
    params_path = required_field(record, "params_path", "a non-empty file name")
    path = os.path.abspath(resolve_inside(folder, params_path))
    step = required_field(record, "step", "an integer >= 1")
    _, gamma = check_snapshot_limits(
        step, required_field(record, "gamma", "a finite number > 0"), CheckpointError, ("'step'", "'gamma'")
    )
    info_path = os.path.join(os.path.abspath(folder), name)
    return {**record, "params_path": path, "gamma": gamma, "info_path": info_path}


POSTHOC_RECORDS = RecordKind(
    POSTHOC_INFO_SUFFIX,
    "post-hoc records",
    "no post-hoc snapshots",
    "no usable post-hoc snapshot",
    _check_posthoc_record,
)


def read_posthoc_snapshots(folder: str, run: Optional[str] = None) -> List[Dict[str, Any]]:
    """Every usable ``*-posthoc-info.json`` record in ``folder``, ordered by step, then gamma.

    Each record is the file's JSON object with ``params_path`` made absolute
    and ``info_path`` added; ``step`` must be an integer >= 1 and ``gamma`` a
    finite number > 0. See the module docstring for what is skipped.

    Raises
    ------
    CheckpointError
        ``folder`` is not a folder, holds no records, or none is usable.
    """
    records = one_run(read_records(folder, POSTHOC_RECORDS), run, folder)
    return sorted(records, key=lambda record: (record["step"], record["gamma"]))


UNSTAMPED = "unstamped"
"""How records without a ``run_id`` (written before runs were stamped) are named when choosing a run."""


def one_run(records: List[Dict[str, Any]], run: Optional[str], folder: str) -> List[Dict[str, Any]]:
    """The records of run ``run``, or all of them when they are of one run; :class:`~modavg_plugin.CheckpointError` otherwise.

    The error lists each run (its id, how many records, their first and
    last epoch or step) and says how to choose.
    """
    by_run: Dict[str, List[Dict[str, Any]]] = {}
    for record in records:
        by_run.setdefault(_run_of(record), []).append(record)
    if run is not None:
        if run not in by_run:
            raise CheckpointError(
                f"folder {folder} holds no records of run {run!r}; its runs: {_describe_runs(by_run)}"
            )
        return by_run[run]
    if len(by_run) > 1:
        raise CheckpointError(
            f"folder {folder} holds the records of {len(by_run)} runs ({_describe_runs(by_run)}), which must not be "
            "averaged together: choose one (--run ID with modavg, run=ID in the API)"
        )
    return records


def _run_of(record: Mapping[str, Any]) -> str:
    run_id = record.get("run_id")
    return run_id if isinstance(run_id, str) and run_id else UNSTAMPED


def _describe_runs(by_run: Mapping[str, List[Dict[str, Any]]]) -> str:
    parts = []
    for run_id, records in by_run.items():
        marks = sorted(record.get("epoch_no", record.get("step", 0)) for record in records)
        parts.append(f"{run_id}: {len(records)} records, {marks[0]}-{marks[-1]}")
    return "; ".join(parts)
