"""Writing files whole or not at all, and the one-file resume-state format.

Files are written to a temporary name (``.tmp-*``) in the same folder,
synced, renamed into place and the folder synced, so a reader never sees half
a file and a crash leaves at most a ``.tmp-*`` leftover, which readers ignore.
"""

import errno
import json
import logging
import os
import tempfile
from typing import Any, Callable, Dict, Mapping, Tuple

import mxnet as mx
import numpy as np

from .checks import CheckpointError
from .params_files import load_params

__all__ = [
    "STATE_KEY_PREFIX",
    "TEMPORARY_PREFIX",
    "arrays_named",
    "fsync_folder",
    "read_state_file",
    "remove_quietly",
    "save_json",
    "save_params",
    "save_state_file",
    "write_atomically",
]

logger = logging.getLogger(__name__)

TEMPORARY_PREFIX = ".tmp-"  # files being written; what a crash leaves behind
STATE_KEY_PREFIX = "state:"


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


def save_json(path: str, data: Any) -> None:
    """Write ``data`` as JSON to ``path``, atomically."""

    def write(temporary: str) -> None:
        with open(temporary, "w") as file:
            json.dump(data, file)

    write_atomically(path, write)


def save_params(path: str, arrays: Mapping[str, mx.nd.NDArray]) -> None:
    """Save named arrays as a ``.params`` file (``mx.nd.save`` format), atomically."""
    write_atomically(path, lambda temporary: mx.nd.save(temporary, dict(arrays)))


def remove_quietly(path: str) -> None:
    """Remove ``path`` if it exists; a failure is logged, not raised (the file is only left behind)."""
    try:
        if os.path.exists(path):
            os.remove(path)
    except OSError as error:
        logger.warning("could not remove %s: %s", path, error)


def save_state_file(
    path: str, state: Mapping[str, Any], arrays: Mapping[str, mx.nd.NDArray], blobs: Mapping[str, bytes]
) -> None:
    """One ``.params`` file, written atomically, holding a resume state whole.

    ``arrays`` as they are; the JSON of ``state`` and each of ``blobs``
    as uint8 arrays named ``state:json`` and ``state:NAME``. One file, so a
    crash cannot leave the counters of one epoch next to the arrays of another.
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
    return {name[len(prefix) :]: value for name, value in arrays.items() if name.startswith(prefix)}
