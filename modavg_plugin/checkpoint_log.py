"""The per-epoch checkpoints of one training run: save, record, prune; one run per folder.

Each checkpoint is a ``.params`` file and its epoch-info record
(``params_path`` relative to the folder, ``epoch_no``, metrics, and the
``run_id`` of the run that wrote it). Files that the strategy can no longer
select are deleted as training goes; without a strategy only the latest
checkpoint is kept. While a run writes into a given folder it holds a lock
on ``.{file stem}.lock`` there (``fcntl.flock``: the operating system
releases it when the process dies, so a killed run never leaves it stuck):
a second live run on the same folder and file stem is refused.
"""

import errno
import logging
import os
import shutil
import tempfile
import weakref
from typing import IO, Any, Dict, List, Mapping, Optional

import mxnet as mx

from .checks import CheckpointError
from .files import remove_quietly, save_json, save_params
from .folders import EPOCH_INFO_SUFFIX, is_inside_folder
from .strategies import AveragingStrategy

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; runs are not checked against each other there
    fcntl = None  # type: ignore[assignment]

__all__ = ["CheckpointLog", "save_epoch_info"]

logger = logging.getLogger(__name__)


class CheckpointLog:
    """Per-epoch checkpoints with epoch-info records in one folder.

    Parameters
    ----------
    avg_strategy
        Decides which checkpoints are kept and averaged; ``None`` keeps only
        the latest.
    folder
        Where the files go; ``None`` uses a temporary folder removed by
        :meth:`close`. A given folder is created if needed and kept.
    writer
        Whether this process writes (``False`` on the workers of a
        distributed job other than rank 0: :meth:`save` then does nothing).
    """

    def __init__(
        self,
        avg_strategy: Optional[AveragingStrategy],
        folder: Optional[str],
        writer: bool = True,
        run_id: Optional[str] = None,
        file_stem: str = "epoch",
    ) -> None:
        self.avg_strategy = avg_strategy
        self.writer = writer
        self.run_id = run_id
        self.file_stem = file_stem
        self._lock: Optional[IO[bytes]] = None
        self.records: List[Dict[str, Any]] = []
        self._given_folder = folder
        self._folder: Optional[str] = None
        self._owner: Optional[weakref.ref] = None
        self._remove_temporary: Optional[weakref.finalize] = None

    def remove_temporary_folder_with(self, owner: Any) -> None:
        """Remove a temporary folder also when ``owner`` is garbage-collected (or at exit), not only at :meth:`close`.

        For hosts that give no hook when training raises (GluonTS's
        ``Trainer`` calls no callback then): tied to the training network, the
        folder goes with it. A given folder is never removed.
        """
        self._owner = weakref.ref(owner)

    @property
    def folder(self) -> Optional[str]:
        """The folder in use, ``None`` before the first save (or after :meth:`close`)."""
        return self._folder

    def open(self) -> str:
        """The folder, created on first use (and, when it is a given folder, locked for this run).

        Raises
        ------
        OSError
            The folder cannot be created.
        CheckpointError
            Another live run holds the folder's lock.
        """
        if self._folder is None:
            if self._given_folder is None:
                self._folder = tempfile.mkdtemp(prefix="modavg-")
                owner = self._owner() if self._owner is not None else None
                target = owner if owner is not None else self
                self._remove_temporary = weakref.finalize(target, _remove_tree, self._folder)
            else:
                os.makedirs(self._given_folder, exist_ok=True)
                self._lock = _lock_folder(self._given_folder, self.file_stem)
                self._folder = self._given_folder
        return self._folder

    def close(self) -> None:
        """Forget the records; release the folder's lock; remove the folder if it is a temporary one."""
        if self._remove_temporary is not None:
            self._remove_temporary()  # runs once; a later garbage collection does nothing
        self._remove_temporary = None
        if self._lock is not None:
            self._lock.close()  # closing the file releases its lock
        self._lock = None
        self._folder = None
        self.records = []

    def earlier_run_files(self) -> List[str]:
        """Epoch-info files under this file stem in the given folder, of an earlier run (none for a temporary one)."""
        if self._given_folder is None or not os.path.isdir(self._given_folder):
            return []
        prefix = f"{self.file_stem}-"
        names = sorted(os.listdir(self._given_folder))
        return [name for name in names if name.startswith(prefix) and name.endswith(EPOCH_INFO_SUFFIX)]

    def save(
        self, file_stem: str, epoch_no: int, metrics: Mapping[str, float], arrays: Mapping[str, mx.nd.NDArray]
    ) -> Optional[str]:
        """Write ``{file_stem}.params`` and its epoch info (``params_path`` relative), then prune.

        Returns
        -------
        Optional[str]
            The path of the ``.params`` file written; ``None`` when not the writer.
        """
        if not self.writer:
            return None
        params_path = ""
        record: Dict[str, Any] = {"params_path": f"{file_stem}.params", "epoch_no": epoch_no, **metrics}
        if self.run_id is not None:
            record["run_id"] = self.run_id
        try:
            base = os.path.join(self.open(), file_stem)
            params_path = f"{base}.params"
            save_params(params_path, arrays)
            save_epoch_info(base, record)
        except OSError as error:  # a full disk, a lost mount, a folder that cannot be made: training goes on
            if params_path:
                remove_quietly(params_path)
            logger.warning(
                "could not save the checkpoint of epoch %d in %s (%s); training goes on, the %d checkpoint(s) "
                "saved before are kept and nothing is pruned",
                epoch_no,
                self._folder or self._given_folder,
                error,
                len(self.records),
            )
            return None
        self.records.append({**record, "params_path": params_path, "info_path": f"{base}{EPOCH_INFO_SUFFIX}"})
        self._prune()
        return params_path

    def state(self) -> List[Dict[str, Any]]:
        """The records as plain data with file names relative to the folder (for resuming)."""
        return [
            {
                **record,
                "params_path": os.path.basename(record["params_path"]),
                "info_path": os.path.basename(record["info_path"]),
            }
            for record in self.records
        ]

    def restore(self, records: Any) -> None:
        """Take back the records of :meth:`state`; unusable ones are dropped with a warning giving the reason.

        A record is dropped when it is not an object, names a file outside
        the folder (a state file says nothing about what lies elsewhere:
        such a file is never read or deleted), names a file that is gone, or
        was written by another run than this one.
        """
        folder = self.open()
        self.records = []
        for record in records if isinstance(records, list) else []:
            reason = self._unusable_record(folder, record)
            if reason is not None:
                logger.warning("resuming without a saved checkpoint record: %s", reason)
                continue
            restored = dict(record)
            restored["params_path"] = os.path.join(folder, record["params_path"])
            restored["info_path"] = os.path.join(folder, record["info_path"])
            self.records.append(restored)

    def _unusable_record(self, folder: str, record: Any) -> Optional[str]:
        if not isinstance(record, dict):
            return f"not an object: {record!r:.80}"
        for key in ("params_path", "info_path"):
            name = record.get(key)
            if not isinstance(name, str) or not name or os.path.basename(name) != name or name in (".", ".."):
                return f"its {key} {name!r:.200} is not a file name in {folder}"
            path = os.path.join(folder, name)
            if not is_inside_folder(path, folder):
                return f"its {key} {name!r:.200} leads outside {folder}"
            if not os.path.isfile(path):
                return f"{path} (epoch {record.get('epoch_no')!r:.20}) is gone"
        if record.get("run_id", self.run_id) != self.run_id:
            return f"{record['params_path']} was written by run {record.get('run_id')!r:.40}, not this run"
        return None

    def kept_paths(self) -> List[str]:
        """The ``.params`` files still needed: the strategy's selection, or the latest."""
        if self.avg_strategy is not None:
            try:
                ranked = self.avg_strategy.rank_checkpoints(self.records)
            except ValueError:  # no usable score yet (e.g. all NaN): keep the latest
                ranked = []
            if ranked:
                return [str(record["params_path"]) for record in ranked[: self.avg_strategy.num_models]]
        return [self.records[-1]["params_path"]] if self.records else []

    def _prune(self) -> None:
        kept = set(self.kept_paths())
        for record in [record for record in self.records if record["params_path"] not in kept]:
            for path in (record["info_path"], record["params_path"]):  # the record first: no record without file
                remove_quietly(path)
            self.records.remove(record)


def _remove_tree(folder: str) -> None:
    shutil.rmtree(folder, ignore_errors=True)


def _lock_folder(folder: str, file_stem: str) -> Optional[IO[bytes]]:
    """An open file holding an exclusive lock on ``{folder}/.{file_stem}.lock``; ``None`` where locks do not exist.

    Raises
    ------
    CheckpointError
        Another live process (or another run in this one) holds it.
    """
    if fcntl is None:
        return None
    path = os.path.join(folder, f".{file_stem}.lock")
    lock = open(path, "a+b", buffering=0)  # kept open while the run writes here; unbuffered: nothing left to flush
    try:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        lock.seek(0)
        holder = lock.read(40).decode("ascii", "replace").strip() or "unknown"
        lock.close()
        if error.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            raise CheckpointError(
                f"checkpoint folder {folder} is in use by another run (process {holder}); give each run its own "
                "folder, or wait for that one to finish"
            ) from None
        raise
    try:  # who holds it, for the message another run gets; the lock itself needs no room on the disk
        lock.seek(0)
        lock.truncate()
        lock.write(str(os.getpid()).encode("ascii"))
    except OSError:
        pass
    return lock


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
