"""Writing files whole or not at all, and the one-file resume-state format.

Files are written to a temporary name (``.tmp-*``) in the same folder,
synced, checked, renamed into place and the folder synced, so a reader never
sees half a file and a crash leaves at most a ``.tmp-*`` leftover, which
readers ignore. The check reads back what reached the disk (a ``.params``
file's headers against its size, a JSON file parsed): ``mx.nd.save`` ignores
write errors when it closes a file, so a full disk can leave a file cut short
without any exception. Every failure, MXNet's included, is an ``OSError``
naming the file, and the file it would have replaced is left as it was.
"""

import errno
import json
import logging
import os
import tempfile
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import mxnet as mx
import numpy as np

from .checks import CheckpointError
from .params_files import ParamsFormatError, check_layout, load_params

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
    "verify_params_file",
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


def write_atomically(path: str, write: Callable[[str], None], verify: Optional[Callable[[str], None]] = None) -> None:
    """Call ``write(temporary_path)``, sync the file, ``verify`` it, rename it to ``path`` and sync the folder.

    The temporary file is ``.tmp-*`` in the same folder and removed if
    anything fails before the rename; a crash can leave it behind (readers
    ignore such leftovers), never a partial ``path``.

    Raises
    ------
    OSError
        The file could not be written whole (a full disk, a lost mount, a
        folder that cannot be written; MXNet's errors are turned into this),
        or ``verify`` found what reached the disk unusable; ``path`` is untouched.
    """
    if not path:
        raise OSError(errno.EINVAL, "no file name given", path)
    folder = os.path.dirname(os.path.abspath(path))
    handle, temporary = tempfile.mkstemp(prefix=TEMPORARY_PREFIX, suffix="-" + os.path.basename(path), dir=folder)
    os.close(handle)
    try:
        try:
            write(temporary)
            with open(temporary, "rb") as written:
                os.fsync(written.fileno())
            if verify is not None:
                verify(temporary)
        except mx.base.MXNetError as error:  # e.g. "FileStream.Write incomplete" on a full disk
            raise OSError(errno.EIO, f"could not write the file: {_last_line(error)}", path) from None
        except OSError as error:  # a full disk, a lost mount, a cut-short file: named as the file meant
            raise OSError(error.errno, error.strerror or str(error), path) from None
        os.chmod(temporary, FILE_MODE)  # mkstemp creates 0600; a checkpoint is an ordinary file
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
    fsync_folder(folder)


def _last_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[-1].strip() if text else type(error).__name__


def verify_params_file(path: str) -> None:
    """``OSError`` unless the ``.params`` file at ``path`` is whole: every header consistent with its size."""
    try:
        check_layout(path)
    except ParamsFormatError as error:
        size = os.path.getsize(path)
        raise OSError(errno.EIO, f"only part of the file reached the disk ({size} bytes: {error})", path) from None


def _verify_text(expected: str) -> Callable[[str], None]:
    def verify(path: str) -> None:
        with open(path, encoding="utf-8") as file:
            written = file.read()
        if written != expected:
            reached = f"{len(written)} of {len(expected)} characters" if expected.startswith(written) else "other text"
            raise OSError(errno.EIO, f"what reached the disk is not what was written ({reached})", path)

    return verify


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

    text = json.dumps(data)

    def write(temporary: str) -> None:
        with open(temporary, "w", encoding="utf-8") as file:
            file.write(text)

    write_atomically(path, write, _verify_text(text))


def save_params(path: str, arrays: Mapping[str, mx.nd.NDArray]) -> None:
    """Save named arrays as a ``.params`` file (``mx.nd.save`` format), atomically."""
    write_atomically(path, lambda temporary: mx.nd.save(temporary, dict(arrays)), verify_params_file)


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
