"""One training run's averaging, whatever loop runs it: the engine every adapter drives.

An :class:`AveragingRun` owns the averaging of one training run: the moving
average and the trigger that starts it, the post-hoc snapshots, the
per-epoch checkpoints and their pruning, the update counter, the one
resume-state file, and the final choice of weights (the strategy, its
fallback, the greedy soup's evaluation). Its configuration is checked once,
here, when it is built. It never imports GluonTS or Module code: a host (the
GluonTS callbacks, :class:`~modavg_plugin.module.ModuleAveraging`, a plain
Gluon loop) gives it the parameters, and where the host differs, how to
write arrays into the network and how to measure the validation loss, and
calls it from its hooks. A plain Gluon loop::

    run = AveragingRun({"type": "exponential", "decay": 0.99}, avg_strategy="mean", checkpoint_dir="out")
    run.resume()                                   # with resume=True: weights and counters back
    run.start(net.collect_params().items(), epochs_ahead=epochs - run.epochs_done)
    for epoch in range(run.epochs_done, epochs):
        for data, label in batches:
            ...; trainer.step(batch_size); run.step()
        with run.averaged():                       # validate the averages
            loss = validation_loss(net)
        run.end_epoch(score=loss)
    run.finish(measure=lambda: validation_loss(net))
"""

import contextlib
import logging
import math
import os
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple, Union

import mxnet as mx

from .averages import MovingAverage
from .checkpoint_log import CheckpointLog
from .checks import CheckpointError, check_integer, list_some
from .files import arrays_named, read_state_file, save_state_file
from .parameters import (
    NamedParameters,
    ParameterLike,
    as_context,
    device_copies,
    named_parameters,
    write_into_parameters,
)
from .registry import ConfigurationError
from .run_end import RunEnd
from .run_options import (
    POSTHOC_FOLDER,
    AverageConfig,
    StrategyConfig,
    auto_mode,
    checked_average_config,
    posthoc_options,
    strategy_from_config,
)
from .snapshots import PostHocSnapshots, check_no_earlier_snapshots
from .triggers import AveragingTrigger, trigger_from_config

__all__ = ["STATE_NAME", "AveragingRun", "ResumedState"]

logger = logging.getLogger(__name__)

STATE_NAME = "averaging-state.params"
"""The resume state's file in the checkpoint folder (the Module adapter prefixes its file stem)."""
STATE_FORMAT = 1
POSTHOC_ARRAYS = "posthoc:"  # the post-hoc EMAs' arrays in a state file: average:posthoc:INDEX/NAME
ENGINE_STATE_KEYS = frozenset(
    {"format", "epochs_done", "num_updates", "history", "records", "trigger", "posthoc", "num_applied", "num_steps"}
    | {"start_step", "run_id"}
)
HIGHER_IS_BETTER = ("accuracy", "acc", "top_k_accuracy", "f1", "mcc", "pearsonr", "pcc")
LOWER_IS_BETTER = ("loss", "cross-entropy", "ce", "nll", "perplexity", "mse", "mae", "rmse", "error")
Write = Callable[[Mapping[str, mx.nd.NDArray]], None]
StateExtras = Callable[[], Tuple[Dict[str, Any], Dict[str, mx.nd.NDArray]]]
HOST_ARRAYS = "host:"  # the host's own arrays in a state file


@dataclass(frozen=True)
class ResumedState:
    """What :meth:`AveragingRun.resume() <modavg_plugin.AveragingRun.resume>` read for the host: the raw weights, and the host's own saved parts."""

    raw: Dict[str, mx.nd.NDArray]
    extras: Dict[str, Any]  # the JSON-ready values the host's ``state_extras`` gave
    arrays: Dict[str, mx.nd.NDArray]  # and its arrays
    blobs: Dict[str, bytes]  # bytes kept by files of earlier versions (never written now)


class AveragingRun(RunEnd):
    """The averaging of one training run: average, trigger, snapshots, checkpoints, resume state, final weights.

    Parameters
    ----------
    average
        A :class:`~modavg_plugin.MovingAverage` config, without
        ``parameters`` and ``shadow_context``: a name (``"exponential"``) or a
        dict (``{"type": "cumulative", "eta": 0}``); ``None``: no moving
        average (each epoch's raw weights are the checkpoints).
    avg_strategy
        An :class:`~modavg_plugin.AveragingStrategy` or its config: the run
        ends with its average of the kept per-epoch checkpoints; ``None``: with
        the final moving average. Needed when ``average`` is ``None``.
    checkpoint_dir
        Folder for the per-epoch checkpoints and the resume state, kept;
        ``None``: a temporary folder, removed at the end (no resume state).
    resume
        ``True``: :meth:`resume` continues from the state an earlier, stopped
        run saved in ``checkpoint_dir``. Needs ``checkpoint_dir``.
    trigger
        An :class:`~modavg_plugin.AveragingTrigger` config that starts the
        average at an epoch's end, fed the epoch's score (``{"type": "nta",
        "n": 5}``); ``None``: the average's own ``start_step``.
    posthoc
        Keep post-hoc EMA snapshots in ``{checkpoint_dir}/posthoc``:
        ``{"sigma_rels": [0.05, 0.10], "every_epochs": 1}`` (the defaults of
        the keys). Needs ``checkpoint_dir``.
    shadow_context
        Where the averages live (also the post-hoc ones): an ``mx.Context`` or
        text such as ``"cpu"``, ``"gpu(1)"``; ``None``: each parameter's
        first device copy.
    file_stem
        Checkpoints are ``{file_stem}-NNNN.params`` with their
        ``{file_stem}-NNNN-epoch-info.json``.
    first_epoch_no
        The ``epoch_no`` (and NNNN) of the first epoch: 0 (GluonTS) or 1
        (``Module`` numbers checkpoints by epochs done).
    state_name
        The resume state's file name in ``checkpoint_dir``.
    metric_names
        The metrics the host records besides ``score``, when known in
        advance (``avg_strategy.metric`` is then checked now); ``None``:
        checked at the first epoch's end.
    update_bn
        Recompute the BatchNorm running statistics of the final weights from
        this many training batches (PyTorch's ``update_bn``), an integer >= 1,
        through the host's ``refresh_batchnorm`` given to :meth:`~modavg_plugin.run_end.RunEnd.finish`;
        ``None``: keep them as averaged (or copied, see ``non_trainable``).
    """

    def __init__(
        self,
        average: AverageConfig = "exponential",
        avg_strategy: StrategyConfig = None,
        checkpoint_dir: Optional[str] = None,
        *,
        resume: bool = False,
        trigger: Optional[Mapping[str, Any]] = None,
        posthoc: Optional[Mapping[str, Any]] = None,
        shadow_context: Union[None, str, mx.Context] = None,
        file_stem: str = "epoch",
        first_epoch_no: int = 0,
        state_name: str = STATE_NAME,
        metric_names: Optional[Iterable[str]] = None,
        update_bn: Optional[int] = None,
    ) -> None:
        self.auto = auto_mode(average, avg_strategy, posthoc)
        if self.auto is not None:  # the validated EMA, the snapshots and the kept epochs of the "auto" mode
            average, avg_strategy, posthoc = (
                self.auto.average_config(),
                self.auto.strategy(),
                self.auto.posthoc_config(),
            )
        self.average_config = checked_average_config(average)
        self.strategy = strategy_from_config(avg_strategy)
        if self.average_config is None and self.strategy is None:
            raise ConfigurationError("give a moving average, an avg_strategy, or both")
        if resume and checkpoint_dir is None:
            raise ConfigurationError("resume=True needs a checkpoint folder: where the earlier run saved its state")
        if trigger is not None and self.average_config is None:
            raise ConfigurationError("a trigger starts a moving average: give average too")
        self.trigger: Optional[AveragingTrigger] = trigger_from_config(trigger, self.average_config or {})
        self.posthoc_options = posthoc_options(posthoc, checkpoint_dir, temporary=self.auto is not None)
        self.shadow_context = as_context(shadow_context)
        self.checkpoint_dir = None if checkpoint_dir is None else os.fspath(checkpoint_dir)
        self.resume_requested = bool(resume)
        self.file_stem = file_stem
        self.first_epoch_no = check_integer("first_epoch_no", first_epoch_no, 0)
        self.state_name = state_name
        self.update_bn = None if update_bn is None else check_integer("update_bn", update_bn, 1)
        if metric_names is not None:
            self._check_strategy_metric({name: math.nan for name in metric_names}, "loss")
        self.writer = True  # False on the workers of a distributed job other than rank 0
        self.saves_state = True  # False where the host cannot resume (a distributed kvstore)
        self.moving_average: Optional[MovingAverage] = None
        self.posthoc_snapshots: Optional[PostHocSnapshots] = None
        self.run_id: Optional[str] = uuid.uuid4().hex[:16]
        """Stamped on every file this run writes (a resumed run keeps the stopped one's; ``None``: unstamped, old)."""
        self.checkpoints = CheckpointLog(self.strategy, self.checkpoint_dir, run_id=self.run_id, file_stem=file_stem)
        #: One dict per finished epoch: ``epoch_no``, the losses and metrics the host measured.
        self.history: List[Dict[str, Any]] = []
        self.num_updates = 0
        self.epochs_done = 0
        self.max_epochs: Optional[int] = None
        self.resumed = False
        self._parameters: Optional[NamedParameters] = None
        self._host_write: Optional[Write] = None  # None: into the parameters (no bound method kept: no cycle)
        self._pending: Optional[Tuple[Dict[str, Any], Dict[str, mx.nd.NDArray]]] = None
        self._metric_checked = metric_names is not None
        self._claimed = False
        self.choice: List[Dict[str, Any]] = []
        """With ``"auto"``: each candidate's name, ``sigma_rel``, ``error_bound``, ``validation_loss`` and whether ``chosen``."""

    @property
    def state_path(self) -> Optional[str]:
        """The resume state's file, ``None`` without a checkpoint folder."""
        return None if self.checkpoint_dir is None else os.path.join(self.checkpoint_dir, self.state_name)

    # Starting -----------------------------------------------------------------

    def resume(self) -> Optional[ResumedState]:
        """With ``resume=True`` and a saved state: take back the counters, records and history.

        The averages, trigger and post-hoc EMAs are restored when
        :meth:`start` builds them; the raw weights (and the host's extras) are
        returned for the host to put back. ``None`` when there is nothing to
        resume from (the run starts afresh).

        Raises
        ------
        CheckpointError
            The state file is unreadable or not one this library wrote.
        """
        if not self.resume_requested or not os.path.isfile(str(self.state_path)):
            return None
        try:
            state, arrays, blobs = read_state_file(str(self.state_path))
            counters = _checked_state(state, str(self.state_path))
        except CheckpointError:
            self.checkpoints.close()
            raise
        self.run_id = self.checkpoints.run_id = counters["run_id"]
        self.checkpoints.restore(state.get("records", []))
        self.history, self.epochs_done, self.num_updates = (
            counters["history"],
            counters["epochs_done"],
            counters["num_updates"],
        )
        self._pending = (state, arrays)
        self.resumed = True
        logger.info(
            "resuming after %d epochs and %d updates from %s", self.epochs_done, self.num_updates, self.state_path
        )
        extras = {key: value for key, value in state.items() if key not in ENGINE_STATE_KEYS}
        return ResumedState(arrays_named(arrays, "raw:"), extras, arrays_named(arrays, HOST_ARRAYS), blobs)

    def start(
        self,
        parameters: Iterable[Tuple[str, ParameterLike]],
        write: Optional[Write] = None,
        epochs_ahead: Optional[int] = None,
    ) -> None:
        """Track ``parameters`` from their current values (again, as long as no step was taken).

        Parameters
        ----------
        parameters
            ``(name, Parameter)`` pairs (or :class:`~modavg_plugin.parameters.DeviceArrays`), every one
            initialised: what is averaged, checkpointed and written back.
        write
            ``write(arrays)`` puts arrays by name into the network; ``None``:
            copied into every device copy of ``parameters``.
        epochs_ahead
            How many epochs this training will run (a trigger needs it).
        """
        self._parameters = named_parameters(parameters)
        self._host_write = write
        self.expect_epochs(epochs_ahead)
        self.max_epochs = None if epochs_ahead is None else self.epochs_done + int(epochs_ahead)
        if not self._claimed:
            self._claim_folder()
        if self.average_config is not None:
            config = dict(self.average_config, shadow_context=self.shadow_context)
            if self.trigger is not None:
                config["start_step"] = None  # the trigger starts it
            self.moving_average = MovingAverage.from_config(config, parameters=self._parameters)
        if self.posthoc_options is not None:
            options = self.posthoc_options
            if options["folder"] is None:  # "auto" without a checkpoint folder: snapshots in the temporary one
                options["folder"] = os.path.join(self.checkpoints.open(), POSTHOC_FOLDER)
            self.posthoc_snapshots = PostHocSnapshots(
                self._parameters, options["folder"], options["sigma_rels"], self.shadow_context, run_id=self.run_id
            )
        if self._pending is not None:
            self._load_pending(*self._pending)

    def _claim_folder(self) -> None:
        """A given checkpoint folder is this run's alone: locked while it runs, refused when another left files there."""
        self._claimed = True
        if self.checkpoint_dir is None or not self.writer:
            return
        if not self.resumed:
            earlier = self.checkpoints.earlier_run_files()
            earlier += [self.state_name] if os.path.isfile(str(self.state_path)) else []
            if earlier:
                advice = (
                    "it saved no resume state, so it cannot be continued: give another folder or remove them"
                    if self.resume_requested
                    else "give another folder, remove them, or continue that run (resume=True)"
                )
                raise CheckpointError(
                    f"checkpoint folder {self.checkpoint_dir} already holds files of an earlier run "
                    f"({list_some(earlier, ', ', ', ')}), which this run would overwrite and mix with its own; "
                    + advice
                )
            if self.posthoc_options is not None:
                check_no_earlier_snapshots(self.posthoc_options["folder"])
        try:
            self.checkpoints.open()  # takes the folder's lock
        except OSError as error:  # cannot be made, or a full disk: training goes on, each epoch end tries again
            logger.warning(
                "could not open the checkpoint folder %s (%s); training goes on, and each epoch end tries again",
                self.checkpoint_dir,
                error,
            )

    def expect_epochs(self, epochs_ahead: Optional[int]) -> None:
        """:class:`ConfigurationError` when a trigger is configured and the number of epochs to run is unknown."""
        if self.trigger is not None and epochs_ahead is None:
            raise ConfigurationError(
                "a trigger needs the number of epochs to run (num_epoch): its rules count in epochs"
            )

    def _load_pending(self, state: Mapping[str, Any], arrays: Mapping[str, mx.nd.NDArray]) -> None:
        """The saved averages, trigger memory and post-hoc EMAs into this run's; :class:`CheckpointError` naming the file."""
        try:
            self._load_saved_averages(state, arrays)
        except (KeyError, ValueError, TypeError) as error:
            message = error.args[0] if isinstance(error, KeyError) and error.args else error
            raise CheckpointError(f"cannot resume from {self.state_path}: {message}") from None

    def _load_saved_averages(self, state: Mapping[str, Any], arrays: Mapping[str, mx.nd.NDArray]) -> None:
        averages = arrays_named(arrays, "average:")
        saved_average = None
        if self.moving_average is not None:
            if "num_applied" not in state:
                raise ValueError("it holds no moving average, and this run has one")
            shadows = {name: value for name, value in averages.items() if not name.startswith(POSTHOC_ARRAYS)}
            saved_average = {**state, "shadows": shadows}
            self.moving_average.check_state_dict(saved_average)  # all checked before anything is loaded
        if self.posthoc_snapshots is not None and "posthoc" in state:
            posthoc_arrays = arrays_named(averages, POSTHOC_ARRAYS) or arrays_named(arrays, POSTHOC_ARRAYS)
            self.posthoc_snapshots.load_state(state["posthoc"], posthoc_arrays)
        if self.trigger is not None:
            trigger_state = state.get("trigger", {})
            self.trigger.load_state_dict(trigger_state if isinstance(trigger_state, Mapping) else {})
        if saved_average is not None:
            self.moving_average.load_state_dict(saved_average)

    # Training -----------------------------------------------------------------

    def step(self) -> None:
        """One optimiser step happened: move the averages."""
        self.num_updates += 1
        self._pending = None
        if self.moving_average is not None:
            self.moving_average.apply(num_updates=self.num_updates)
        if self.posthoc_snapshots is not None:
            self.posthoc_snapshots.apply()

    def swap_average(self) -> None:
        """Put the averages into the network (the raw weights kept); nothing without a moving average."""
        if self.moving_average is not None:
            self.moving_average.assign_average_value()

    def swap_raw(self) -> None:
        """Put the raw weights back after :meth:`swap_average` (nothing when they are in)."""
        if self.moving_average is not None:
            self.moving_average.restore()

    @contextlib.contextmanager
    def averaged(self) -> Iterator[None]:
        """The averages in the network inside the ``with`` block, the raw weights back afterwards (also on error)."""
        self.swap_average()
        try:
            yield
        finally:
            self.swap_raw()

    def raw_weights(self) -> Dict[str, mx.nd.NDArray]:
        """The network's current weights by name: the first device copies (not copies of them)."""
        return {name: device_copies(name, parameter)[0] for name, parameter in self._tracked()}

    def epoch_weights(self) -> Dict[str, mx.nd.NDArray]:
        """What a checkpoint holds: the averages, and the raw values of what is not averaged."""
        weights = self.raw_weights()
        if self.moving_average is not None:
            weights.update(self.moving_average.shadows)
        return weights

    def end_epoch(
        self,
        score: float,
        metrics: Optional[Mapping[str, float]] = None,
        notes: Optional[Mapping[str, float]] = None,
        state_extras: Optional[StateExtras] = None,
        score_name: str = "loss",
    ) -> Optional[str]:
        """An epoch ended: maybe start the average, save the checkpoint and the state, log the epoch.

        Parameters
        ----------
        score
            The epoch's score: what the strategy ranks (as ``score``) and the
            trigger is fed; the validation loss, else the training loss.
        metrics
            Further metrics to record in the epoch info, by name.
        notes
            Values for :attr:`history` only (e.g. the raw weights' loss); an
            epoch's history entry is ``epoch_no``, the notes and the metrics.
        state_extras
            Called when the state is saved: the host's own JSON-ready values
            and arrays by name to keep in the state file (given back by
            :meth:`resume` as ``extras`` and ``arrays``).
        score_name
            What the score measures (``"loss"``, ``"accuracy"``...): a strategy
            ranking it the wrong way round gets a warning.

        Returns
        -------
        Optional[str]
            The checkpoint written; ``None`` when none was (not the writer, or a failed write).
        """
        self.swap_raw()
        metrics = {str(name): float(value) for name, value in (metrics or {}).items()}
        if not self._metric_checked:
            self._check_strategy_metric(metrics, score_name)
            self._metric_checked = True
        self.epochs_done += 1
        epoch_no = self.epochs_done - 1 + self.first_epoch_no
        self._consult_trigger(float(score))
        self.checkpoints.writer = self.writer
        record = {**metrics, "score": float(score)}
        path = self.checkpoints.save(f"{self.file_stem}-{epoch_no:04d}", epoch_no, record, self.epoch_weights())
        every = self.posthoc_options["every_epochs"] if self.posthoc_options is not None else 0
        if self.posthoc_snapshots is not None and self.writer and self.epochs_done % every == 0:
            self.posthoc_snapshots.save_new()
        self.history.append({"epoch_no": epoch_no, **(notes or {}), **metrics})
        if self.checkpoint_dir is not None and self.writer and self.saves_state:
            self._save_state(state_extras)
        logger.info("epoch %d: %s", epoch_no, self._describe(self.history[-1]))
        return path

    def _consult_trigger(self, score: float) -> None:
        average = self.moving_average
        if self.trigger is None or average is None:
            return
        if self.trigger.start_if_due(average, self.epochs_done, score, int(self.max_epochs or 0)):
            name = AveragingTrigger.name_of(type(self.trigger)) or type(self.trigger).__name__
            logger.info(
                "the %s trigger starts the average after epoch %d (update %d)", name, self.epochs_done, self.num_updates
            )

    def _describe(self, entry: Mapping[str, Any]) -> str:
        kept = f"{len(self.checkpoints.records)} checkpoint(s) kept"
        if "validation_loss" in entry and "raw_validation_loss" in entry:
            averaged, raw = entry["validation_loss"], entry["raw_validation_loss"]
            change = f" ({(averaged - raw) / abs(raw):+.1%})" if raw else ""
            return f"validation loss {averaged:.6g} with the moving average, {raw:.6g} with the raw weights{change}; {kept}"
        values = [f"{name.replace('_', ' ')} {value:.6g}" for name, value in entry.items() if name != "epoch_no"]
        if self.moving_average is not None:
            values.insert(0, f"moving average after {self.num_updates} updates")
        return "; ".join([", ".join(values), kept]) if values else kept

    def _check_strategy_metric(self, metrics: Mapping[str, float], score_name: str) -> None:
        """The strategy's metric is recorded, and its direction is plausible (a warning if not)."""
        if self.strategy is None:
            return
        name = self.strategy.metric
        if name != "score" and name not in metrics:
            recorded = sorted(set(metrics) | {"score"})
            raise ConfigurationError(f"avg_strategy.metric is {name!r}, but the epochs record only {recorded}")
        measured = (score_name if name == "score" else name).lower()
        if measured.startswith(HIGHER_IS_BETTER) and not self.strategy.maximize:
            direction, fix = "lowest first", "higher: pass maximize=True"
        elif measured.startswith(LOWER_IS_BETTER) and self.strategy.maximize:
            direction, fix = "highest first", "lower: drop maximize=True"
        else:
            return
        logger.warning(
            "avg_strategy ranks %r (= %s) %s; %s is better when %s", name, measured, direction, measured, fix
        )

    # Resume state --------------------------------------------------------------

    def _save_state(self, state_extras: Optional[StateExtras]) -> None:
        """Everything a resumed run needs, in one file written atomically; a failure is a warning."""
        state: Dict[str, Any] = {
            "format": STATE_FORMAT,
            "epochs_done": self.epochs_done,
            "num_updates": self.num_updates,
        }
        if self.run_id is not None:
            state["run_id"] = self.run_id
        state.update(history=self.history, records=self.checkpoints.state())
        arrays = {f"raw:{name}": value for name, value in self.raw_weights().items()}
        if self.moving_average is not None:
            state.update(self.moving_average.counters())
            arrays.update({f"average:{name}": value for name, value in self.moving_average.shadows.items()})
        if self.trigger is not None:
            state["trigger"] = self.trigger.state_dict()
        if self.posthoc_snapshots is not None:
            state["posthoc"] = self.posthoc_snapshots.counters()
            posthoc_arrays = self.posthoc_snapshots.state_arrays().items()
            arrays.update({f"average:{POSTHOC_ARRAYS}{name}": value for name, value in posthoc_arrays})
        extras, host_arrays = state_extras() if state_extras is not None else ({}, {})
        clashing = sorted(set(extras) & ENGINE_STATE_KEYS)
        if clashing:
            raise ValueError(f"state_extras: key {clashing[0]!r} is the run's own; name the host's values otherwise")
        arrays.update({f"{HOST_ARRAYS}{name}": value for name, value in host_arrays.items()})
        try:
            save_state_file(str(self.state_path), {**state, **extras}, arrays, blobs={})
        except OSError as error:
            logger.warning(
                "could not save the averaging state in %s (%s); a resume would start from the one before",
                self.checkpoint_dir,
                error,
            )

    # Helpers ------------------------------------------------------------------

    def _tracked(self) -> NamedParameters:
        if self._parameters is None:
            raise RuntimeError("AveragingRun.start(parameters) has not been called")
        return self._parameters

    def _write(self, arrays: Mapping[str, mx.nd.NDArray]) -> None:
        """Put ``arrays`` into the network: the host's way, or into the tracked parameters."""
        if self._host_write is not None:
            self._host_write(arrays)
        else:
            self._write_into_parameters(arrays)

    def _write_into_parameters(self, arrays: Mapping[str, mx.nd.NDArray]) -> None:
        """Copy ``arrays`` into the tracked parameters they name (every one checked first); the others stay."""
        tracked = self._tracked()
        unknown = sorted(set(arrays) - {name for name, _ in tracked})
        if unknown:
            raise KeyError(f"the averaged weights have {unknown[0]!r}, which the network does not have")
        write_into_parameters(arrays, [(name, p) for name, p in tracked if name in arrays], "the averaged weights")


def _checked_state(state: Mapping[str, Any], path: str) -> Dict[str, Any]:
    """The engine's own counters from a state file, each checked; :class:`CheckpointError` naming the file and field."""

    def refuse(field: str, wanted: str) -> CheckpointError:
        return CheckpointError(f"cannot resume from {path}: its {field!r} is not {wanted}")

    checked: Dict[str, Any] = {}
    for field in ("epochs_done", "num_updates"):
        value = state.get(field, 0 if field == "num_updates" else None)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**53:
            raise refuse(field, "an integer >= 0")
        checked[field] = value
    history = state.get("history", [])
    if not isinstance(history, list) or not all(isinstance(entry, dict) for entry in history):
        raise refuse("history", "a list of objects")
    checked["history"] = [dict(entry) for entry in history]
    run_id = state.get("run_id")
    if run_id is not None and not (isinstance(run_id, str) and 0 < len(run_id) <= 64):
        raise refuse("run_id", "a short string")
    checked["run_id"] = run_id
    if not isinstance(state.get("records", []), list):
        raise refuse("records", "a list")
    return checked
