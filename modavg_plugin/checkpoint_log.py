"""The per-epoch checkpoints of one training run: save, record, prune.

Each checkpoint is a ``.params`` file and its epoch-info record
(``params_path`` relative to the folder, ``epoch_no``, metrics). Files that
the strategy can no longer select are deleted as training goes; without a
strategy only the latest checkpoint is kept.
"""

import logging
import os
import shutil
import tempfile
import weakref
from typing import Any, Dict, List, Mapping, Optional

import mxnet as mx

from .files import remove_quietly, save_json, save_params
from .folders import EPOCH_INFO_SUFFIX
from .strategies import AveragingStrategy

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

    def __init__(self, avg_strategy: Optional[AveragingStrategy], folder: Optional[str], writer: bool = True) -> None:
        self.avg_strategy = avg_strategy
        self.writer = writer
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
        """The folder, created on first use."""
        if self._folder is None:
            if self._given_folder is None:
                self._folder = tempfile.mkdtemp(prefix="modavg-")
                owner = self._owner() if self._owner is not None else None
                self._remove_temporary = weakref.finalize(
                    owner if owner is not None else self, _remove_tree, self._folder
                )
            else:
                os.makedirs(self._given_folder, exist_ok=True)
                self._folder = self._given_folder
        return self._folder

    def close(self) -> None:
        """Forget the records; remove the folder if it is a temporary one."""
        if self._remove_temporary is not None:
            self._remove_temporary()  # runs once; a later garbage collection does nothing
        self._remove_temporary = None
        self._folder = None
        self.records = []

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
        base = os.path.join(self.open(), file_stem)
        params_path = f"{base}.params"
        record = {"params_path": os.path.basename(params_path), "epoch_no": epoch_no, **metrics}
        try:
            save_params(params_path, arrays)
            save_epoch_info(base, record)
        except OSError as error:  # a full disk, a lost mount: training goes on, earlier files stay
            remove_quietly(params_path)
            logger.warning(
                "could not save the checkpoint of epoch %d in %s (%s); training goes on, the %d checkpoint(s) "
                "saved before are kept and nothing is pruned",
                epoch_no,
                self._folder,
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

    def restore(self, records: List[Mapping[str, Any]]) -> None:
        """Take back the records of :meth:`state`; those whose files are gone are dropped with a warning."""
        folder = self.open()
        self.records = []
        for record in records:
            restored = {key: record[key] for key in record}
            restored["params_path"] = os.path.join(folder, str(record["params_path"]))
            restored["info_path"] = os.path.join(folder, str(record["info_path"]))
            if os.path.isfile(restored["params_path"]) and os.path.isfile(restored["info_path"]):
                self.records.append(restored)
            else:
                logger.warning(
                    "resuming without the checkpoint of epoch %s: %s is gone",
                    record.get("epoch_no"),
                    restored["params_path"],
                )

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
